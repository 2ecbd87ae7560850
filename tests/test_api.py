"""The REST contract over HTTP (uvicorn on loopback) on the tiny demo's real stores."""

from __future__ import annotations

import httpx
import numpy as np
import pandas as pd
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import LiveServer, free_port


@pytest.fixture(scope="module")
def served(demo_repo, redis_url):
    repo, report = demo_repo
    app = create_app(Settings(repo=repo.path, redis_url=redis_url, max_candidates=500), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, repo, report


def logged_pairs(repo, version: str) -> pd.DataFrame:
    return pd.read_parquet(repo.tae_dir(version))


def test_health_and_ready(served):
    client, _, _ = served
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/readyz")
    assert r.status_code == 200, r.text


def test_versions_and_experts(served):
    client, _, report = served
    versions = client.get("/v1/fm-versions").json()["versions"]
    assert [(v["version"], v["dim"], v["status"]) for v in versions] == [
        ("v1", 32, "active"),
        ("v2", 64, "active"),
    ]
    experts = {e["name"]: e["fm_version"] for e in client.get("/v1/experts").json()["experts"]}
    assert experts == report.experts
    assert sorted(v for v in experts.values() if v) == ["v1", "v2"]


def test_lookup_returns_logged_embeddings_in_order(served):
    client, repo, _ = served
    tae = logged_pairs(repo, "v2")
    user = int(tae["user_id"].iloc[0])
    mine = tae[tae["user_id"] == user].sort_values("event_timestamp").drop_duplicates(
        "item_id", keep="last"
    )
    items = [int(x) for x in mine["item_id"]][::-1]
    unknown = 10_000_000
    body = {"user_id": user, "item_ids": [items[0], unknown, *items[1:]], "fm_version": "v2"}
    r = client.post("/v1/embeddings/lookup", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["fm_version"] == "v2" and out["dim"] == 64
    assert out["missing"] == [1] and out["embeddings"][1] is None
    latest = {int(i): np.asarray(e) for i, e in zip(mine["item_id"], mine["embedding"], strict=True)}
    got = [e for k, e in enumerate(out["embeddings"]) if k != 1]
    for item, emb in zip(items, got, strict=True):
        np.testing.assert_allclose(emb, latest[item], rtol=0, atol=1e-6)


def test_lookup_by_expert_uses_its_pinned_version(served):
    client, repo, report = served
    tae = logged_pairs(repo, "v1")
    user, item = int(tae["user_id"].iloc[0]), int(tae["item_id"].iloc[0])
    name = next(n for n, v in report.experts.items() if v == "v1")
    by_expert = client.post(
        "/v1/embeddings/lookup", json={"user_id": user, "item_ids": [item], "expert": name}
    ).json()
    by_version = client.post(
        "/v1/embeddings/lookup", json={"user_id": user, "item_ids": [item], "fm_version": "v1"}
    ).json()
    assert by_expert == by_version and by_expert["dim"] == 32 and by_expert["missing"] == []


def test_score(served):
    client, repo, report = served
    tae = logged_pairs(repo, "v1")
    user = int(tae["user_id"].iloc[0])
    items = [int(i) for i in tae[tae["user_id"] == user]["item_id"].unique()[:5]]
    for name in report.experts:
        r = client.post(f"/v1/experts/{name}/score", json={"user_id": user, "item_ids": items})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["expert"] == name and out["fm_version"] == report.experts[name]
        scores = np.asarray(out["scores"])
        assert scores.shape == (len(items), len(out["tasks"]))
        assert ((scores > 0) & (scores < 1)).all()


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": [1], "fm_version": "v9"}, 404, "v9"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": [1], "expert": "nope"}, 404, "nope"),
        ("/v1/experts/nope/score", {"user_id": 1, "item_ids": [1]}, 404, "nope"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": [], "fm_version": "v1"}, 422, "item_ids"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": list(range(501)), "fm_version": "v1"}, 422, "at most 500"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": list(range(5000)), "fm_version": "v1"}, 422, "item_ids"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": [1], "fm_version": "v1", "expert": "x"}, 422, "exactly one"),
        ("/v1/embeddings/lookup", {"user_id": 1, "item_ids": [1]}, 422, "exactly one"),
        ("/v1/embeddings/lookup", {"user_id": "abc", "item_ids": [1], "fm_version": "v1"}, 422, "user_id"),
        ("/v1/experts/x/score", {"user_id": 1, "item_ids": []}, 422, "item_ids"),
    ],
)
def test_bad_input(served, path, body, status, needle):
    client, _, _ = served
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and needle in detail, detail


def test_redis_down_gives_503(demo_repo):
    repo, _ = demo_repo
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(Settings(repo=repo.path, redis_url=dead, redis_timeout_s=0.2), dead)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/readyz").status_code == 503
        r = client.post("/v1/embeddings/lookup", json={"user_id": 1, "item_ids": [1], "fm_version": "v1"})
        assert r.status_code == 503
        assert "unavailable" in r.json()["detail"]


def test_score_refuses_an_expert_re_pinned_to_another_width(demo_repo, redis_url, tmp_path):
    """A config re-pinned to a version of another dimension than its trained model: 409."""
    import shutil

    import yaml

    repo, report = demo_repo
    path = tmp_path / "repo"
    shutil.copytree(repo.path, path, ignore=shutil.ignore_patterns("redis"))
    name = next(n for n, v in report.experts.items() if v == "v1")
    cfg_path = path / "data" / "experts" / f"{name}.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["fm_version"] = "v2"
    cfg_path.write_text(yaml.safe_dump(cfg))
    app = create_app(Settings(repo=path, redis_url=redis_url), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r = client.post(f"/v1/experts/{name}/score", json={"user_id": 1, "item_ids": [1, 2]})
        assert r.status_code == 409, r.text
        assert "expects 32-d embeddings but FM version 'v2' is 64-d" in r.json()["detail"]
