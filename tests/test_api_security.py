"""Bearer tokens, admin endpoints, limits and what reaches the logs."""

from __future__ import annotations

import logging
import shutil

import httpx
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import LiveServer

ADMIN, READER = "admin-secret-123", "reader-secret-456"
LOOKUP = {"user_id": 1, "item_ids": [1, 2], "fm_version": "v1"}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def secured(demo_repo, redis_url):
    repo, report = demo_repo
    settings = Settings(
        repo=repo.path, redis_url=redis_url, admin_token=ADMIN, read_token=READER,
        max_candidates=100, max_body_bytes=4096,
    )
    app = create_app(settings, redis_url)
    capture = _Capture()
    from api.observability import JsonFormatter

    capture.setFormatter(JsonFormatter())
    logging.getLogger("foundex.api").addHandler(capture)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, report, capture
    logging.getLogger("foundex.api").removeHandler(capture)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Basic abc"}])
def test_read_endpoints_need_a_token(secured, headers):
    client, _, _ = secured
    for r in [
        client.get("/v1/fm-versions", headers=headers),
        client.post("/v1/embeddings/lookup", json=LOOKUP, headers=headers),
    ]:
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "token" in r.json()["detail"]


def test_read_and_admin_tokens_open_read_endpoints(secured):
    client, _, _ = secured
    for token in (READER, ADMIN):
        assert client.get("/v1/fm-versions", headers=bearer(token)).status_code == 200
        r = client.post("/v1/embeddings/lookup", json=LOOKUP, headers=bearer(token))
        assert r.status_code == 200, r.text
    assert client.get("/healthz").status_code == 200  # probes stay open
    assert client.get("/readyz").status_code == 200


def test_admin_needs_the_admin_token(secured):
    client, report, _ = secured
    assert client.post("/v1/admin/experts/reload").status_code == 401
    r = client.post("/v1/admin/experts/reload", headers=bearer(READER))
    assert r.status_code == 401 and "WWW-Authenticate" in r.headers
    r = client.post("/v1/admin/experts/reload", headers=bearer(ADMIN))
    assert r.status_code == 200, r.text
    assert r.json()["experts"] == sorted(report.experts)


def test_retire_refused_while_pinned(secured):
    client, report, _ = secured
    pinned = sorted(n for n, v in report.experts.items() if v == "v1")
    r = client.post("/v1/admin/fm-versions/v1/retire", headers=bearer(ADMIN))
    assert r.status_code == 409, r.text
    assert all(name in r.json()["detail"] for name in pinned)
    r = client.post("/v1/admin/fm-versions/v9/retire", headers=bearer(ADMIN))
    assert r.status_code == 404 and "v9" in r.json()["detail"]
    versions = client.get("/v1/fm-versions", headers=bearer(ADMIN)).json()["versions"]
    assert {v["status"] for v in versions} == {"active"}


def test_admin_disabled_without_admin_token(demo_repo, redis_url):
    repo, _ = demo_repo
    app = create_app(Settings(repo=repo.path, redis_url=redis_url), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as client:
        r = client.post("/v1/admin/experts/reload", headers=bearer("anything"))
        assert r.status_code == 403 and "FOUNDEX_ADMIN_TOKEN" in r.json()["detail"]
        assert client.get("/v1/fm-versions").status_code == 200  # no read token: open


def test_retire_with_force_on_a_copy(demo_repo, redis_url, tmp_path):
    repo, report = demo_repo
    path = tmp_path / "repo"
    shutil.copytree(repo.path, path)
    app = create_app(Settings(repo=path, redis_url=redis_url, admin_token=ADMIN), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        r = client.post("/v1/admin/fm-versions/v1/retire?force=true", headers=bearer(ADMIN))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["status"] == "retired" and out["forced"] is True
        assert out["pinned_by"] == sorted(n for n, v in report.experts.items() if v == "v1")
        listed = client.get("/v1/fm-versions").json()["versions"]
        status = {v["version"]: v["status"] for v in listed}
        assert status == {"v1": "retired", "v2": "active"}


def test_candidate_limit(secured):
    client, _, _ = secured
    body = {**LOOKUP, "item_ids": list(range(101))}
    r = client.post("/v1/embeddings/lookup", json=body, headers=bearer(READER))
    assert r.status_code == 422 and "at most 100" in r.json()["detail"]


def test_body_limit_declared_and_streamed(secured):
    client, _, _ = secured
    big = b'{"user_id": 1, "fm_version": "v1", "item_ids": [' + b"1, " * 3000 + b"1]}"
    r = client.post(
        "/v1/embeddings/lookup", content=big,
        headers={**bearer(READER), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and "at most 4096 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the server counts as the body streams in
        for k in range(0, len(big), 1000):
            yield big[k : k + 1000]

    r = client.post(
        "/v1/embeddings/lookup", content=chunks(),
        headers={**bearer(READER), "Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["detail"]


def test_logs_carry_request_ids_but_no_secrets(secured):
    client, _, capture = secured
    r = client.post(
        "/v1/embeddings/lookup", json={**LOOKUP, "user_id": 987654},
        headers={**bearer(READER), "X-Request-ID": "req-abc.1"},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc.1"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    client.get("/v1/fm-versions", headers=bearer(ADMIN))
    text = "\n".join(capture.lines)
    assert '"request_id": "req-abc.1"' in text and generated in text
    assert '"route": "/v1/embeddings/lookup"' in text
    for secret in (READER, ADMIN, "987654"):
        assert secret not in text


def test_publish_via_admin_api_on_a_copy(demo_repo, redis_url, tmp_path):
    repo, _ = demo_repo
    path = tmp_path / "repo"
    shutil.copytree(repo.path, path, ignore=shutil.ignore_patterns("redis"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    app = create_app(Settings(repo=path, redis_url=redis_url, admin_token=ADMIN), redis_url)
    body = {
        "checkpoint": str(path / "data" / "checkpoints" / "v1.pt"),
        "train_start": "2026-01-01T00:00:00+00:00",
        "train_end": "2026-01-10T00:00:00+00:00",
    }
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        assert client.post("/v1/admin/fm-versions", json=body).status_code == 401
        for bad in [str(tmp_path / "missing.pt"), str(tmp_path / "notes.txt")]:
            r = client.post("/v1/admin/fm-versions", json={**body, "checkpoint": bad},
                            headers=bearer(ADMIN))
            assert r.status_code == 422 and bad in r.json()["detail"], r.text
        # v1.pt is already v1: refused (409, naming it) unless duplicates are asked for
        r = client.post("/v1/admin/fm-versions", json=body, headers=bearer(ADMIN))
        assert r.status_code == 409 and "already published as v1" in r.json()["detail"], r.text
        r = client.post("/v1/admin/fm-versions", json={**body, "allow_duplicate": True},
                        headers=bearer(ADMIN))
        assert r.status_code == 201, r.text
        assert (r.json()["version"], r.json()["dim"], r.json()["status"]) == ("v3", 32, "active")
        listed = [v["version"] for v in client.get("/v1/fm-versions").json()["versions"]]
        assert listed == ["v1", "v2", "v3"]
