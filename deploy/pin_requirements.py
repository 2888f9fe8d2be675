"""Print deploy/requirements.txt: fruitdask's runtime dependency closure, pinned to
the versions installed here (run it in the environment the tests passed in)::

    python deploy/pin_requirements.py > deploy/requirements.txt
"""

from __future__ import annotations

import importlib.metadata as md

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Exact versions for the container image (deploy/Dockerfile) and the EMR nodes
# (bootstrap.sh --constraints): fruitdask's runtime dependencies and theirs, at
# the versions its test suite passed with. Regenerate after an upgrade with the
# command in deploy/README.md ("Pinned versions")."""


def closure(name: str) -> dict[str, str]:
    """``{distribution: version}`` of ``name``'s installed dependencies, recursively."""
    seen: dict[str, str] = {}

    def walk(dist: str, extras: tuple[str, ...] = ()) -> None:
        d = md.distribution(dist)
        seen.setdefault(canonicalize_name(dist), d.version)
        for text in d.requires or []:
            req = Requirement(text)
            wanted = req.marker is None or any(
                req.marker.evaluate({"extra": e}) for e in ("", *extras)
            )
            if wanted and canonicalize_name(req.name) not in seen:
                walk(req.name, tuple(req.extras))

    walk(name)
    seen.pop(canonicalize_name(name))
    return seen


if __name__ == "__main__":
    print(HEADER)
    for dist, version in sorted(closure("fruitdask").items()):
        print(f"{dist}=={version}")
