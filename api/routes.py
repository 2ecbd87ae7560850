"""REST routes, one module-level router per resource: health, versions, experts, embeddings,
events, admin. A route parses (pydantic schemas), calls a use-case of `api.services` with the shared
context (a FastAPI dependency), records metrics from what it returns and presents the answer;
domain errors become HTTP codes in `api.http_errors`."""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.json_rows import lookup_json
from api.observability import Metrics
from api.schemas import (
    DTYPES,
    E401,
    E413,
    E422,
    E503,
    EVENTS_422,
    LOOKUP_ERRORS,
    OCTET,
    EventsRequest,
    EventsResponse,
    ExpertInfo,
    ExpertList,
    Health,
    LookupRequest,
    LookupResponse,
    PathName,
    PublishRequest,
    ReloadResponse,
    RetireResponse,
    ScoreRequest,
    ScoreResponse,
    VersionInfo,
    VersionList,
    _error,
)
from api.security import require_admin, require_read
from api.services import lifecycle
from api.services.context import ServiceContext
from api.services.errors import Overloaded
from api.services.events import IngestResult, ingest
from api.services.lookup import F16_MAX, LookupStats, lookup, score


# Dependencies that do no I/O are `async def`: FastAPI then runs them inline instead of
# sending each one through the thread pool (a measurable cost on the lookup hot path).
async def get_context(request: Request) -> ServiceContext:
    return request.app.state.context


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


Context = Annotated[ServiceContext, Depends(get_context)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


def record(m: Metrics, stats: LookupStats | None) -> None:
    """A lookup's or score's counts into the Prometheus metrics."""
    if stats is None:
        return
    for reason, n in stats.unusable.items():
        if n:
            m.unusable.labels(reason).inc(n)
    for reason, n in stats.skipped.items():
        if n:
            m.read_through_skipped.labels(reason).inc(n)
    for outcome, n in stats.stale.items():
        if n:
            m.stale_rows.labels(outcome).inc(n)
    if stats.write_errors:
        m.store_errors.labels("write").inc(stats.write_errors)
    if stats.impressions_not_logged:
        m.impressions_not_logged.inc(stats.impressions_not_logged)
    m.rows(stats.stored, stats.computed, stats.missing)


# --- health ----------------------------------------------------------------------------------

health = APIRouter()


@health.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@health.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(ctx: Context):
    ok, detail = ctx.ready()
    body = Health(status="ok" if ok else "unavailable", detail=detail)
    return body if ok else JSONResponse(body.model_dump(), status_code=503)


@health.get("/metrics", response_class=Response, include_in_schema=False)
def prometheus(m: AppMetrics) -> Response:
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


# --- read API ---------------------------------------------------------------------------------

READ = {"prefix": "/v1", "dependencies": [Depends(require_read)], "responses": {**E401, **E413}}
versions = APIRouter(**READ)
experts = APIRouter(**READ)
embeddings = APIRouter(**READ)


@versions.get("/fm-versions", response_model=VersionList)
def fm_versions(ctx: Context) -> VersionList:
    versions = ctx.manifest().versions
    syncs = lifecycle.sync_infos(ctx, list(versions.values()))
    return VersionList(versions=[
        VersionInfo.of(v, *((s.seq, s.time) if (s := syncs.get(name)) else ()))
        for name, v in versions.items()
    ])


@experts.get("/experts", response_model=ExpertList)
def list_experts(ctx: Context) -> ExpertList:
    return ExpertList(experts=[
        ExpertInfo(name=c.name, surface=c.surface, tasks=c.tasks, fm_version=c.fm_version,
                   item_features=c.item_features)
        for c in ctx.expert_configs().values()
    ])


@experts.post("/experts/{name}/score", response_model=ScoreResponse, responses=LOOKUP_ERRORS)
async def score_route(name: PathName, req: ScoreRequest, ctx: Context,
                      m: AppMetrics) -> ScoreResponse:
    # Off the event loop: the first call loads the expert from disk, and Feast reads block.
    out = await run_in_threadpool(score, ctx, name, req.user_id, req.item_ids)
    record(m, out.stats)
    return ScoreResponse(
        expert=out.expert.name, fm_version=out.expert.fm_version, tasks=out.expert.tasks,
        scores=out.scores.tolist(), missing_embeddings=out.missing,
        computed_embeddings=out.computed,
    )


def _wants_binary(req: LookupRequest, accept: str) -> str | None:
    """The binary dtype to answer with, or None for JSON."""
    if req.format in DTYPES:
        return req.format
    if req.format is None and OCTET in accept:
        return "f32"
    return None


@embeddings.post(
    "/embeddings/lookup",
    response_model=LookupResponse,
    responses={
        200: {
            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON by default; with `Accept: application/octet-stream` or "
            "`format: f32|f16` the raw little-endian matrix [n, dim], missing rows "
            "zero-filled, with headers X-FM-Version, X-Dim, X-Dtype, X-Missing, X-Computed. "
            "No format carries NaN or Inf: a row that holds one is missing (or computed "
            "again by read-through), and in f16 a row with a value beyond +-65504 is "
            "missing too",
        },
        **LOOKUP_ERRORS,
    },
)
def lookup_route(req: LookupRequest, request: Request, ctx: Context, m: AppMetrics) -> Response:
    # The answer is written here, never validated through LookupResponse (which documents
    # it): a per-float pydantic pass would cost more than the store read.
    dtype = _wants_binary(req, request.headers.get("accept", ""))
    out = lookup(ctx, req.user_id, req.item_ids, fm_version=req.fm_version, expert=req.expert,
                 surface=req.surface, limit=F16_MAX if dtype == "f16" else math.inf)
    record(m, out.stats)
    version = out.version
    if dtype is None:
        body = lookup_json(version.version, version.dim, out.matrix, out.missing, out.computed)
        return Response(body, media_type="application/json")
    matrix = np.array(out.matrix, dtype=DTYPES[dtype])
    matrix[out.missing] = 0  # missing rows zero-filled, never NaN
    return Response(
        matrix.tobytes(),
        media_type=OCTET,
        headers={
            "X-FM-Version": version.version,
            "X-Dim": str(version.dim),
            "X-Rows": str(len(req.item_ids)),
            "X-Dtype": dtype,
            "X-Missing": ",".join(map(str, out.missing)),
            "X-Computed": ",".join(map(str, out.computed)),
        },
    )


# --- events -----------------------------------------------------------------------------------

events = APIRouter(**READ)


def _record_ingest(m: Metrics, out: IngestResult) -> None:
    m.events_ingested.inc(out.new)
    m.events_duplicates.inc(out.duplicates)
    m.events_rejected.inc(len(out.rejected))


@events.post(
    "/events",
    response_model=EventsResponse,
    responses={
        409: _error("The repo has no dataset spec (data/events/spec.json)"),
        422: _error(EVENTS_422),
        429: _error("The events stream is full (its consumers are behind): nothing of the "
                    "batch was dropped beyond what the detail says was taken in; resend it "
                    "later (Retry-After), accepted ids deduplicate"),
        **E503,
    },
)
def ingest_events(req: EventsRequest, ctx: Context, m: AppMetrics) -> Response:
    """Ingest a batch of events into the events stream (for the online histories and the
    offline log). Bad rows are refused one by one (422, naming row and field) while the good
    rows are accepted; resending a batch is safe (event ids deduplicate)."""
    # A plain `def`: validation and the Redis appends block, so FastAPI runs it in its pool.
    try:
        out = ingest(ctx, req.events)
    except Overloaded as e:
        m.events_ingested.inc(e.appended)
        raise
    _record_ingest(m, out)
    body = EventsResponse(accepted=out.accepted, duplicates=out.duplicates,
                          event_ids=out.event_ids)
    if not out.rejected:
        return JSONResponse(body.model_dump())
    rejected = [{"row": r.row, "field": r.field, "message": r.message} for r in out.rejected]
    return JSONResponse({"detail": out.summary(), **body.model_dump(), "rejected": rejected},
                        status_code=422)


# --- admin ------------------------------------------------------------------------------------

admin = APIRouter(
    prefix="/v1/admin",
    dependencies=[Depends(require_admin)],
    responses={**E401, 403: _error("Admin API disabled: FOUNDEX_ADMIN_TOKEN is not set"), **E413},
)


@admin.post(
    "/fm-versions/{version}/retire",
    response_model=RetireResponse,
    responses={
        404: _error("Unknown FM version"),
        409: _error("Pinned by experts (retry with ?force=true), or not retirable"),
        **E422,
        503: _error("feast apply failed"),
    },
)
def retire_version(
    version: PathName,
    ctx: Context,
    force: Annotated[bool, Query(description="retire even while experts pin it")] = False,
) -> RetireResponse:
    out = lifecycle.retire(ctx, version, force=force,
                           force_hint="re-pin them first or retry with ?force=true")
    return RetireResponse(version=out.entry.version, status=out.entry.status, forced=out.forced,
                          pinned_by=out.pinned_by)


@admin.post(
    "/fm-versions",
    response_model=VersionInfo,
    status_code=201,
    responses={
        409: _error("The checkpoint is already published (send allow_duplicate: true)"),
        422: _error("Invalid input, or not a loadable FM checkpoint"),
        503: _error("feast apply failed"),
    },
)
def publish_version(req: PublishRequest, ctx: Context) -> VersionInfo:
    """Publish a checkpoint as the next FM version (its own view), as `foundex fm publish`."""
    entry = lifecycle.publish(
        ctx, req.checkpoint, training_window=(req.train_start, req.train_end),
        ttl_seconds=req.ttl_days * 86400, description=req.description,
        allow_duplicate=req.allow_duplicate,
    )
    return VersionInfo.of(entry)


@admin.post("/experts/reload", response_model=ReloadResponse)
def reload_experts(ctx: Context) -> ReloadResponse:
    return ReloadResponse(experts=ctx.reload_experts())


ROUTERS = (health, versions, experts, embeddings, events, admin)
