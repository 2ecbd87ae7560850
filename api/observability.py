"""Prometheus metrics, request ids and structured (JSON) logs.

Every app owns its CollectorRegistry, so several apps in one process (tests) never collide.
The access log line holds method, route template, status, latency and the request id: never
query strings, headers (tokens) or bodies. It is the only line per request: the app turns
uvicorn's own access log off (`silence_uvicorn_access_log`).

An exception no handler claimed becomes a JSON 500 `{"detail": "..."}` here, naming the
request id, with the traceback in the log line only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from collections.abc import Iterator

    from prometheus_client.metrics_core import Metric

    from api.services.context import ServiceContext

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

log = logging.getLogger("foundex.api")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "foundex_http_request_duration_seconds",
            "Request latency by route template, method and status",
            ["route", "method", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.store_errors = Counter(
            "foundex_store_errors_total",
            "Online store calls that failed (down, unreachable, timed out)",
            ["op"],
            registry=self.registry,
        )
        self.embeddings = Counter(
            "foundex_embeddings_total",
            "Embedding rows served, by where they came from",
            ["source"],  # stored | computed | missing
            registry=self.registry,
        )
        self.hit_ratio = Gauge(
            "foundex_store_hit_ratio",
            "Share of requested embedding rows found in Redis since start",
            registry=self.registry,
        )
        self.unusable = Counter(
            "foundex_unusable_rows_total",
            "Stored embedding rows not served as they are, by reason: undecodable (not a "
            "float_list of the view's width, or holding NaN/Inf), non_finite (NaN/Inf caught "
            "at the REST edge), f16_range (a value beyond float16's range, in an f16 answer)",
            ["reason"],
            registry=self.registry,
        )
        self.read_through_skipped = Counter(
            "foundex_read_through_skipped_total",
            "Missing rows read-through did not compute, by reason: unknown_user (no events "
            "in the online histories), unknown_item (outside the FM's item vocabulary)",
            ["reason"],
            registry=self.registry,
        )
        self.stale_rows = Counter(
            "foundex_stale_rows_total",
            "Stored embedding rows older than their user's newest event in the online "
            "histories, by outcome: recomputed (read-through computed and wrote back a TAE as "
            "of the request), served (read-through could not: the stored row was served)",
            ["outcome"],
            registry=self.registry,
        )
        self.events_ingested = Counter(
            "foundex_events_ingested_total",
            "Events appended to the events stream (POST /v1/events)",
            registry=self.registry,
        )
        self.events_duplicates = Counter(
            "foundex_events_duplicates_total",
            "Accepted events the stream already held (same id within the dedup window): "
            "not appended again",
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "foundex_events_rejected_total",
            "Event rows refused by validation (POST /v1/events)",
            registry=self.registry,
        )
        # --- served impressions (the logging tier's input) ---
        self.impressions_not_logged = Counter(
            "foundex_impressions_not_logged_total",
            "Served impressions (one per candidate) that lookups and scoring could not append "
            "to the impressions stream (stream full, Redis error, no dataset spec): their "
            "TAEs are not logged and they join no feedback",
            registry=self.registry,
        )
        # The live loop's lag and the impression buffer, read when /metrics is scraped; the
        # app's lifespan points it at the service's context.
        self.live = LiveLoopCollector()
        self.registry.register(self.live)
        self._hits = 0
        self._requested = 0

    def rows(self, stored: int, computed: int, missing: int) -> None:
        self.embeddings.labels("stored").inc(stored)
        self.embeddings.labels("computed").inc(computed)
        self.embeddings.labels("missing").inc(missing)
        self._hits += stored
        self._requested += stored + computed + missing
        if self._requested:
            self.hit_ratio.set(self._hits / self._requested)


class LiveLoopCollector:
    """Gauges of the live loop, read from `context` at scrape time (nothing when it is None):

    foundex_stream_up{stream}                    1 when the stream's lag could be read, else 0
    foundex_stream_lag_events{stream,group}      events appended, not acknowledged by the group
    foundex_stream_pending_entries{stream,group} entries delivered, not acknowledged yet
    foundex_stream_oldest_unacked_seconds{stream,group}
                                                 age of the oldest entry the group has not
                                                 acknowledged (0 when none): the group's delay
    foundex_impression_buffer_rows               served impressions waiting for the stream
    foundex_impression_buffer_{submitted,appended,refused}_total, ..._failed_flushes_total
    foundex_fm_sync_seq{version}                 the weight-sync seq the served weights stand at

    Streams are `ctx.events_stream` and `ctx.impressions_stream`; a group appears once it
    exists (a consumer created it, or ingestion did for the events stream's own groups). A
    Redis error while reading a stream is reported as `foundex_stream_up 0` for it, never as a
    failed scrape; a hung Redis costs the scrape at most the stream clients' timeouts."""

    def __init__(self) -> None:
        self.context: ServiceContext | None = None

    def describe(self) -> list[Metric]:
        return []  # the series depend on what Redis holds: known only at scrape time

    def collect(self) -> Iterator[Metric]:
        ctx = self.context
        if ctx is None:
            return
        yield from self._streams(ctx)
        yield from self._buffer(ctx)
        yield from self._sync(ctx)

    @staticmethod
    def _sync(ctx: ServiceContext) -> Iterator[Metric]:
        # Only engines this process loaded (a lookup or score of the version loads it).
        tier = ctx.__dict__.get("fm_tier")
        seqs = tier.served_seqs() if tier is not None else {}
        gauge = GaugeMetricFamily("foundex_fm_sync_seq", "The weight-sync sequence the serving "
                                  "tier's weights of the version stand at (0: the published "
                                  "checkpoint)", labels=["version"])  # fmt: skip
        for version, seq in sorted(seqs.items()):
            gauge.add_metric([version], seq)
        yield gauge

    def _streams(self, ctx: ServiceContext) -> Iterator[Metric]:
        import redis

        up = GaugeMetricFamily("foundex_stream_up", "Whether the stream's consumer-group lag "
                               "could be read from Redis at this scrape (1) or not (0)",
                               labels=["stream"])  # fmt: skip
        lag = GaugeMetricFamily("foundex_stream_lag_events", "Events appended to the stream "
                                "that the consumer group has not acknowledged",
                                labels=["stream", "group"])  # fmt: skip
        pending = GaugeMetricFamily("foundex_stream_pending_entries", "Stream entries (record "
                                    "batches) delivered to the group's consumers, not "
                                    "acknowledged yet", labels=["stream", "group"])  # fmt: skip
        oldest = GaugeMetricFamily("foundex_stream_oldest_unacked_seconds", "Age of the oldest "
                                   "stream entry the group has not acknowledged (0: none)",
                                   labels=["stream", "group"])  # fmt: skip
        for name, build in (("events", lambda: ctx.events_stream),
                            ("impressions", lambda: ctx.impressions_stream)):  # fmt: skip
            try:
                groups = build().lag()
            except (redis.RedisError, OSError) as e:
                up.add_metric([name], 0)
                log.warning("stream lag unavailable",
                            extra={"fields": {"stream": name, "error": str(e)}})  # fmt: skip
                continue
            up.add_metric([name], 1)
            for g in groups:
                lag.add_metric([name, g.group], g.events)
                pending.add_metric([name, g.group], g.pending_entries)
                oldest.add_metric([name, g.group], g.oldest_unacked_s)
        yield from (up, lag, pending, oldest)

    @staticmethod
    def _buffer(ctx: ServiceContext) -> Iterator[Metric]:
        # Built by the first logged lookup; until then every figure is 0 (not built here).
        buffer = ctx.__dict__.get("impression_buffer")
        rows = buffer.pending_rows if buffer is not None else 0
        yield GaugeMetricFamily("foundex_impression_buffer_rows", "Served impressions held in "
                                "memory, waiting to be appended to the impressions stream",
                                value=rows)  # fmt: skip
        for field, doc in (
            ("submitted", "Served impressions the buffer took in"),
            ("appended", "Served impressions appended to the impressions stream"),
            ("refused", "Served impressions refused because the buffer was full"),
            ("failed_flushes", "Flushes to the impressions stream that failed (retried)"),
        ):
            value = getattr(buffer.stats, field) if buffer is not None else 0
            yield CounterMetricFamily(f"foundex_impression_buffer_{field}", doc, value=value)


class ObservabilityMiddleware:
    """Request id (echoed or generated), latency histogram per route, one JSON log line."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _VALID_ID.match(rid):
            rid = uuid.uuid4().hex
        token = request_id_var.set(rid)
        status = 500
        t0 = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            # Nothing claimed it: a JSON 500 (never a bare text page, never the exception's
            # text, which may quote the request), traceback in the log with the request id.
            status = 500
            log.exception("unhandled error", extra={"fields": {"route": _template(scope)}})
            if started:
                raise  # a half-sent answer cannot be replaced; the server drops the connection
            await _send_json(send_with_id, 500, f"internal server error (request id {rid})")
        finally:
            elapsed = time.perf_counter() - t0
            template = _template(scope)
            self.metrics.latency.labels(template, scope["method"], str(status)).observe(elapsed)
            log.info(
                "request",
                extra={
                    "fields": {
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "ms": round(elapsed * 1000, 3),
                    }
                },
            )
            request_id_var.reset(token)


def _template(scope) -> str:
    return getattr(scope.get("route"), "path", None) or "<unmatched>"


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    """One human-readable line: the message, then the record's fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {"request_id": request_id_var.get(), **getattr(record, "fields", {})}
        line = " ".join([record.getMessage(), *(f"{k}={v}" for k, v in fields.items())])
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(json_logs: bool) -> None:
    """One handler on the "foundex.api" logger (idempotent); JSON lines unless disabled."""
    logger = logging.getLogger("foundex.api")
    if getattr(logger, "_foundex_configured", False):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else PlainFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger._foundex_configured = True  # type: ignore[attr-defined]


def silence_uvicorn_access_log() -> None:
    """Turn uvicorn's access log off: the middleware above already writes one line per
    request, with the request id, so uvicorn's would say it twice.

    uvicorn decides per connection whether to log access by whether "uvicorn.access" has
    handlers (what `uvicorn.run(..., access_log=False)` arranges), so this must run after
    uvicorn configured its logging and before it accepts connections: at app startup.
    """
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
