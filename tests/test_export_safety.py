"""`foundex fm export` never destroys a published file and fails cleanly; `fm publish` refuses
a serving artifact (CLI, registry and REST alike).

The repos here are real Feast repo folders whose manifest (data/fm_versions.yaml) is written
with FeatureRepo, as publish writes it, so no `feast apply` is needed to have a v1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from api.cli import app
from fm import FMConfig, FoundationModel, save_checkpoint
from fm.export import export_serving
from fm.testing import toy_config_kwargs
from store_bridge.repo import FeatureRepo, FMVersion, Manifest
from store_bridge.versions import VersionError, VersionRegistry
from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[1]
WINDOW = ("2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def published(feature_repo: Path) -> FeatureRepo:
    """A repo with v1 published: data/checkpoints/v1.pt and v1.serving.pt, in the manifest."""
    repo = FeatureRepo(feature_repo)
    repo.checkpoints_dir.mkdir(parents=True)
    torch.manual_seed(0)
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12, content_dim=3)
    ckpt = save_checkpoint(FoundationModel(cfg, torch.randn(40, 3)), repo.checkpoints_dir / "v1.pt")
    export_serving(ckpt, repo.checkpoints_dir / "v1.serving.pt")
    manifest = Manifest()
    manifest.versions["v1"] = FMVersion(
        version="v1", dim=cfg.d_model, checkpoint="checkpoints/v1.pt",
        serving_artifact="checkpoints/v1.serving.pt", digest=_sha(ckpt),
        training_window=WINDOW, created_at="2026-01-03T00:00:00+00:00",
    )
    repo.save_manifest(manifest)
    return repo


def _export(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["fm", "export", *args], env=env)


def _error_line(res) -> str:
    """The one `error:` line of a refused command (and that there is nothing else)."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_export_refuses_to_overwrite_its_input_or_published_files(published, tmp_path):
    repo = published
    v1, served = repo.checkpoints_dir / "v1.pt", repo.checkpoints_dir / "v1.serving.pt"
    before = {p: _sha(p) for p in (v1, served)}
    assert before[v1] == repo.load_manifest().versions["v1"].digest

    line = _error_line(_export(str(v1), str(v1), "--repo", str(repo.path)))
    assert line == f"error: OUT {v1} is the checkpoint being exported; write the artifact elsewhere"
    # the published serving artifact, by a path that is not spelled like the manifest's,
    # with --force, and with the repo found through FOUNDEX_REPO
    other = repo.checkpoints_dir / ".." / "checkpoints" / "v1.serving.pt"
    line = _error_line(_export(str(v1), str(other), "--force",
                               env={"FOUNDEX_REPO": str(repo.path)}))
    assert line == f"error: OUT {other} is FM version v1's serving artifact; write the artifact elsewhere"
    # another checkpoint exported onto the published one; and a hard link to it
    copy = tmp_path / "copy.pt"
    copy.write_bytes(v1.read_bytes())
    line = _error_line(_export(str(copy), str(v1), "--force", "--repo", str(repo.path)))
    assert "is FM version v1's published checkpoint" in line
    link = tmp_path / "link.pt"
    os.link(v1, link)
    line = _error_line(_export(str(copy), str(link), "--force", "--repo", str(repo.path)))
    assert "is FM version v1's published checkpoint" in line
    assert {p: _sha(p) for p in (v1, served)} == before
    assert sorted(p.name for p in repo.checkpoints_dir.iterdir()) == ["v1.pt", "v1.serving.pt"]


def test_export_keeps_an_existing_out_unless_forced(published, tmp_path):
    v1 = published.checkpoints_dir / "v1.pt"
    out = tmp_path / "serving.pt"
    out.write_bytes(b"keep me")
    line = _error_line(_export(str(v1), str(out), "--repo", str(published.path)))
    assert line == f"error: OUT {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"keep me"

    res = _export(str(v1), str(out), "--force", "--repo", str(published.path))
    assert res.exit_code == 0, res.output
    # the same bytes as the artifact publish made from the same checkpoint
    assert _sha(out) == _sha(published.checkpoints_dir / "v1.serving.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature_repo", "serving.pt"]


def test_export_into_a_folder_or_a_missing_folder_fails_in_one_line(published, tmp_path):
    v1 = published.checkpoints_dir / "v1.pt"
    folder = tmp_path / "artifacts"
    folder.mkdir()
    line = _error_line(_export(str(v1), str(folder), "--repo", str(published.path)))
    assert line == (f"error: OUT {folder} is a folder; give the artifact's file name, "
                    f"e.g. {folder / 'serving.pt'}")
    assert list(folder.iterdir()) == []
    missing = tmp_path / "nonexistent" / "x.pt"
    line = _error_line(_export(str(v1), str(missing), "--repo", str(published.path)))
    assert line == f"error: OUT folder does not exist: {missing.parent}"
    assert not missing.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "feature_repo"]


def test_a_failed_export_leaves_no_temporary_file_and_the_old_out_intact(published, tmp_path,
                                                                        monkeypatch):
    import fm.export

    out = tmp_path / "serving.pt"
    out.write_bytes(b"old")

    def failing_replace(src, dst):  # a full disk or a lost mount at the final rename
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fm.export.os, "replace", failing_replace)
    with pytest.raises(OSError):
        export_serving(published.checkpoints_dir / "v1.pt", out)
    monkeypatch.undo()
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature_repo", "serving.pt"]
    with pytest.raises(ValueError, match="is a folder"):
        export_serving(published.checkpoints_dir / "v1.pt", tmp_path)
    with pytest.raises(ValueError, match="is the checkpoint being exported"):
        export_serving(out.parent / "feature_repo/data/checkpoints/v1.pt",
                       published.checkpoints_dir / "v1.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature_repo", "serving.pt"]


def test_export_of_a_non_checkpoint_is_one_sentence_before_torch(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    out = tmp_path / "o.pt"
    # a fresh interpreter: refused without importing torch (the slow part)
    code = (
        "import sys; from typer.testing import CliRunner; from api.cli import app; "
        f"r = CliRunner().invoke(app, ['fm', 'export', {str(text)!r}, {str(out)!r}]); "
        "print(r.exit_code, 'torch' in sys.modules); print(r.output.strip())"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    head, message = run.stdout.strip().splitlines()
    assert head == "2 False", run.stdout + run.stderr
    assert message == f"error: {text} is not an FM checkpoint (not a PyTorch archive)"

    # a zip archive that is not a checkpoint: torch's verdict, the path named once
    archive = tmp_path / "other.pt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("hello.txt", "hi")
    line = _error_line(_export(str(archive), str(out)))
    assert line.count(str(archive)) == 1 and "is not a foundex-fm/1 checkpoint" in line
    assert not out.exists()


def test_publish_refuses_a_serving_artifact(published, tmp_path):
    served = published.checkpoints_dir / "v1.serving.pt"

    def no_redis() -> str:
        raise AssertionError("a refused publish must not start Redis")

    with pytest.raises(VersionError) as err:
        VersionRegistry(published).publish(served, no_redis, training_window=WINDOW)
    digest = published.load_manifest().versions["v1"].digest
    assert str(err.value) == (f"{served} is a serving artifact (exported from v1's checkpoint, "
                              f"digest {digest[:12]}); publish the training checkpoint")
    # an artifact of an unpublished checkpoint: refused all the same
    torch.manual_seed(1)
    cfg = FMConfig.small(**toy_config_kwargs(40), max_history=12)
    other = save_checkpoint(FoundationModel(cfg), tmp_path / "other.pt")
    art = export_serving(other, tmp_path / "other.serving.pt")
    res = CliRunner().invoke(app, ["fm", "publish", art.artifact, "--train-start", "2026-01-01",
                                   "--train-end", "2026-01-02", "--repo", str(published.path)])
    line = _error_line(res)
    assert line == (f"error: {art.artifact} is a serving artifact (exported from digest "
                    f"{_sha(other)[:12]}); publish the training checkpoint")
    manifest = published.load_manifest()
    assert list(manifest.versions) == ["v1"]
    assert sorted(p.name for p in published.checkpoints_dir.iterdir()) == ["v1.pt", "v1.serving.pt"]


def test_rest_publish_of_a_serving_artifact_is_422(published, redis_url):
    from api.app import create_app
    from api.settings import Settings

    token = "admin-secret-123"
    settings = Settings(repo=published.path, redis_url=redis_url, admin_token=token)
    served = published.checkpoints_dir / "v1.serving.pt"
    with LiveServer(create_app(settings, redis_url)) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/admin/fm-versions", headers={"Authorization": f"Bearer {token}"},
                        json={"checkpoint": str(served), "train_start": "2026-01-01",
                              "train_end": "2026-01-02"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{served} is a serving artifact (exported from v1's")
    assert list(published.load_manifest().versions) == ["v1"]
