"""Settings: frozen dataclasses whose fields are the one source of every default.

Each field is a :func:`setting`: its default, its ``dask.config`` key, its
command-line flag, its bounds and its help text live in one place. The packaged
defaults handed to ``dask.config`` are built from the fields, so a YAML file in
``~/.config/dask/`` or a ``DASK_FRUITDASK__<KEY>`` environment variable
overrides them, and explicit arguments win over both (the pattern of
dask-cloudprovider's ``config.py``). ``python -m fruitdask config`` prints them.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any

import dask.config

from fruitdask.errors import InputError
from fruitdask.features import OrbParams

__all__ = [
    "PCA_METHODS",
    "absolute",
    "ClusterSpec",
    "OrbSettings",
    "RunConfig",
    "SampleSpec",
    "as_number",
    "check_values",
    "config_fields",
    "config_get",
    "defaults",
    "describe",
    "flag_of",
    "resolve",
    "setting",
    "validate_fields",
]

PCA_METHODS = ("incremental", "exact")
SVD_SOLVERS = ("full", "auto", "randomized", "tsqr")
_MAX_COMPONENTS = 32  # ORB descriptors have 32 dimensions


def setting(
    default: Any,
    help: str,
    key: str | None = None,
    *,
    flag: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    kind: type | None = None,
) -> Any:
    """A dataclass field carrying what the CLI and ``dask.config`` need to know.

    Parameters
    ----------
    key : str, optional
        Its ``fruitdask.<key>`` in dask.config; the field name with dashes when
        omitted. ``""`` for a field that is not a configuration setting.
    flag : str, optional
        Its command-line flag; ``--<key's last part>`` when omitted.
    minimum, maximum, choices
        Checked by :func:`validate_fields`; shown in the help text.
    kind : type, optional
        int, float, str or bool, when the default (None) does not tell.
    """
    meta: dict[str, Any] = {"help": help, "key": key, "flag": flag, "minimum": minimum,
                            "maximum": maximum}  # fmt: skip
    meta.update({"choices": choices, "kind": kind or type(default)})
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _key(cls: type, f: Field) -> str | None:
    key = f.metadata.get("key")
    if key == "":
        return None
    prefix = getattr(cls, "_config_prefix", "")
    return f"{prefix}{key or f.name.replace('_', '-')}"


def config_fields(cls: type) -> list[tuple[Field, str]]:
    """``(field, dask.config key)`` of the configurable fields of a settings class."""
    return [(f, k) for f in fields(cls) if "help" in f.metadata and (k := _key(cls, f))]


def flag_of(cls: type, f: Field) -> str:
    """The command-line flag of a field (``--nfeatures``, ``--pca``)."""
    if f.metadata.get("flag"):
        return str(f.metadata["flag"])
    return "--" + f.name.replace("_", "-")


def config_get(key: str, value: Any = None) -> Any:
    """``value`` if given, else ``fruitdask.<key>`` from dask.config."""
    return value if value is not None else dask.config.get(f"fruitdask.{key}")


def as_number(value: Any, kind: type, name: str) -> Any:
    """``value`` as ``kind`` (None passes); a setting of the wrong type is an
    :class:`InputError` naming it (a YAML file or a ``DASK_FRUITDASK__*``
    variable can hold any text)."""
    if value is None or kind not in (int, float):
        return value
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise InputError(f"{name}: expected {what}, got {value!r}") from None


def validate_fields(obj: Any) -> None:
    """Check every :func:`setting` of a dataclass instance against its bounds and
    choices; an :class:`InputError` naming the flag on the first violation."""
    check_values(type(obj), {f.name: getattr(obj, f.name) for f in fields(obj)})


def check_values(cls: type, values: dict[str, Any]) -> None:
    """:func:`validate_fields` for values not yet in an instance."""
    for f in fields(cls):
        value = values.get(f.name)
        if "help" not in f.metadata or value is None:
            continue
        m = f.metadata
        name = flag_of(cls, f)
        if m["kind"] in (int, float):
            value = as_number(value, m["kind"], name)
            if value != value or value in (float("inf"), float("-inf")):
                raise InputError(f"{name}: expected a finite number, got {value!r}")
            low, high = m["minimum"], m["maximum"]
            if (low is not None and value < low) or (high is not None and value > high):
                raise InputError(f"{name} must be {_range(low, high)}, got {value}")
        if m["choices"] and value not in m["choices"]:
            raise InputError(f"{name} must be one of {', '.join(m['choices'])}, got {value!r}")


def _range(low: Any, high: Any) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f">= {low}" if low is not None else f"<= {high}"


def describe(cls: type, f: Field) -> str:
    """Help text of a field, with its bounds and its effective default."""
    m = f.metadata
    key = _key(cls, f)
    default = dask.config.get(f"fruitdask.{key}", None) if key else None
    if default is None and f.default is not MISSING:
        default = f.default
    text = m["help"]
    if m["minimum"] is not None or m["maximum"] is not None:
        text += f"; {_range(m['minimum'], m['maximum'])}"
    if default is not None and default is not False:
        shown = f"{default:,}" if isinstance(default, int) and default >= 10_000 else default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def resolve(cls: type, explicit: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``cls``: the explicit values, else dask.config's,
    coerced to each field's type (an :class:`InputError` naming a bad one)."""
    out = dict(explicit)
    for f, key in config_fields(cls):
        value = explicit.get(f.name)
        if value is None:
            value = dask.config.get(f"fruitdask.{key}", None)
        kind = f.metadata["kind"]
        if kind is bool and isinstance(value, str):
            word = value.strip().lower()
            if word not in _TRUE | _FALSE:  # a typo is not "false"
                raise InputError(
                    f"fruitdask.{key} ({flag_of(cls, f)}): expected true or false, got {value!r}"
                )
            value = word in _TRUE
        out[f.name] = as_number(value, kind, flag_of(cls, f))
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- the settings


def absolute(url: str) -> str:
    """A local path made absolute (as a run records it: a relative path means
    nothing once the shell that typed it is gone); a URL as given."""
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``fruitdask run`` needs, validated on construction.

    Use :meth:`from_config` to fill unset fields from dask.config.
    """

    input: str = setting(None, "folder or URL of images (default: a generated sample)",
                         kind=str, flag="--input")  # fmt: skip
    output: str = setting("fruitdask-output", "folder or URL for the result", flag="--output")
    storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] | None = None
    orb: OrbParams = field(default_factory=OrbParams)
    partition_size: int = setting(
        1000, "images per task (coarse tasks keep scheduling at ~1%)", minimum=1, maximum=10**6
    )
    pca_method: str = setting(
        "incremental",
        "dask-ml IncrementalPCA (full SVD, large batches) or an exact one-pass reduction of "
        "per-partition moments",
        "pca.method",
        flag="--pca",
        choices=PCA_METHODS,
    )
    n_components: int = setting(
        20, "PCA components", "pca.n-components", minimum=1, maximum=_MAX_COMPONENTS
    )
    # dask-ml's default batch (5 x n_features = 160 rows) means thousands of
    # serial partial_fits; its default "auto" solver goes randomized above 500
    # rows and landed 22-50 degrees off the exact subspace when measured here.
    pca_batch_size: int = setting(
        262144, "IncrementalPCA rows per partial_fit", "pca.batch-size", minimum=1, maximum=2**31
    )
    # Fitting all 4M descriptors of a 90k-image run costs ~4 us a row (dask-ml's
    # TSQR), more CPU than a third of the ORB work; every run checks the
    # sample's subspace against the exact PCA.
    pca_sample: int = setting(
        131072,
        "descriptors IncrementalPCA is fitted on, a uniform sample (0 = all)",
        "pca.sample",
        minimum=0,
        maximum=2**31,
    )
    pca_svd_solver: str = setting(
        "full", "IncrementalPCA's SVD solver", "pca.svd-solver", choices=SVD_SOLVERS
    )
    write_descriptors: bool = setting(True, "keep the raw descriptors/ table")
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.input:
            raise InputError("--input: must be a folder or URL")
        if not self.output:
            raise InputError("--output: must be a folder or URL")
        validate_fields(self)
        if self.pca_batch_size < self.n_components:
            raise InputError("--pca-batch-size must be >= --n-components")
        if self.overwrite and self.resume:
            raise InputError("--overwrite and --resume exclude each other")

    @property
    def out_storage_options(self) -> dict[str, Any]:
        """Storage options for the output (the input's unless given)."""
        if self.output_storage_options is None:
            return self.storage_options
        return self.output_storage_options

    @classmethod
    def from_config(cls, **kwargs: Any) -> RunConfig:
        """Build from keyword arguments, filling ``None`` ones from dask.config.

        ORB settings are given by their field names (``nfeatures=...``).
        """
        orb_names = {f.name for f in fields(OrbParams)}
        orb_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in orb_names}
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        orb = kwargs.pop("orb", None)
        if orb is None:
            orb_kw = resolve(OrbSettings, orb_kw)
            check_values(OrbSettings, orb_kw)
            orb = OrbParams(**orb_kw)
        return cls(orb=orb, **resolve(cls, kwargs))

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The settings without storage options (for manifests and fingerprints;
        the storage options that may be recorded are chosen by the caller)."""
        d = asdict(self)
        d.pop("storage_options")
        d.pop("output_storage_options")
        d["input"], d["output"] = absolute(self.input), absolute(self.output)
        return d


class OrbSettings(OrbParams):
    """:class:`OrbParams`' fields as settings, under ``fruitdask.orb.*`` (the
    kernel module knows nothing of configuration)."""

    _config_prefix = "orb."


@dataclass(frozen=True)
class ClusterSpec:
    """Which Dask cluster to use, and the shape of a local one.

    ``kind`` is ``"local"``, a scheduler address (``tcp://host:port``,
    ``tls://...``) or ``"ec2"``.
    """

    _config_prefix = "cluster."

    kind: str = setting("local", "local, ec2, or the address of a running scheduler "
                        "(tcp://host:8786)", "kind", flag="--cluster")  # fmt: skip
    workers: int | None = setting(
        None,
        "worker processes (default: fill the cores); with a scheduler address, wait "
        "for this many workers",
        minimum=1,
        maximum=1024,
        kind=int,
    )
    threads_per_worker: int | None = setting(
        None, "threads per worker (default: 1, or the cores over --workers)", minimum=1, maximum=256,
        kind=int,
    )  # fmt: skip
    memory_limit: str | None = setting("auto", "per-worker memory limit, e.g. 4GiB", kind=str)
    host: str | None = setting(
        "127.0.0.1", "interface the local scheduler binds to (0.0.0.0 exposes the "
        "unauthenticated dashboard)", kind=str,
    )  # fmt: skip
    dashboard_address: str | None = setting(
        "127.0.0.1:8787", "dashboard bind address; a bare port binds loopback", kind=str
    )
    connect_timeout: float = setting(
        10.0, "seconds to wait for an existing scheduler", minimum=0.1, maximum=3600
    )
    pause_timeout: float = setting(
        60.0, "seconds a worker may stay paused (its memory over the pause threshold) "
        "before the run stops with an error", minimum=1, maximum=86400,
    )  # fmt: skip
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_fields(self)
        known = self.kind in ("local", "ec2") or "://" in self.kind
        if not known:
            raise InputError(
                "--cluster must be 'local', 'ec2' or a scheduler address like "
                f"tcp://host:8786, got {self.kind!r}"
            )

    @classmethod
    def from_config(cls, **kwargs: Any) -> ClusterSpec:
        return cls(**resolve(cls, kwargs))


@dataclass(frozen=True)
class SampleSpec:
    """The embedded sample data set ``run`` uses when given no input."""

    _config_prefix = "sample."

    classes: int = setting(20, "classes (1-131)", minimum=1, maximum=131)
    per_class: int = setting(40, "Training images per class", minimum=1, maximum=100_000)
    seed: int = setting(0, "random seed", minimum=0, maximum=2**32 - 1)

    def __post_init__(self) -> None:
        validate_fields(self)

    @classmethod
    def from_config(cls, **kwargs: Any) -> SampleSpec:
        return cls(**resolve(cls, kwargs))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def defaults() -> dict[str, Any]:
    """The packaged defaults, ``{"fruitdask": {...}}``, built from the fields."""
    flat: dict[str, Any] = {}
    for cls in (RunConfig, OrbSettings, ClusterSpec, SampleSpec):
        for f, key in config_fields(cls):
            flat[key] = None if f.default is MISSING else f.default
    return {"fruitdask": _nest(flat)}


dask.config.update_defaults(defaults())
