"""The FM version registry (store_bridge.versions.VersionRegistry): lookup, view names, pins,
pin checks and the lifecycle's refusals, against real repo files; publishing with one load and
one digest; the fm package's light imports."""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from store_bridge.repo import FeatureRepo, FMVersion, Manifest
from store_bridge.versions import (
    PinError,
    UnknownVersion,
    VersionError,
    VersionPinned,
    VersionRegistry,
    gc,
    get_version,
    retire,
)

ROOT = Path(__file__).resolve().parent.parent


def _version(v: str, status: str = "active", dim: int = 8) -> FMVersion:
    return FMVersion(
        version=v, dim=dim, checkpoint=f"checkpoints/{v}.pt", digest=f"digest-{v}", status=status,
        training_window=("2026-01-01T00:00:00", "2026-01-02T00:00:00"), created_at="2026-01-02",
    )


@pytest.fixture
def repo(tmp_path) -> FeatureRepo:
    """v1 retired, v2 active (16-d), v3 deleted by gc; experts a, b pin v2, c pins v1, base none."""
    from store_bridge.repo import DeletedVersion

    r = FeatureRepo(tmp_path / "repo")
    r.save_manifest(Manifest(
        versions={"v1": _version("v1", "retired"), "v2": _version("v2", dim=16)},
        deleted={"v3": DeletedVersion(
            version="v3", dim=8, digest="d3", training_window=("a", "b"), created_at="c",
            deleted_at="2026-02-01T00:00:00+00:00",
        )},
    ))
    r.experts_dir.mkdir(parents=True)
    for name, pin in [("b", "v2"), ("a", "v2"), ("c", "v1"), ("base", None)]:
        (r.experts_dir / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "surface": "feed", "tasks": ["click"], "fm_version": pin}
        ))
    (r.experts_dir / "notes.txt").write_text("not a config")
    return r


def test_lookup_and_view_name(repo):
    reg = VersionRegistry(repo)
    assert reg.get("v2").dim == 16
    assert reg.get("v1").status == "retired"
    assert [v.version for v in reg.versions()] == ["v1", "v2"]
    assert [v.version for v in reg.active()] == ["v2"]
    assert reg.view_name("v7") == VersionRegistry.view_name("v7") == "fm_tae_v7"
    cases = [
        ("latest", "'latest' is not an FM version name (v1, v2, ...)"),
        ("v9", "unknown FM version 'v9' (known: v1, v2)"),
        ("v3", "FM version v3 was deleted by gc on 2026-02-01T00:00:00+00:00"),
    ]
    for name, message in cases:
        with pytest.raises(UnknownVersion) as err:
            reg.get(name)
        assert str(err.value) == message
        assert err.value.version == name
        with pytest.raises(UnknownVersion) as again:  # the module function is the same rule
            get_version(repo, name)
        assert str(again.value) == message
    with pytest.raises(UnknownVersion) as err:
        reg.get("v3")
    assert err.value.deleted_at == "2026-02-01T00:00:00+00:00"


def test_registry_reads_the_manifest_afresh(repo):
    reg = VersionRegistry(repo)
    manifest = repo.load_manifest()
    manifest.versions["v4"] = _version("v4")
    repo.save_manifest(manifest)
    assert reg.get("v4").version == "v4"  # another process published meanwhile


def test_pinned_by_reads_expert_config_files(repo):
    reg = VersionRegistry(repo)
    assert reg.pins() == {"a": "v2", "b": "v2", "base": None, "c": "v1"}
    assert reg.pinned_by("v2") == ["a", "b"]
    assert reg.pinned_by("v1") == ["c"]
    assert reg.pinned_by("v9") == []
    (repo.experts_dir / "broken.yml").write_text("name: [unclosed")
    with pytest.raises(VersionError, match=r"cannot read expert config .*broken\.yml"):
        reg.pinned_by("v2")


def test_pinned_by_without_experts_dir(tmp_path):
    r = FeatureRepo(tmp_path / "empty")
    assert VersionRegistry(r).pins() == {}


def test_pin_checks_one_message_each(repo):
    reg = VersionRegistry(repo)
    assert reg.check_pin("v2", expected_dim=16).version == "v2"
    assert reg.check_pin("v1", active=False).status == "retired"  # existence only
    cases = [
        ("v9", None, "pins unknown FM version 'v9' (known: v1, v2)"),
        ("v3", None, "pins FM version 'v3', which was deleted by gc on "
                     "2026-02-01T00:00:00+00:00 (active: v2)"),
        ("v1", None, "pins FM version 'v1', which is retired (active: v2)"),
        ("v2", 32, "expects 32-d embeddings but FM version 'v2' is 16-d"),
    ]
    for pin, dim, message in cases:
        with pytest.raises(PinError) as err:
            reg.check_pin(pin, dim)
        assert str(err.value) == message
        # Manifest.check_pin and a manifest-only registry ask the same rule
        with pytest.raises(PinError) as same:
            repo.load_manifest().check_pin(pin, dim)
        assert str(same.value) == message


def test_manifest_only_registry_has_no_repo():
    reg = VersionRegistry(manifest=Manifest(versions={"v1": _version("v1")}))
    assert reg.check_pin("v1").dim == 8
    with pytest.raises(TypeError, match="no repo"):
        reg.pinned_by("v1")
    with pytest.raises(TypeError, match="needs a repo or a manifest"):
        VersionRegistry()


def test_expert_config_validates_the_one_version_pattern():
    from experts.config import ExpertConfigError, parse_expert_config

    ok = {"name": "e", "surface": "feed", "tasks": ["click"], "fm_version": "v12"}
    assert parse_expert_config(ok).fm_version == "v12"
    for bad in ("v0", "1", "V1", "v01"):
        with pytest.raises(ExpertConfigError, match="fm_version"):
            parse_expert_config({**ok, "fm_version": bad})


def _no_redis() -> str:
    raise AssertionError("a refused retire/gc must not start Redis")


def test_retire_refuses_pinned_versions_once(repo):
    reg = VersionRegistry(repo)
    with pytest.raises(VersionPinned) as err:
        reg.retire("v2", _no_redis)
    assert str(err.value) == (
        "FM version v2 is pinned by experts a, b; re-pin them first or pass --force"
    )
    assert err.value.experts == ["a", "b"] and err.value.version == "v2"
    with pytest.raises(VersionPinned, match=r"pinned by experts x; or retry with \?force=true$"):
        reg.retire("v2", _no_redis, pinned_by=["x"], force_hint="or retry with ?force=true")
    with pytest.raises(VersionPinned, match="pinned by experts a, b; re-pin them first"):
        retire(repo, "v2", _no_redis)  # the module function reads the pins itself
    with pytest.raises(UnknownVersion, match="unknown FM version 'v9'"):
        reg.retire("v9", _no_redis, force=True)
    assert repo.load_manifest().versions["v2"].status == "active"


def test_gc_refusals(repo):
    reg = VersionRegistry(repo)
    with pytest.raises(VersionError, match=r"^FM version v2 is active; retire it first"):
        reg.gc("v2", _no_redis)
    with pytest.raises(VersionPinned) as err:
        reg.gc("v1", _no_redis)
    assert str(err.value) == "FM version v1 is pinned by experts c; re-pin or remove them before gc"
    with pytest.raises(VersionPinned, match="pinned by experts z"):
        gc(repo, "v1", _no_redis, pinned_by=["z"])
    assert "v1" in repo.load_manifest().versions


def test_feast_objects_refuse_an_unknown_pin(repo):
    from store_bridge.feast_objects import build_definitions

    class Expert:
        name, fm_version, item_features, surface = "lost", "v9", [], "feed"

    with pytest.raises(ValueError) as err:
        build_definitions(repo, [Expert()])
    assert str(err.value) == (
        f"expert 'lost' pins FM version 'v9', which is not in {repo.manifest_path} "
        "(known: ['v1', 'v2'])"
    )
    Expert.fm_version = "v1"  # retired: its view stays while a (forced) pin remains
    assert build_definitions(repo, [Expert()])["expert_lost"].tags == {
        "surface": "feed", "fm_version": "v1"
    }


def test_project_is_read_once(tmp_path):
    path = tmp_path / "r"
    path.mkdir()
    (path / "feature_store.yaml").write_text("project: first\n")
    r = FeatureRepo(path)
    assert r.project == "first"
    (path / "feature_store.yaml").unlink()  # a second read would fail
    assert r.project == "first"
    assert FeatureRepo(path) == r  # the cache is not part of equality


def _checkpoint(path: Path) -> Path:
    import torch

    from fm import FMConfig, FoundationModel, save_checkpoint
    from fm.testing import toy_config_kwargs

    torch.manual_seed(0)
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12, content_dim=3)
    return save_checkpoint(FoundationModel(cfg, torch.randn(40, 3)), path)


def test_publish_loads_and_hashes_the_checkpoint_once(feature_repo, redis_url, tmp_path, monkeypatch):
    import torch

    import fm.export
    import store_bridge.versions as versions

    yaml_path = feature_repo / "feature_store.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("project: foundex", "project: once_t"))
    repo = FeatureRepo(feature_repo)
    ckpt = _checkpoint(tmp_path / "model.pt")
    loads: list[Path] = []
    hashes: list[Path] = []
    real_load, real_digest, real_export_digest = torch.load, versions._digest, fm.export.checkpoint_digest

    def load(f, *a, **kw):
        loads.append(Path(f).resolve())
        return real_load(f, *a, **kw)

    def digest(path):
        hashes.append(Path(path).resolve())
        return real_digest(path)

    def export_digest(path):
        hashes.append(Path(path).resolve())
        return real_export_digest(path)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(versions, "_digest", digest)
    monkeypatch.setattr(fm.export, "checkpoint_digest", export_digest)
    entry = VersionRegistry(repo).publish(ckpt, redis_url, training_window=("2026-01-01", "2026-01-02"))
    monkeypatch.undo()

    copy, served = (repo.data / entry.checkpoint).resolve(), (repo.data / entry.serving_artifact).resolve()
    sources = {ckpt.resolve(), copy}
    assert sum(p in sources for p in loads) == 1  # the checkpoint (or its copy): once
    assert sum(p in sources for p in hashes) == 1
    assert entry.digest == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert entry.digest == hashlib.sha256(copy.read_bytes()).hexdigest()
    # the artifact records its source's digest and serves the same dimension
    payload = torch.load(served, weights_only=True)
    assert payload["serving"] is True and payload["extra"]["source_digest"] == entry.digest
    assert entry.dim == payload["config"]["d_model"]


def test_production_paths_import_no_test_helpers_and_fm_timefeatures_no_torch():
    code = (
        "import sys\n"
        "import fm.timefeatures, store_bridge.events.schema, store_bridge.versions\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "import fm.export, fm.bench, fm\n"
        "fm.load_checkpoint\n"
        "assert 'fm.testing' not in sys.modules, 'fm.testing'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_attention_backend_never_imports_its_dispatcher():
    tree = ast.parse((ROOT / "fm" / "triton_attention.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names} | {str(node.module)}
    assert not {n for n in imported if n.startswith("fm")}
    ops = (ROOT / "fm" / "ops.py").read_text()
    assert "from fm import triton_attention" in ops


def _record_many(repo_path: str, version: str, n: int) -> None:
    registry = VersionRegistry(FeatureRepo(Path(repo_path)))
    for seq in range(n):
        assert registry.record_sync(version, seq, f"2026-01-01T00:00:{seq:02d}.000+00:00")


def test_manifest_updates_from_several_processes_lose_nothing(tmp_path):
    """Read-modify-write of the manifest happens under its lock: four processes recording
    syncs of four versions at once each end with their own last record (without the lock,
    one process's save overwrites another's fresher entry)."""
    import multiprocessing as mp

    r = FeatureRepo(tmp_path / "repo")
    r.save_manifest(Manifest(versions={f"v{k}": _version(f"v{k}") for k in range(1, 5)}))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(r.path), f"v{k}", 40)) for k in range(1, 5)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 4
    got = r.load_manifest().versions
    assert {v: (e.sync_seq, e.sync_time) for v, e in got.items()} == {
        f"v{k}": (39, "2026-01-01T00:00:39.000+00:00") for k in range(1, 5)
    }


def test_a_failed_manifest_update_changes_nothing(repo):
    before = repo.manifest_path.read_bytes()
    with pytest.raises(RuntimeError), repo.manifest_update() as m:
        m.versions["v2"] = m.versions["v2"].model_copy(update={"status": "retired"})
        raise RuntimeError("mid-update")
    assert repo.manifest_path.read_bytes() == before
