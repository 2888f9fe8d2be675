"""Print deploy/requirements.txt: fruitdask's runtime dependency closure, pinned to
the versions installed here (run it in the environment the tests passed in)::

    python deploy/pin_requirements.py > deploy/requirements.txt

The same list `fruitdask emr run` stages as the EMR nodes' pip constraints
(:func:`fruitdask.aws.stage.constraints`). A custom image (``--image``) must
match the client's versions: the client checks them at connect.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fruitdask.aws.stage import constraints

HEADER = """\
# Exact versions for the container image (deploy/Dockerfile) and the EMR nodes
# (bootstrap.sh --constraints): fruitdask's runtime dependencies and theirs, at
# the versions its test suite passed with. Regenerate after an upgrade with the
# command in deploy/pin_requirements.py."""


if __name__ == "__main__":
    print(HEADER)
    print(constraints(), end="")
