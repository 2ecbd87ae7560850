"""Expert config files: validation errors name the file and field; save/load round-trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experts import (
    ExpertConfig,
    ExpertConfigError,
    check_against_spec,
    load_expert_config,
    load_expert_configs,
    save_expert_config,
)
from store_bridge.events.schema import DatasetSpec

GOOD = {"name": "feed_v1", "surface": "feed", "tasks": ["click", "like"], "fm_version": "v1"}


def write(directory: Path, stem: str, data: object) -> Path:
    path = directory / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def spec() -> DatasetSpec:
    return DatasetSpec(
        name="toy",
        surfaces=["feed", "search"],
        main_tasks=["click"],
        surface_tasks={"feed": ["click", "like"], "search": ["click", "purchase"]},
    )


def test_good_config_loads_with_defaults(tmp_path):
    cfg = load_expert_config(write(tmp_path, "feed_v1", GOOD))
    assert cfg.fm_version == "v1"
    assert cfg.history_length == 8
    assert cfg.item_features == ["category", "quality"]
    assert cfg.embedding_noise == 0.0


def test_baseline_has_null_fm_version(tmp_path):
    cfg = load_expert_config(
        write(tmp_path, "feed_nofm", {**GOOD, "name": "feed_nofm", "fm_version": None})
    )
    assert cfg.fm_version is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "Feed-V1"}, "name"),
        ({"name": "1feed"}, "name"),
        ({"colour": "red"}, "colour"),
        ({"fm_version": "1"}, "fm_version"),
        ({"fm_version": "v0"}, "fm_version"),
        ({"fm_version": "version2"}, "fm_version"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["click", "click"]}, "tasks"),
        ({"history_length": 0}, "history_length"),
        ({"history_length": 257}, "history_length"),
        ({"item_features": ["colour"]}, "item_features"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_field_is_named_with_the_file(tmp_path, change, field):
    data = {**GOOD, **change}
    path = write(tmp_path, str(data["name"]), data)
    with pytest.raises(ExpertConfigError) as err:
        load_expert_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert f": {field}" in msg
    assert isinstance(err.value, ValueError)


def test_missing_fm_version_is_an_error(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "fm_version"}
    with pytest.raises(ExpertConfigError, match=r"feed_v1\.yaml: fm_version: Field required"):
        load_expert_config(write(tmp_path, "feed_v1", data))


def test_name_must_equal_file_stem(tmp_path):
    with pytest.raises(ExpertConfigError, match=r"other\.yaml: name: .*'other'"):
        load_expert_config(write(tmp_path, "other", GOOD))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(ExpertConfigError, match="expected a mapping"):
        load_expert_config(write(tmp_path, "feed_v1", ["a", "b"]))
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ExpertConfigError, match=r"broken\.yaml: \(file\): invalid YAML"):
        load_expert_config(path)
    with pytest.raises(ExpertConfigError, match="cannot read"):
        load_expert_config(tmp_path / "absent.yaml")


def test_round_trip_and_directory_listing(tmp_path):
    configs = [
        ExpertConfig(
            name="zeta",
            surface="feed",
            tasks=["click"],
            fm_version="v2",
            hidden_dim=32,
            embedding_noise=0.05,
            description="z",
        ),
        ExpertConfig(name="alpha", surface="search", tasks=["click", "purchase"], fm_version=None),
    ]
    for cfg in configs:
        path = save_expert_config(cfg, tmp_path / "experts")
        assert path.name == f"{cfg.name}.yaml"
        assert load_expert_config(path) == cfg
    loaded = load_expert_configs(tmp_path / "experts")
    assert [c.name for c in loaded] == ["alpha", "zeta"]
    assert loaded == sorted(configs, key=lambda c: c.name)
    assert load_expert_configs(tmp_path / "nowhere") == []


def test_a_bad_file_in_a_directory_is_reported(tmp_path):
    write(tmp_path, "feed_v1", GOOD)
    write(tmp_path, "bad", {**GOOD, "name": "bad", "fm_version": "x"})
    with pytest.raises(ExpertConfigError, match=r"bad\.yaml: fm_version"):
        load_expert_configs(tmp_path)


def test_check_against_spec():
    check_against_spec(ExpertConfig(**GOOD), spec())
    with pytest.raises(ExpertConfigError, match="surface: 'notif'"):
        check_against_spec(ExpertConfig(**{**GOOD, "surface": "notif"}), spec())
    with pytest.raises(ExpertConfigError, match=r"tasks: \['purchase'\]"):
        check_against_spec(
            ExpertConfig(**{**GOOD, "tasks": ["click", "purchase"]}), spec(), "x/feed_v1.yaml"
        )
    with pytest.raises(ExpertConfigError, match=r"^x/feed_v1\.yaml: tasks"):
        check_against_spec(
            ExpertConfig(**{**GOOD, "tasks": ["purchase"]}), spec(), "x/feed_v1.yaml"
        )


def test_reading_configs_does_not_import_torch():
    # The Feast repo's definitions read expert configs on every `feast apply`.
    code = "import sys, experts; experts.load_expert_configs; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_check_against_manifest_names_expert_and_problem():
    from experts import check_against_manifest
    from store_bridge.repo import FMVersion, Manifest

    def version(v: str, dim: int, status: str) -> FMVersion:
        return FMVersion(
            version=v, dim=dim, checkpoint="c.pt", digest="d", status=status,
            training_window=("a", "b"), created_at="c",
        )

    manifest = Manifest(versions={"v1": version("v1", 32, "retired"), "v2": version("v2", 64, "active")})
    ok = ExpertConfig(name="feed_v2", surface="feed", tasks=["click"], fm_version="v2")
    check_against_manifest(ok, manifest, expected_dim=64)
    check_against_manifest(ok.model_copy(update={"fm_version": None}), manifest)
    cases = [
        ("v7", None, "pins unknown FM version 'v7'"),
        ("v1", None, "which is retired"),
        ("v2", 32, "expects 32-d embeddings but FM version 'v2' is 64-d"),
    ]
    for pin, dim, needle in cases:
        cfg = ok.model_copy(update={"fm_version": pin})
        with pytest.raises(ExpertConfigError, match=needle) as err:
            check_against_manifest(cfg, manifest, expected_dim=dim)
        assert "expert 'feed_v2': fm_version:" in str(err.value)
