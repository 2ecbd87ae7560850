"""Binary transport (raw float32/float16 matrix) and read-through (TAEs computed on a miss)."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pandas as pd
import pytest

from api.app import create_app
from api.settings import Settings
from tests.conftest import LiveServer

UNKNOWN_ITEM = 10_000_000  # outside the FM's vocabulary: never computable


def _serve(repo_path, redis_url, **kw):
    app = create_app(Settings(repo=repo_path, redis_url=redis_url, **kw), redis_url)
    return LiveServer(app)


@pytest.fixture(scope="module")
def served(demo_repo, redis_url):
    repo, _ = demo_repo
    with _serve(repo.path, redis_url) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c, repo


def _logged(repo, version: str, nth: int = 0) -> tuple[int, list[int]]:
    """The nth logged user of a version and every item logged for them."""
    tae = pd.read_parquet(repo.tae_dir(version))
    user = int(tae["user_id"].unique()[nth])
    return user, [int(i) for i in tae[tae["user_id"] == user]["item_id"].unique()]


def _fresh(logged: list[int], k: int) -> list[int]:
    """Items inside the tiny FM's vocabulary (ids 1..79) that were never logged for the user."""
    out = [i for i in range(1, 80) if i not in set(logged)][:k]
    assert len(out) == k
    return out


def _matrix(r: httpx.Response) -> np.ndarray:
    dtype = {"f32": "<f4", "f16": "<f2"}[r.headers["x-dtype"]]
    dim = int(r.headers["x-dim"])
    return np.frombuffer(r.content, dtype=dtype).reshape(-1, dim)


def test_binary_round_trip_equals_json(served):
    client, repo = served
    user, items = _logged(repo, "v2")
    body = {"user_id": user, "item_ids": [items[0], UNKNOWN_ITEM, *items[1:]], "fm_version": "v2"}
    js = client.post("/v1/embeddings/lookup", json=body).json()
    assert js["missing"] == [1]
    want = np.asarray([e if e is not None else [0.0] * js["dim"] for e in js["embeddings"]])

    octet = {"Accept": "application/octet-stream"}
    r = client.post("/v1/embeddings/lookup", json=body, headers=octet)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    h = r.headers
    assert (h["x-fm-version"], h["x-dim"], h["x-dtype"]) == ("v2", "64", "f32")
    assert r.headers["x-missing"] == "1"
    got = _matrix(r)
    assert got.shape == (len(body["item_ids"]), 64)
    np.testing.assert_array_equal(got, want.astype(np.float32))  # JSON keeps float32 exactly
    assert not got[1].any()  # missing row zero-filled

    r16 = client.post("/v1/embeddings/lookup", json={**body, "format": "f16"})
    assert r16.headers["x-dtype"] == "f16"
    np.testing.assert_array_equal(_matrix(r16), want.astype(np.float16))

    r32 = client.post("/v1/embeddings/lookup", json={**body, "format": "f32"})
    assert r32.content == r.content
    # An explicit "json" wins over the Accept header.
    rj = client.post(
        "/v1/embeddings/lookup", json={**body, "format": "json"},
        headers={"Accept": "application/octet-stream"},
    )
    assert rj.json() == js


def test_read_through_computes_writes_back_and_reports(served):
    client, repo = served
    user, logged = _logged(repo, "v1", 1)
    fresh = _fresh(logged, 5)
    body = {"user_id": user, "item_ids": [logged[0], *fresh, UNKNOWN_ITEM], "fm_version": "v1"}
    first = client.post("/v1/embeddings/lookup", json=body).json()
    assert first["computed"] == [1, 2, 3, 4, 5]
    assert first["missing"] == [6] and first["embeddings"][6] is None
    rows = np.asarray(first["embeddings"][:6], dtype=np.float32)
    assert rows.shape == (6, 32) and np.isfinite(rows).all()

    second = client.post("/v1/embeddings/lookup", json=body).json()
    assert second["computed"] == [] and second["missing"] == [6]  # written back to Redis
    np.testing.assert_array_equal(np.asarray(second["embeddings"][:6], dtype=np.float32), rows)

    # Through the binary path (another user, so nothing is stored yet): the X-Computed header.
    user2, logged2 = _logged(repo, "v1", 2)
    other = {"user_id": user2, "item_ids": _fresh(logged2, 5), "fm_version": "v1"}
    r = client.post("/v1/embeddings/lookup", json={**other, "format": "f32"})
    assert r.headers["x-fm-version"] == "v1" and r.headers["x-computed"] == "0,1,2,3,4"

    metrics = client.get("/metrics").text
    assert 'foundex_embeddings_total{source="computed"}' in metrics
    assert "foundex_store_hit_ratio" in metrics
    assert (
        "foundex_http_request_duration_seconds_count"
        '{method="POST",route="/v1/embeddings/lookup",status="200"}'
    ) in metrics


def test_read_through_unknown_surface_is_422(served):
    client, repo = served
    user, logged = _logged(repo, "v1", 4)
    body = {"user_id": user, "item_ids": _fresh(logged, 1), "fm_version": "v1",
            "surface": "nowhere"}
    r = client.post("/v1/embeddings/lookup", json=body)
    assert r.status_code == 422 and "nowhere" in r.json()["detail"]


def test_read_through_off_or_without_events(demo_repo, redis_url, tmp_path):
    repo, _ = demo_repo
    user, logged = _logged(repo, "v1", 3)
    body = {"user_id": user, "item_ids": [logged[0], *_fresh(logged, 2)], "fm_version": "v1"}
    copy = tmp_path / "repo"
    shutil.copytree(repo.path, copy, ignore=shutil.ignore_patterns("events"))
    for path, kw in [(repo.path, {"read_through": False}), (copy, {})]:
        with _serve(path, redis_url, **kw) as server, httpx.Client(base_url=server.url) as c:
            out = c.post("/v1/embeddings/lookup", json=body).json()
            assert out["missing"] == [1, 2] and out["computed"] == [], out
            assert out["embeddings"][0] is not None


def test_score_reads_through_missing_embeddings(served):
    """Scoring candidates with no stored TAE computes them with the pinned version, writes them
    back, and says which; an item outside the FM's vocabulary stays missing."""
    client, repo = served
    experts = {e["name"]: e["fm_version"] for e in client.get("/v1/experts").json()["experts"]}
    name = next(n for n, v in experts.items() if v == "v1")
    user, logged = _logged(repo, "v1", 5)
    items = [logged[0], *_fresh(logged, 3), UNKNOWN_ITEM]
    first = client.post(f"/v1/experts/{name}/score", json={"user_id": user, "item_ids": items})
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["computed_embeddings"] == [1, 2, 3] and out["missing_embeddings"] == [4]
    lookup = client.post(
        "/v1/embeddings/lookup", json={"user_id": user, "item_ids": items, "fm_version": "v1"}
    ).json()
    assert lookup["computed"] == [] and lookup["missing"] == [4]  # written back by the score
    again = client.post(f"/v1/experts/{name}/score", json={"user_id": user, "item_ids": items}).json()
    assert again["computed_embeddings"] == [] and again["missing_embeddings"] == [4]
    np.testing.assert_allclose(again["scores"], out["scores"], rtol=1e-5)
