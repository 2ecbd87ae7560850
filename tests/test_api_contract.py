"""The REST edge's contract over HTTP (uvicorn on loopback), on the tiny demo's real stores.

- What a request may hold: ids are JSON integers in int64's range, nothing coerced; NaN,
  Infinity and friends are 422s with a readable detail, never a 500.
- Every error body is `{"detail": "<one string>"}` naming the field, never echoing the input;
  the OpenAPI document lists each route's error codes and prints integer bounds exactly.
- Read-through computes and writes back only for users with history (item 0 included), and
  no format ever carries NaN/Inf (or, in f16, a value float16 cannot hold).
- One log line per request.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading

import httpx
import numpy as np
import pandas as pd
import pytest
import redis
import yaml

from api.app import create_app
from api.settings import Settings
from store_bridge.feast_layout import (
    encode_float_lists,
    encode_timestamp_us,
    entity_keys,
    feature_field,
    ts_field,
)
from store_bridge.repo import view_name
from tests.conftest import LiveServer

LOOKUP = "/v1/embeddings/lookup"
OLD_TS_US = 10**15  # 2001: older than anything read-through writes, so it may overwrite
UNKNOWN_USERS = [999_999, -5, 2**63 - 1]  # no history in the demo's event log


@pytest.fixture(scope="module")
def served(demo_repo, redis_url):
    repo, report = demo_repo
    app = create_app(Settings(repo=repo.path, redis_url=redis_url), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, repo, report


@pytest.fixture(scope="module")
def rdb(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _v1_expert(report) -> str:
    return next(n for n, v in sorted(report.experts.items()) if v == "v1")


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity tokens (not JSON, and unreadable by most clients)."""

    def refuse(token: str):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _detail(r: httpx.Response) -> str:
    """The body of an error answer, checked to be exactly {"detail": "<string>"}."""
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = _strict_json(r.text)
    assert list(body) == ["detail"] and isinstance(body["detail"], str), body
    return body["detail"]


def _metric(client: httpx.Client, name: str, label: str) -> float:
    prefix = f"{name}{{{label}}} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def _put(rdb, project: str, version: str, user: int, item: int, value: bytes, ts_us: int) -> None:
    """Store raw bytes as one (user, item) row of a version, in Feast's layout."""
    view = view_name(version)
    (key,) = entity_keys(project, {"user_id": np.array([user]), "item_id": np.array([item])})
    rdb.hset(key, mapping={feature_field(view, "embedding"): value,
                           ts_field(view): encode_timestamp_us(ts_us)})


def _row(vector: np.ndarray) -> bytes:
    return encode_float_lists(np.asarray(vector, dtype=np.float32)[None, :])[0]


def _key(project: str, user: int, item: int) -> bytes:
    return entity_keys(project, {"user_id": np.array([user]), "item_id": np.array([item])})[0]


def _matrix(r: httpx.Response) -> np.ndarray:
    dtype = {"f32": "<f4", "f16": "<f2"}[r.headers["x-dtype"]]
    return np.frombuffer(r.content, dtype=dtype).reshape(-1, int(r.headers["x-dim"]))


def _known_users(repo) -> list[int]:
    """Users with history in the event log, last first (the read-only tests use the first)."""
    events = pd.read_parquet(repo.events_dir / "events.parquet", columns=["user_id"])
    return sorted({int(u) for u in events["user_id"]}, reverse=True)


# --- what a request may hold -------------------------------------------------------------

BASE = '"item_ids": [1, 2], "fm_version": "v1"'

# (raw body, needles the detail must hold). Bodies are raw text: NaN, Infinity and 1e400 are
# what Python's json module (and so Starlette) accepts, though they are not JSON.
BAD_BODIES = [
    ('{"user_id": NaN, ' + BASE + "}", ["user_id", "integer", "non-finite"]),
    ('{"user_id": Infinity, ' + BASE + "}", ["user_id", "non-finite"]),
    ('{"user_id": -Infinity, ' + BASE + "}", ["user_id", "non-finite"]),
    ('{"user_id": 1e400, ' + BASE + "}", ["user_id", "non-finite"]),
    ('{"user_id": 1, "item_ids": [1, NaN], "fm_version": "v1"}', ["item_ids[1]", "non-finite"]),
    ('{"user_id": 1, "item_ids": [1e400], "fm_version": "v1"}', ["item_ids[0]", "non-finite"]),
    ('{"user_id": "3", ' + BASE + "}", ["user_id", "got a string"]),
    ('{"user_id": 3.0, ' + BASE + "}", ["user_id", "got a float"]),
    ('{"user_id": 1e3, ' + BASE + "}", ["user_id", "got a float"]),
    ('{"user_id": true, ' + BASE + "}", ["user_id", "got a boolean"]),
    ('{"user_id": null, ' + BASE + "}", ["user_id", "got null"]),
    ('{"user_id": 1, "item_ids": [1, false], "fm_version": "v1"}', ["item_ids[1]", "boolean"]),
    ('{"user_id": 1, "item_ids": ["7"], "fm_version": "v1"}', ["item_ids[0]", "string"]),
    ('{"user_id": 9223372036854775808, ' + BASE + "}",
     ["user_id", "less than or equal to 9223372036854775807"]),
    ('{"user_id": -9223372036854775809, ' + BASE + "}",
     ["user_id", "greater than or equal to -9223372036854775808"]),
    ('{"user_id": 1, "item_ids": [18446744073709551616], "fm_version": "v1"}',
     ["item_ids[0]", "less than or equal"]),
    ('{"user_id": 1, ' + BASE + ', "fromat": "f16"}', ["fromat", "unknown field"]),
    ('{"user_id": 1, "item_ids": 5, "fm_version": "v1"}', ["item_ids", "valid list"]),
    ('{"user_id": 1, "item_ids": [], "fm_version": "v1"}', ["item_ids", "at least 1"]),
    ('{"item_ids": [1]}', ["user_id: required"]),
    ("[1, 2]", ["body", "JSON object", "array"]),
    ('{"user_id": 1, ' + BASE, ["body", "not valid JSON"]),
    ('{"user_id": 1' + "1" * 5000 + ", " + BASE + "}", ["body", "not valid JSON"]),
]


@pytest.mark.parametrize(("raw", "needles"), BAD_BODIES)
@pytest.mark.parametrize("route", ["lookup", "score"])
def test_invalid_bodies_are_422_with_a_readable_detail(served, raw, needles, route):
    client, _, report = served
    path = LOOKUP if route == "lookup" else f"/v1/experts/{_v1_expert(report)}/score"
    if route == "score":  # the same values without the lookup-only field
        raw = raw.replace(', "fm_version": "v1"', "")
    r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    detail = _detail(r)
    for needle in needles:
        assert needle in detail, detail
    assert len(detail) < 500


def test_lookup_format_and_selectors_are_strict(served):
    client, _, _ = served
    for body, needle in [
        ({"user_id": 1, "item_ids": [1], "fm_version": 1}, "fm_version"),
        ({"user_id": 1, "item_ids": [1], "fm_version": "v1", "format": "f64"}, "format"),
        ({"user_id": 1, "item_ids": [1], "fm_version": "v1", "surface": 3}, "surface"),
        ({"user_id": 1, "item_ids": [1], "fm_version": "v1", "expert": "x"}, "exactly one"),
        ({"user_id": 1, "item_ids": [1], "fm_version": ""}, "fm_version"),
        ({"user_id": 1, "item_ids": [1], "fm_version": "v" * 5000}, "at most 128 characters"),
        ({"user_id": 1, "item_ids": [1], "expert": "e" * 5000}, "at most 128 characters"),
    ]:
        r = client.post(LOOKUP, json=body)
        assert r.status_code == 422 and needle in _detail(r), r.text
        assert len(r.content) < 300  # a long name is not echoed back
    r = client.post(f"/v1/experts/{'e' * 3000}/score", json={"user_id": 1, "item_ids": [1]})
    assert r.status_code == 422 and len(r.content) < 300
    assert _detail(r) == "path parameter name: String should have at most 128 characters"


def test_oversized_item_ids_are_not_echoed(served):
    client, _, _ = served
    r = client.post(LOOKUP, json={"user_id": 1, "item_ids": list(range(2001)), "fm_version": "v1"})
    assert r.status_code == 422
    assert _detail(r) == "item_ids: List should have at most 2000 items after validation, not 2001"
    # 2,001 invalid ids: a handful named, the rest counted
    bad = '{"user_id": 1, "fm_version": "v1", "item_ids": [' + ", ".join(['"x"'] * 1500) + "]}"
    r = client.post(LOOKUP, content=bad, headers={"Content-Type": "application/json"})
    detail = _detail(r)
    assert r.status_code == 422 and detail.count("item_ids[") == 5, detail
    assert detail.endswith("(and 1495 more)") and len(r.content) < 600


def test_int64_extremes_and_negative_ids_are_valid_keys(served, rdb):
    """Accepted, never computed (outside the vocabulary / no history), nothing written."""
    client, repo, _ = served
    before = rdb.dbsize()
    for user, items in [(-(2**63), [2**63 - 1, -1, 0]), (2**63 - 1, [-(2**63), 5])]:
        r = client.post(LOOKUP, json={"user_id": user, "item_ids": items, "fm_version": "v1"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["missing"] == list(range(len(items))) and out["computed"] == []
    assert rdb.dbsize() == before


# --- errors: one shape everywhere ----------------------------------------------------------


def test_every_error_answer_is_a_detail_string(served, demo_repo, redis_url, tmp_path):
    client, _, report = served
    name = _v1_expert(report)
    cases = [
        (client.get("/v1/nowhere"), 404, "Not Found"),
        (client.get(LOOKUP), 405, "Method Not Allowed"),
        (client.post(LOOKUP, json={"user_id": 1, "item_ids": [1], "fm_version": "v9"}), 404, "v9"),
        (client.post("/v1/experts/nope/score", json={"user_id": 1, "item_ids": [1]}), 404, "nope"),
        (client.post("/v1/admin/experts/reload"), 403, "FOUNDEX_ADMIN_TOKEN"),
        (client.post("/v1/admin/fm-versions/v1/retire?force=maybe"), 403, "FOUNDEX_ADMIN_TOKEN"),
    ]
    for r, status, needle in cases:
        assert r.status_code == status, r.text
        assert needle in _detail(r)

    # The files disagree: an expert pinning a version the manifest does not hold is a 409 on
    # both routes that use it; a config file that does not load at all is a JSON 500.
    repo, _ = demo_repo
    path = tmp_path / "repo"
    shutil.copytree(repo.path, path, ignore=shutil.ignore_patterns("redis"))
    cfg_path = path / "data" / "experts" / f"{name}.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["fm_version"] = "v9"
    cfg_path.write_text(yaml.safe_dump(cfg))
    app = create_app(Settings(repo=path, redis_url=redis_url), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        for r in [c.post(LOOKUP, json={"user_id": 1, "item_ids": [1], "expert": name}),
                  c.post(f"/v1/experts/{name}/score", json={"user_id": 1, "item_ids": [1]})]:
            assert r.status_code == 409, r.text
            assert f"expert {name!r} pins unknown FM version 'v9' (known: v1, v2)" in _detail(r)
        (path / "data" / "experts" / "broken.yaml").write_text("name: [unclosed\n")
        r = c.get("/v1/experts", headers={"X-Request-ID": "broken-1"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "broken-1"
        assert _detail(r) == "internal server error (request id broken-1)"


def test_openapi_lists_each_routes_errors_and_exact_integer_bounds(served):
    client, _, _ = served
    r = client.get("/openapi.json")
    spec = r.json()
    paths = spec["paths"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}

    def codes(path: str) -> dict:
        return paths[path]["post"]["responses"]

    for path in (LOOKUP, "/v1/experts/{name}/score"):
        assert {"401", "404", "409", "413", "422", "503"} <= set(codes(path)), path
    for path in ("/v1/admin/fm-versions/{version}/retire", "/v1/admin/fm-versions",
                 "/v1/admin/experts/reload"):
        assert {"401", "403"} <= set(codes(path)), path
    assert "404" in codes("/v1/admin/fm-versions/{version}/retire")
    for path, ops in paths.items():
        for op in ops.values():
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")) and path != "/readyz":
                    assert resp["content"]["application/json"]["schema"] == error_ref, (path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]

    req = spec["components"]["schemas"]["LookupRequest"]
    user = req["properties"]["user_id"]
    assert (user["minimum"], user["maximum"]) == (-(2**63), 2**63 - 1)
    assert req["properties"]["item_ids"]["items"]["maximum"] == 2**63 - 1
    assert req["additionalProperties"] is False
    ttl = spec["components"]["schemas"]["PublishRequest"]["properties"]["ttl_days"]
    assert ttl["maximum"] == 3650
    assert "9.223372036854776e+18" not in r.text and "3650.0" not in r.text


# --- read-through: known users only, item 0 included ----------------------------------------


def test_unknown_users_read_through_writes_nothing(served, rdb):
    client, repo, report = served
    skipped = 'reason="unknown_user"'
    before = _metric(client, "foundex_read_through_skipped_total", skipped)
    keys_before = rdb.dbsize()
    for user in UNKNOWN_USERS:
        r = client.post(LOOKUP, json={"user_id": user, "item_ids": [0, 1, 2], "fm_version": "v1"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["missing"] == [0, 1, 2] and out["computed"] == []
        assert out["embeddings"] == [None, None, None]
        s = client.post(f"/v1/experts/{_v1_expert(report)}/score",
                        json={"user_id": user, "item_ids": [0, 1, 2]})
        assert s.status_code == 200, s.text
        assert s.json()["missing_embeddings"] == [0, 1, 2]
        assert s.json()["computed_embeddings"] == []
        for item in (0, 1, 2):
            assert rdb.exists(_key(repo.project, user, item)) == 0
    assert rdb.dbsize() == keys_before
    after = _metric(client, "foundex_read_through_skipped_total", skipped)
    assert after - before == 2 * 3 * len(UNKNOWN_USERS)


def test_read_through_computes_item_zero_and_skips_unknown_items(served, rdb):
    from store_bridge.fm_tier import load_engine, repo_histories

    client, repo, _ = served
    version = repo.load_manifest().versions["v1"]
    user = _known_users(repo)[0]
    n_items = 80  # the tiny demo's vocabulary: items 0..79
    for item in (0, 1):  # nothing stored for this pair, whatever ran before
        rdb.hdel(_key(repo.project, user, item), feature_field(view_name("v1"), "embedding"))
    skipped = 'reason="unknown_item"'
    before = _metric(client, "foundex_read_through_skipped_total", skipped)
    body = {"user_id": user, "item_ids": [0, 1, n_items, -1, 10**12], "fm_version": "v1"}
    first = client.post(LOOKUP, json=body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["computed"] == [0, 1] and out["missing"] == [2, 3, 4]
    assert _metric(client, "foundex_read_through_skipped_total", skipped) - before == 3

    # The value is the FM's TAE for this user at the written-back row's event time.
    raw_ts = rdb.hget(_key(repo.project, user, 0), ts_field(view_name("v1")))
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.ParseFromString(raw_ts)
    ts_us = stamp.seconds * 1_000_000 + stamp.nanos // 1000
    engine = load_engine(repo, version, repo_histories(repo))
    want = engine.compute_request(user, ts_us, engine.config.surfaces[0], np.array([0, 1]))
    got = np.asarray(out["embeddings"][:2], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not np.allclose(got[0], got[1])

    again = client.post(LOOKUP, json=body).json()
    assert again["computed"] == [] and again["missing"] == [2, 3, 4]
    np.testing.assert_array_equal(np.asarray(again["embeddings"][:2], dtype=np.float32), got)


# --- values on the way out ---------------------------------------------------------------


def test_unservable_rows_rule():
    """The REST edge's own guard (the store reports NaN/Inf rows already): rows outside
    `missing` with a non-finite value, or beyond the bound, are caught; missing rows are not
    reported twice."""
    from api.services.lookup import F16_MAX
    from api.services.lookup import unservable as _unservable

    m = np.array([[1.0, 2.0], [np.nan, 0.0], [np.inf, 0.0], [-np.inf, 1.0], [70000.0, 0.0],
                  [65504.0, -65504.0], [np.nan, np.nan]], dtype=np.float32)
    assert _unservable(m, [6], np.inf) == [1, 2, 3]
    assert _unservable(m, [6], F16_MAX) == [1, 2, 3, 4]
    assert _unservable(m, [1, 2, 3, 4, 6], F16_MAX) == []


def test_bad_stored_rows_never_leave_in_any_format(served, rdb):
    """Rows holding NaN, +Inf, another width, or 70000.0 (beyond float16), for a user with no
    history (so read-through leaves them missing): JSON, f32 and f16 agree on one rule."""
    client, repo, report = served
    dim = repo.load_manifest().versions["v1"].dim
    user = 5_000_321
    good = np.linspace(-1, 1, dim, dtype=np.float32)
    nan, inf, big = good.copy(), good.copy(), good.copy()
    nan[3], inf[4], big[5] = np.nan, np.inf, 70000.0
    rows = {1: _row(good), 2: _row(nan), 3: _row(inf), 4: _row(big),
            5: _row(np.ones(2 * dim))}  # a 64-d row under the 32-d view
    for item, value in rows.items():
        _put(rdb, repo.project, "v1", user, item, value, OLD_TS_US)
    body = {"user_id": user, "item_ids": [1, 2, 3, 4, 5, 6], "fm_version": "v1"}
    undecodable = 'reason="undecodable"'
    f16_range = 'reason="f16_range"'
    u0 = _metric(client, "foundex_unusable_rows_total", undecodable)
    f0 = _metric(client, "foundex_unusable_rows_total", f16_range)

    r = client.post(LOOKUP, json=body)
    assert r.status_code == 200, r.text
    out = _strict_json(r.text)
    assert out["missing"] == [1, 2, 4, 5] and out["computed"] == []
    assert [e is None for e in out["embeddings"]] == [False, True, True, False, True, True]
    np.testing.assert_array_equal(np.asarray(out["embeddings"][0], np.float32), good)
    np.testing.assert_array_equal(np.asarray(out["embeddings"][3], np.float32), big)

    r32 = client.post(LOOKUP, json={**body, "format": "f32"})
    assert r32.status_code == 200 and r32.headers["x-missing"] == "1,2,4,5"
    m32 = _matrix(r32)
    assert np.isfinite(m32).all() and not m32[[1, 2, 4, 5]].any()
    np.testing.assert_array_equal(m32[[0, 3]], np.stack([good, big]))

    r16 = client.post(LOOKUP, json={**body, "format": "f16"})
    assert r16.status_code == 200 and r16.headers["x-missing"] == "1,2,3,4,5"
    m16 = _matrix(r16)
    assert np.isfinite(m16).all() and not m16[1:].any()
    np.testing.assert_array_equal(m16[0], good.astype(np.float16))

    # scoring reads the same rows: the bad ones are scored without a TAE, the rest with one
    s = client.post(f"/v1/experts/{_v1_expert(report)}/score",
                    json={"user_id": user, "item_ids": body["item_ids"]})
    assert s.status_code == 200, s.text
    scored = _strict_json(s.text)
    assert scored["missing_embeddings"] == [1, 2, 4, 5]
    assert np.isfinite(np.asarray(scored["scores"])).all()

    # 3 undecodable rows (NaN, Inf, 64-d) per read, 4 reads; the 70000.0 row once, in f16
    assert _metric(client, "foundex_unusable_rows_total", undecodable) - u0 == 12
    assert _metric(client, "foundex_unusable_rows_total", f16_range) - f0 == 1


def test_a_bad_row_of_a_known_user_is_computed_again_and_replaced(served, rdb):
    """Read-through treats a NaN row or one of another width like a missing one: computed
    again, served, and written over the bad bytes."""
    client, repo, _ = served
    dim = repo.load_manifest().versions["v1"].dim
    user = _known_users(repo)[1]
    nan = np.zeros(dim, np.float32)
    nan[0] = np.nan
    _put(rdb, repo.project, "v1", user, 3, _row(nan), OLD_TS_US)
    _put(rdb, repo.project, "v1", user, 4, _row(np.ones(2 * dim)), OLD_TS_US)
    body = {"user_id": user, "item_ids": [3, 4], "fm_version": "v1"}
    first = client.post(LOOKUP, json=body)
    assert first.status_code == 200, first.text
    out = _strict_json(first.text)
    assert out["computed"] == [0, 1] and out["missing"] == []
    computed = np.asarray(out["embeddings"], np.float32)
    assert computed.shape == (2, dim) and np.isfinite(computed).all()

    again = client.post(LOOKUP, json={**body, "format": "f32"})
    assert again.headers["x-computed"] == "" and again.headers["x-missing"] == ""
    np.testing.assert_array_equal(_matrix(again), computed)


# --- logs ------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_each_request_is_logged_once(demo_repo, redis_url, capfd):
    """uvicorn at log level info (as `foundex serve` runs it) writes no access line of its
    own: foundex's JSON line, with the request id, is the only one."""
    import uvicorn

    repo, _ = demo_repo
    app = create_app(Settings(repo=repo.path, redis_url=redis_url), redis_url)
    server = LiveServer(app)
    server.server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=server.port, log_level="info")
    )
    server.thread = threading.Thread(target=server.server.run, daemon=True)
    capture = _Capture()
    logging.getLogger("foundex.api").addHandler(capture)
    try:
        with server, httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post(LOOKUP, json={"user_id": 1, "item_ids": [1], "fm_version": "v1"},
                            headers={"X-Request-ID": "once-1"})
            assert r.status_code == 200, r.text
            client.get("/healthz", headers={"X-Request-ID": "once-2"})
    finally:
        logging.getLogger("foundex.api").removeHandler(capture)
    out = capfd.readouterr()
    printed = out.out + out.err
    assert "Uvicorn running on" in printed  # uvicorn's own log is on, at info
    assert "HTTP/1.1" not in printed, printed  # but it wrote no access line
    lines = [rec for rec in capture.records if rec.getMessage() == "request"]
    assert [(rec.fields["route"], rec.fields["status"]) for rec in lines] == [
        (LOOKUP, 200), ("/healthz", 200)
    ]
