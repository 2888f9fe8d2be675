"""Putting this machine's fruitdask onto cloud machines that start from a stock image.

A remote cluster must run the same code and the same library versions as the
client (they exchange pickled functions and data, and
:func:`fruitdask.cluster.check_versions` refuses a mismatch), so nothing is
taken from a registry that could drift:

- :func:`build_wheel` packs the fruitdask and spark_parity packages *as imported
  here* into a pure-Python wheel, what ``pip wheel --no-deps .`` makes of a
  checkout, without building anything (no setuptools, no network, no files
  written into the checkout). Its version carries the fingerprint of those files
  (``0.1.0+g1a2b3c4d5e6f``), so the same files always give the same wheel, byte for
  byte, and a staged copy can be reused;
- :func:`pinned_packages` are fruitdask's direct dependencies at the versions
  installed here (plus cloudpickle and msgpack, which the version check
  compares), for the Dask image's ``EXTRA_PIP_PACKAGES``; :func:`constraints`
  is the whole installed dependency closure, for pip ``-c`` on EMR;
- :func:`stage` uploads a file once, through :mod:`fruitdask.io`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import io as _bytes_io
import posixpath
import zipfile
from typing import Any

from fruitdask.aws import AwsError
from fruitdask.cluster import package_files, package_fingerprint

__all__ = [
    "build_wheel",
    "constraints",
    "fruitdask_version",
    "pinned_packages",
    "stage",
    "wheel_name",
]

# Compared exactly at connect (fruitdask.cluster.STRICT_PACKAGES) but not direct
# dependencies of fruitdask: pinned too, so the image cannot drift from the client.
_ALSO_PINNED = ("cloudpickle", "msgpack")
# A fixed timestamp for every zip entry: the same files give the same bytes.
_EPOCH = (2020, 1, 1, 0, 0, 0)


def _base_version() -> str:
    try:
        return md.version("fruitdask")
    except md.PackageNotFoundError:
        from fruitdask import __version__

        return str(__version__)


def fruitdask_version() -> str:
    """The version of the wheel :func:`build_wheel` makes: this install's
    version with the fingerprint of its files as a local label."""
    base = _base_version().split("+", 1)[0]
    return f"{base}+g{package_fingerprint()}"


def wheel_name() -> str:
    return f"fruitdask-{fruitdask_version()}-py3-none-any.whl"


def _metadata(version: str) -> str:
    """METADATA of the installed distribution (its Requires-Dist included, for
    pip on EMR), with ``version``; a minimal one when only the sources exist."""
    try:
        text = md.distribution("fruitdask").read_text("METADATA") or ""
    except md.PackageNotFoundError:
        text = ""
    if not text:
        return f"Metadata-Version: 2.1\nName: fruitdask\nVersion: {version}\n"
    lines = [f"Version: {version}" if ln.startswith("Version:") else ln
             for ln in text.splitlines()]  # fmt: skip
    return "\n".join(lines) + "\n"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def build_wheel() -> tuple[str, bytes]:
    """``(file name, bytes)`` of a wheel of the fruitdask imported here.

    Raises
    ------
    AwsError
        The package's files cannot be read.
    """
    version = fruitdask_version()
    dist_info = f"fruitdask-{version}.dist-info"
    entries: list[tuple[str, bytes]] = []
    try:
        for rel, path in package_files():
            with open(path, "rb") as fh:
                entries.append((rel, fh.read()))
    except OSError as exc:
        raise AwsError(f"cannot read fruitdask's files to build its wheel: {exc}") from None
    entries += [
        (f"{dist_info}/METADATA", _metadata(version).encode()),
        (
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: fruitdask.aws.stage\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        ),
        (
            f"{dist_info}/entry_points.txt",
            b"[console_scripts]\nfruitdask = fruitdask.cli:console_main\n",
        ),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    record += f"{dist_info}/RECORD,,\n"
    entries.append((f"{dist_info}/RECORD", record.encode()))
    buf = _bytes_io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return f"fruitdask-{version}-py3-none-any.whl", buf.getvalue()


def _requirement_names() -> list[str]:
    from packaging.requirements import Requirement

    try:
        texts = md.requires("fruitdask") or []
    except md.PackageNotFoundError:
        raise AwsError(
            "fruitdask is not installed as a distribution here (only on PYTHONPATH): "
            "pip install -e . first, so its dependencies are known"
        ) from None
    names = []
    for text in texts:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def pinned_packages() -> list[str]:
    """``name==version`` of fruitdask's direct dependencies (and cloudpickle,
    msgpack) as installed here, for the workers' ``pip install``."""
    out = []
    for name in (*_requirement_names(), *_ALSO_PINNED):
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            raise AwsError(f"{name} is not installed here: pip install fruitdask") from None
    return sorted(dict.fromkeys(out), key=str.lower)


def constraints() -> str:
    """pip constraints (``name==version`` lines) of fruitdask's whole installed
    dependency closure: what ``deploy/pin_requirements.py`` prints."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

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

    try:
        walk("fruitdask")
    except md.PackageNotFoundError as exc:
        raise AwsError(f"{exc.name or exc}: not installed here; pip install fruitdask") from None
    seen.pop("fruitdask")
    return "".join(f"{name}=={version}\n" for name, version in sorted(seen.items()))


def stage(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> bool:
    """Upload ``data`` to ``url`` unless it is there already (staged names
    carry their content's hash); True when it was uploaded."""
    from fruitdask import io
    from fruitdask.errors import FruitdaskError

    try:
        if io.exists(url, storage_options):
            return False
        io.write_bytes(url, data, storage_options)
    except FruitdaskError as exc:
        raise AwsError(f"staging {posixpath.basename(url)} for the cluster: {exc}") from None
    return True
