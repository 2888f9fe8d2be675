"""Settings: the dataclass fields are the one source of defaults, keys, flags and help."""

from __future__ import annotations

from dataclasses import MISSING, fields

import dask.config
import pytest
import yaml

from fruitdask import config
from fruitdask.config import ClusterSpec, OrbSettings, RunConfig, SampleSpec
from fruitdask.errors import InputError
from fruitdask.features import OrbParams


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_packaged_defaults_are_the_field_defaults():
    got = dict(_flat(config.defaults()["fruitdask"]))
    for cls in (RunConfig, OrbSettings, ClusterSpec, SampleSpec):
        for f, key in config.config_fields(cls):
            want = None if f.default is MISSING else f.default
            assert got[key] == want, key
    # and dask.config holds them (no YAML file repeats them)
    assert dask.config.get("fruitdask.partition-size") == RunConfig.partition_size
    assert dask.config.get("fruitdask.orb.nfeatures") == OrbParams().nfeatures
    assert dask.config.get("fruitdask.pca.sample") == 131072


def test_config_wins_over_defaults_and_arguments_win_over_config():
    with dask.config.set({"fruitdask.partition-size": 77, "fruitdask.orb.nfeatures": 30}):
        cfg = RunConfig.from_config(input="in")
        assert cfg.partition_size == 77 and cfg.orb.nfeatures == 30
        cfg = RunConfig.from_config(input="in", partition_size=5, nfeatures=9)
        assert cfg.partition_size == 5 and cfg.orb.nfeatures == 9


def test_environment_strings_are_coerced_or_named():
    with dask.config.set({"fruitdask.partition-size": "250"}):
        assert RunConfig.from_config(input="in").partition_size == 250
    with dask.config.set({"fruitdask.partition-size": "lots"}):
        with pytest.raises(InputError, match="--partition-size: expected an integer, got 'lots'"):
            RunConfig.from_config(input="in")
    with dask.config.set({"fruitdask.orb.scale-factor": "x"}):
        with pytest.raises(InputError, match="--scale-factor: expected a number"):
            RunConfig.from_config(input="in")
    # booleans: the usual words either way; a typo is named, never taken as false
    with dask.config.set({"fruitdask.write-descriptors": "off"}):
        assert RunConfig.from_config(input="in").write_descriptors is False
    with dask.config.set({"fruitdask.write-descriptors": "Yes"}):
        assert RunConfig.from_config(input="in").write_descriptors is True
    with dask.config.set({"fruitdask.write-descriptors": "ture"}):
        with pytest.raises(InputError, match="write-descriptors.*expected true or false"):
            RunConfig.from_config(input="in")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"partition_size": 0}, "--partition-size must be between 1 and"),
        ({"n_components": 33}, "--n-components must be between 1 and 32"),
        ({"pca_method": "magic"}, "--pca must be one of incremental, exact"),
        ({"nlevels": 100000}, "--nlevels must be between 1 and 32"),
        ({"edge_threshold": 100000}, "--edge-threshold must be between 0 and 1024"),
        ({"max_pixels": 2**40}, "--max-pixels must be between"),
        ({"scale_factor": float("nan")}, "--scale-factor"),
        ({"pca_sample": -1}, "--pca-sample must be between 0"),
    ],
)
def test_bounds_are_checked_before_anything_runs(kwargs, needle):
    with pytest.raises(InputError) as info:
        RunConfig.from_config(input="in", **kwargs)
    assert needle in str(info.value)


def test_overwrite_and_resume_exclude_each_other():
    with pytest.raises(InputError, match="exclude each other"):
        RunConfig(input="in", overwrite=True, resume=True)


def test_help_shows_bounds_and_the_effective_default():
    f = {f.name: f for f in fields(RunConfig)}["partition_size"]
    assert "between 1 and 1000000" in config.describe(RunConfig, f)
    assert "(default: 1000)" in config.describe(RunConfig, f)
    with dask.config.set({"fruitdask.partition-size": 42}):
        assert "(default: 42)" in config.describe(RunConfig, f)


def test_cluster_spec_kinds():
    assert ClusterSpec.from_config().kind == "local"
    assert ClusterSpec(kind="tcp://10.0.0.1:8786").kind.startswith("tcp://")
    with pytest.raises(InputError, match="--cluster must be"):
        ClusterSpec(kind="yarn")
    with pytest.raises(InputError, match="--workers must be between 1"):
        ClusterSpec.from_config(workers=0)


def test_public_dict_has_no_storage_options():
    cfg = RunConfig(input="s3://b/in", storage_options={"secret": "s3cr3t"})
    d = cfg.public_dict()
    assert "storage_options" not in d and "s3cr3t" not in repr(d)
    assert d["orb"]["nfeatures"] == 500


def test_fruitdask_config_prints_the_settings_as_yaml(cli):
    r = cli.run("config", DASK_FRUITDASK__PARTITION_SIZE="123")
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert int(doc["fruitdask"]["partition-size"]) == 123
    assert doc["fruitdask"]["orb"]["nfeatures"] == 500
