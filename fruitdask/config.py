"""Settings: one frozen dataclass, defaults from the packaged YAML via dask.config.

Explicit arguments win over configuration, which wins over the packaged defaults
(the pattern of dask-cloudprovider's ``config.py``).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import dask.config
import yaml

from fruitdask.features import OrbParams

__all__ = ["RunConfig", "as_number", "config_get", "redact"]

_YAML = os.path.join(os.path.dirname(__file__), "fruitdask.yaml")
with open(_YAML) as _f:
    _DEFAULTS = yaml.safe_load(_f)
dask.config.update_defaults(_DEFAULTS)

PCA_METHODS = ("incremental", "exact")
_MAX_COMPONENTS = 32  # ORB descriptors have 32 dimensions


def config_get(key: str, value: Any = None) -> Any:
    """``value`` if given, else ``fruitdask.<key>`` from dask.config."""
    return value if value is not None else dask.config.get(f"fruitdask.{key}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``fruitdask run`` needs, validated on construction.

    Use :meth:`from_config` to fill unset fields from dask.config.
    """

    input: str
    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] | None = None
    orb: OrbParams = field(default_factory=OrbParams)
    partition_size: int = 1000
    pca_method: str = "incremental"
    n_components: int = 20
    pca_batch_size: int = 262144
    pca_sample: int = 131072
    pca_svd_solver: str = "full"
    write_descriptors: bool = True
    overwrite: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input must be a path or URL")
        if not self.output:
            raise ValueError("output must be a path or URL")
        if self.partition_size < 1:
            raise ValueError(f"partition size must be >= 1, got {self.partition_size}")
        if self.pca_method not in PCA_METHODS:
            raise ValueError(f"pca method must be one of {PCA_METHODS}, got {self.pca_method!r}")
        if not 1 <= self.n_components <= _MAX_COMPONENTS:
            raise ValueError(
                f"n-components must be between 1 and {_MAX_COMPONENTS} "
                f"(ORB descriptors have 32 dimensions), got {self.n_components}"
            )
        if self.pca_batch_size < self.n_components:
            raise ValueError("pca batch size must be >= n-components")
        if self.pca_sample < 0:
            raise ValueError(
                f"pca sample must be >= 0 (0 = every descriptor), got {self.pca_sample}"
            )
        if self.pca_svd_solver not in ("full", "auto", "randomized", "tsqr"):
            raise ValueError(f"unknown svd solver {self.pca_svd_solver!r}")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other")

    @property
    def out_storage_options(self) -> dict[str, Any]:
        """Storage options for the output (the input's unless given)."""
        if self.output_storage_options is None:
            return self.storage_options
        return self.output_storage_options

    @classmethod
    def from_config(cls, **kwargs: Any) -> RunConfig:
        """Build from explicit keyword arguments, filling ``None`` ones from dask.config."""
        orb_kw = {
            "nfeatures": "orb.nfeatures",
            "scale_factor": "orb.scale-factor",
            "nlevels": "orb.nlevels",
            "edge_threshold": "orb.edge-threshold",
            "fast_threshold": "orb.fast-threshold",
            "max_pixels": "orb.max-pixels",
        }
        orb = OrbParams(
            **{
                k: as_number(config_get(v, kwargs.pop(k, None)), _ORB_TYPES.get(k, int), v)
                for k, v in orb_kw.items()
            }
        )
        simple = {
            "output": "output",
            "partition_size": "partition-size",
            "pca_method": "pca.method",
            "n_components": "pca.n-components",
            "pca_batch_size": "pca.batch-size",
            "pca_sample": "pca.sample",
            "pca_svd_solver": "pca.svd-solver",
            "write_descriptors": "write-descriptors",
        }
        for k, v in simple.items():
            kwargs[k] = config_get(v, kwargs.get(k))
        for k in _INTS & set(kwargs):
            kwargs[k] = as_number(kwargs[k], int, simple.get(k, k).replace("_", "-"))
        names = {f.name for f in fields(cls)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return cls(orb=orb, **kwargs)

    def with_(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the settings with secrets redacted (for the manifest)."""
        d = asdict(self)
        d["storage_options"] = redact(self.storage_options)
        d["output_storage_options"] = (
            None if self.output_storage_options is None else redact(self.output_storage_options)
        )
        return d


_INTS = {"partition_size", "n_components", "pca_batch_size", "pca_sample"}
_ORB_TYPES: dict[str, type] = {"scale_factor": float}


def as_number(value: Any, kind: type, name: str) -> Any:
    """``value`` as ``kind`` (None passes); a setting of the wrong type is a ValueError
    naming it (a YAML file or a DASK_FRUITDASK__* variable can hold any text)."""
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    if isinstance(value, bool) or (kind is int and isinstance(value, float)):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}: expected {what}, got {value!r}") from None


# Key names that hold credentials in the fsspec backends' options (s3fs, gcsfs,
# adlfs, http headers, sftp): matched anywhere in the name, at any depth.
_SECRET = re.compile(
    r"(secret|token|pass|credential|session|key|auth|connection|cookie|signature|sas)",
    re.IGNORECASE,
)
_NOT_SECRET = {
    "anon",
    "endpoint_url",
    "region_name",
    "use_ssl",
    "requester_pays",
    "max_concurrency",
}


def redact(options: Any) -> Any:
    """Copy of a storage-options mapping with every credential-like value replaced by ``***``."""
    if isinstance(options, dict):
        out: dict[str, Any] = {}
        for k, v in options.items():
            if isinstance(v, dict):
                out[k] = redact(v)
            elif str(k) not in _NOT_SECRET and _SECRET.search(str(k)):
                out[k] = "***"
            else:
                out[k] = v
        return out
    return options
