"""`/metrics` carries the live loop's lag (per stream and consumer group) and the impression
buffer's figures, read at scrape time over HTTP from a real Redis; a Redis that is gone turns
into `foundex_stream_up 0`, never into a failed scrape."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from api.app import create_app
from api.settings import Settings
from store_bridge.streams.histories import HistoriesConsumer
from tests.conftest import LiveServer, start_redis
from tests.test_stream_ingest import context, json_rows, live_repo

EVENTS = "/v1/events"


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition text (None when absent); the exposition
    writes labels sorted by name."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, flags=re.MULTILINE)
    return None if found is None else float(found.group(1))


@pytest.fixture
def served(tmp_path, redis_url):
    repo = live_repo(tmp_path / "repo")
    app = create_app(Settings(repo=repo, redis_url=redis_url), redis_url)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield client, repo, app


def test_metrics_carry_each_groups_lag(served, redis_url):
    """Ingested events are every group's lag until a consumer acknowledges them; entries
    delivered but not acknowledged are pending, with the age of the oldest."""
    client, repo, _ = served
    assert client.post(EVENTS, json={"events": json_rows(5)}).status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "foundex_stream_up", stream="events") == 1
    for group in ("histories", "offline"):
        assert metric(text, "foundex_stream_lag_events", stream="events", group=group) == 5
        assert metric(text, "foundex_stream_pending_entries", stream="events", group=group) == 0
        assert metric(text, "foundex_stream_oldest_unacked_seconds", stream="events",
                      group=group) >= 0  # fmt: skip

    ctx = context(repo, redis_url)
    try:
        assert HistoriesConsumer(ctx.events_stream, ctx.histories).drain() == 5
        delivered = ctx.events_stream.read("offline", "stuck", count=10, block_ms=None,
                                           pending=False)  # fmt: skip
        assert len(delivered) == 1  # one entry (record batch) of 5 events, never acknowledged
        text = client.get("/metrics").text
        assert metric(text, "foundex_stream_lag_events", stream="events", group="histories") == 0
        assert metric(text, "foundex_stream_lag_events", stream="events", group="offline") == 5
        assert metric(text, "foundex_stream_pending_entries", stream="events",
                      group="offline") == 1  # fmt: skip
        assert metric(text, "foundex_stream_oldest_unacked_seconds", stream="events",
                      group="histories") == 0  # fmt: skip
        # the impressions stream answers too; no group yet: no lag series for it
        assert metric(text, "foundex_stream_up", stream="impressions") == 1
        assert not re.search(r'^foundex_stream_lag_events\{.*stream="impressions"', text,
                             flags=re.MULTILINE)
    finally:
        ctx.close()


def test_metrics_carry_the_impression_buffer(served, redis_url):
    """Before anything is served the buffer's figures are 0; impressions submitted and flushed
    are counted, and the logging group's lag shows them on the impressions stream."""
    client, repo, app = served
    text = client.get("/metrics").text
    assert metric(text, "foundex_impression_buffer_rows") == 0
    assert metric(text, "foundex_impression_buffer_submitted_total") == 0
    service = app.state.context  # the server's own context (the app runs in this process)
    service.impressions_stream.ensure_groups()  # the logging group, as its consumer would
    assert service.impression_buffer.submit(7, np.array([1, 2, 3, 3]), 1_767_607_200_000_000,
                                            "home")  # fmt: skip
    assert service.impression_buffer.flush()
    text = client.get("/metrics").text
    assert metric(text, "foundex_impression_buffer_submitted_total") == 3  # 3 distinct items
    assert metric(text, "foundex_impression_buffer_appended_total") == 3
    assert metric(text, "foundex_impression_buffer_refused_total") == 0
    assert metric(text, "foundex_impression_buffer_rows") == 0
    assert metric(text, "foundex_stream_lag_events", stream="impressions", group="logging") == 3


def test_metrics_survive_redis_going_away(tmp_path):
    """With the Redis stopped, /metrics still answers 200 with the request metrics, and each
    stream reports up 0 instead of lag."""
    server = start_redis(tmp_path / "redis")
    repo = live_repo(tmp_path / "repo")
    settings = Settings(repo=repo, redis_url=server.url)
    app = create_app(settings, server.url)
    try:
        with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
            assert client.post(EVENTS, json={"events": json_rows(2)}).status_code == 200
            text = client.get("/metrics").text
            assert metric(text, "foundex_stream_lag_events", stream="events", group="offline") == 2
            server.stop()
            r = client.get("/metrics")
            assert r.status_code == 200
            assert metric(r.text, "foundex_stream_up", stream="events") == 0
            assert metric(r.text, "foundex_stream_up", stream="impressions") == 0
            assert metric(r.text, "foundex_stream_lag_events", stream="events",
                          group="offline") is None  # fmt: skip
            assert "foundex_http_request_duration_seconds_count" in r.text
    finally:
        server.stop()
