"""The REST face of foundex (DESIGN.md "Outside contract")."""

from __future__ import annotations

import gc
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, model_validator

from api.observability import Metrics, ObservabilityMiddleware, configure_logging, log
from api.security import BodySizeLimit, require_admin, require_read
from api.settings import Settings
from api.state import Conflict, NotFound, ServingState, as_int_array
from experts import predict
from store_bridge.online import StoreUnavailable
from store_bridge.repo import FMVersion, view_name

try:  # optional speed-up: orjson writes float32 rows straight from NumPy
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

MAX_ITEM_IDS = 2000  # hard ceiling of the schema; settings.max_candidates may lower it
OCTET = "application/octet-stream"
DTYPES = {"f32": "<f4", "f16": "<f2"}

# Entity ids are int64 in the store.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class ErrorBody(BaseModel):
    detail: str


ERRORS = {
    401: {"model": ErrorBody, "description": "Missing or invalid bearer token"},
    413: {"model": ErrorBody, "description": "Request body too large"},
    503: {"model": ErrorBody, "description": "Online store unavailable"},
}


class VersionInfo(BaseModel):
    version: str
    dim: int
    status: str
    view: str
    checkpoint_digest: str
    training_window: tuple[str, str]
    ttl_seconds: int
    created_at: str


    @classmethod
    def of(cls, v: FMVersion) -> VersionInfo:
        return cls(
            version=v.version,
            dim=v.dim,
            status=v.status,
            view=view_name(v.version),
            checkpoint_digest=v.digest,
            training_window=v.training_window,
            ttl_seconds=v.ttl_seconds,
            created_at=v.created_at,
        )


class VersionList(BaseModel):
    versions: list[VersionInfo]


class PublishRequest(BaseModel):
    checkpoint: str = Field(min_length=1, description="path of an FM checkpoint on the server")
    train_start: str = Field(min_length=1, description="ISO start of the training window")
    train_end: str = Field(min_length=1, description="ISO end of the training window")
    ttl_days: int = Field(default=7, gt=0, le=3650)
    description: str = Field(default="", max_length=500)


class ExpertInfo(BaseModel):
    name: str
    surface: str
    tasks: list[str]
    fm_version: str | None
    item_features: list[str]


class ExpertList(BaseModel):
    experts: list[ExpertInfo]


class LookupRequest(BaseModel):
    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    fm_version: str | None = None
    expert: str | None = None
    format: Literal["json", "f32", "f16"] | None = Field(
        default=None,
        description="json (default), or a raw little-endian float32/float16 matrix [n, dim] "
        "(also chosen by `Accept: application/octet-stream`, as f32)",
    )
    surface: str | None = Field(
        default=None,
        description="Surface of the request, used when missing TAEs are computed on the fly "
        "(default: the expert's surface, else the FM's first)",
    )

    @model_validator(mode="after")
    def _exactly_one_selector(self) -> LookupRequest:
        if (self.fm_version is None) == (self.expert is None):
            raise ValueError("give exactly one of fm_version or expert")
        return self


class LookupResponse(BaseModel):
    fm_version: str
    dim: int
    embeddings: list[list[float] | None]
    missing: list[int]
    computed: list[int] = Field(
        default=[], description="indices whose TAEs were computed now (read-through)"
    )


class ScoreRequest(BaseModel):
    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_ITEM_IDS)


class ScoreResponse(BaseModel):
    expert: str
    fm_version: str | None
    tasks: list[str]
    scores: list[list[float]]
    missing_embeddings: list[int] = Field(
        description="indices scored without a TAE (none stored and none computable)"
    )
    computed_embeddings: list[int] = Field(
        default=[], description="indices whose TAEs were computed now (read-through)"
    )


class Health(BaseModel):
    status: str
    detail: str = ""


class RetireResponse(BaseModel):
    version: str
    status: str
    forced: bool
    pinned_by: list[str]


class ReloadResponse(BaseModel):
    experts: list[str]


# Dependencies that do no I/O are `async def`: FastAPI then runs them inline instead of
# sending each one through the thread pool (a measurable cost on the lookup hot path).
async def get_state(request: Request) -> ServingState:
    return request.app.state.serving


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


State = Annotated[ServingState, Depends(get_state)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


def _check_size(state: ServingState, item_ids: list[int]) -> None:
    if len(item_ids) > state.settings.max_candidates:
        raise HTTPException(
            422, f"item_ids has {len(item_ids)} entries; at most {state.settings.max_candidates}"
        )


def _wants_binary(req: LookupRequest, accept: str) -> str | None:
    """The binary dtype to answer with, or None for JSON."""
    if req.format in DTYPES:
        return req.format
    if req.format is None and OCTET in accept:
        return "f32"
    return None


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    metrics = Metrics()
    configure_logging(settings.json_logs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serving = ServingState(settings, redis_url)
        # Everything imported so far (torch, pandas, feast) lives as long as the process: move
        # it out of the collector's sight so full collections stay short under traffic.
        gc.collect()
        gc.freeze()
        yield
        app.state.serving.client.close()

    app = FastAPI(title="foundex", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every reply

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.store_errors.labels("read").inc()
        log.warning("store unavailable", extra={"fields": {"error": str(exc)}})
        return JSONResponse({"detail": f"online store unavailable: {exc}"}, status_code=503)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz(state: State):
        ok, detail = state.ready()
        body = Health(status="ok" if ok else "unavailable", detail=detail)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/metrics", response_class=Response, include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    read = APIRouter(prefix="/v1", dependencies=[Depends(require_read)], responses=ERRORS)

    @read.get("/fm-versions", response_model=VersionList)
    def fm_versions(state: State) -> VersionList:
        return VersionList(versions=[VersionInfo.of(v) for v in state.manifest().versions.values()])

    @read.get("/experts", response_model=ExpertList)
    def experts(state: State) -> ExpertList:
        return ExpertList(
            experts=[
                ExpertInfo(
                    name=c.name,
                    surface=c.surface,
                    tasks=c.tasks,
                    fm_version=c.fm_version,
                    item_features=c.item_features,
                )
                for c in state.expert_configs().values()
            ]
        )

    @read.post(
        "/embeddings/lookup",
        response_model=LookupResponse,
        responses={
            200: {
                "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}},
                "description": "JSON by default; with `Accept: application/octet-stream` or "
                "`format: f32|f16` the raw little-endian matrix [n, dim], missing rows "
                "zero-filled, with headers X-FM-Version, X-Dim, X-Dtype, X-Missing, X-Computed",
            }
        },
    )
    def lookup(req: LookupRequest, request: Request, state: State, m: AppMetrics) -> Response:
        _check_size(state, req.item_ids)
        surface = req.surface
        if req.expert is not None:
            cfg = state.expert(req.expert)
            if cfg.fm_version is None:
                raise HTTPException(422, f"expert {cfg.name!r} uses no FM embeddings")
            name = cfg.fm_version
            surface = surface or cfg.surface
        else:
            name = req.fm_version  # type: ignore[assignment]
        version = state.version(name)
        items = as_int_array(req.item_ids)
        rows = state.store.read(version.version, version.dim, req.user_id, items)
        matrix, missing, computed = rows.matrix, rows.missing, []
        if missing and state.settings.read_through and version.status == "active":
            matrix, missing, computed = _read_through(
                state, m, version, req.user_id, items, matrix, missing, surface
            )
        m.rows(len(items) - len(missing) - len(computed), len(computed), len(missing))
        dtype = _wants_binary(req, request.headers.get("accept", ""))
        if dtype is not None:
            out = np.nan_to_num(matrix, nan=0.0).astype(DTYPES[dtype], copy=False)
            return Response(
                out.tobytes(),
                media_type=OCTET,
                headers={
                    "X-FM-Version": version.version,
                    "X-Dim": str(version.dim),
                    "X-Rows": str(len(items)),
                    "X-Dtype": dtype,
                    "X-Missing": ",".join(map(str, missing)),
                    "X-Computed": ",".join(map(str, computed)),
                },
            )
        return Response(
            _lookup_json(version.version, version.dim, matrix, missing, computed),
            media_type="application/json",
        )

    @read.post("/experts/{name}/score", response_model=ScoreResponse)
    async def score(name: str, req: ScoreRequest, state: State, m: AppMetrics) -> ScoreResponse:
        _check_size(state, req.item_ids)
        return await run_in_threadpool(_score, state, m, name, req)

    admin = APIRouter(
        prefix="/v1/admin",
        dependencies=[Depends(require_admin)],
        responses={**ERRORS, 403: {"model": ErrorBody, "description": "Admin API disabled"}},
    )

    @admin.post(
        "/fm-versions/{version}/retire",
        response_model=RetireResponse,
        responses={409: {"model": ErrorBody, "description": "Pinned by experts"}},
    )
    def retire_version(
        version: str,
        state: State,
        force: Annotated[bool, Query(description="retire even while experts pin it")] = False,
    ) -> RetireResponse:
        from store_bridge.repo import FeastApplyError
        from store_bridge.versions import VersionError, retire

        state.version(version)  # 404 when unknown
        pinned = sorted(n for n, c in state.expert_configs().items() if c.fm_version == version)
        if pinned and not force:
            raise HTTPException(
                409,
                f"FM version {version} is pinned by experts {', '.join(pinned)}; "
                "re-pin them first or retry with ?force=true",
            )
        try:
            entry = retire(state.repo, version, state.redis_url, pinned_by=pinned, force=force)
        except VersionError as e:
            raise HTTPException(409, str(e)) from e
        except FeastApplyError as e:
            raise HTTPException(503, f"feast apply failed: {str(e).splitlines()[0]}") from e
        return RetireResponse(
            version=entry.version, status=entry.status, forced=bool(pinned), pinned_by=pinned
        )

    @admin.post(
        "/fm-versions",
        response_model=VersionInfo,
        status_code=201,
        responses={422: {"model": ErrorBody, "description": "Not a loadable FM checkpoint"}},
    )
    def publish_version(req: PublishRequest, state: State) -> VersionInfo:
        """Publish a checkpoint as the next FM version (its own view), as `foundex fm publish`."""
        from store_bridge.repo import FeastApplyError
        from store_bridge.versions import VersionError, publish

        try:
            entry = publish(
                state.repo, Path(req.checkpoint), state.redis_url,
                training_window=(req.train_start, req.train_end),
                ttl_seconds=req.ttl_days * 86400, description=req.description,
            )
        except (VersionError, ValueError, OSError) as e:
            raise HTTPException(422, f"cannot publish {req.checkpoint}: {e}") from e
        except FeastApplyError as e:
            raise HTTPException(503, f"feast apply failed: {str(e).splitlines()[0]}") from e
        return VersionInfo.of(entry)

    @admin.post("/experts/reload", response_model=ReloadResponse)
    def reload_experts(state: State) -> ReloadResponse:
        return ReloadResponse(experts=state.reload_experts())

    app.include_router(read)
    app.include_router(admin)
    return app


def _lookup_json(version: str, dim: int, matrix: np.ndarray, missing: list[int],
                 computed: list[int]) -> bytes:
    """A LookupResponse body, serialised without a per-float pydantic pass (the hot path).

    With orjson the float32 rows are written straight from NumPy (shortest repr that
    round-trips each float32); without it, the standard library does the same job slower.
    """
    gone = set(missing)
    if orjson is not None:
        rows: list = [None if i in gone else row for i, row in enumerate(matrix)]
    else:
        rows = [None if i in gone else row for i, row in enumerate(matrix.tolist())]
    body = {"fm_version": version, "dim": dim, "embeddings": rows, "missing": missing,
            "computed": computed}
    if orjson is not None:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return json.dumps(body, separators=(",", ":")).encode()


def _read_through(state: ServingState, m: Metrics, version, user_id: int, items: np.ndarray,
                  matrix: np.ndarray, missing: list[int], surface: str | None,
                  *, surface_from_request: bool = True):
    """Compute the missing rows with the same FM version, write them back, fill them in.

    A surface the FM does not know is the caller's error (422) when the request named it;
    when it is an expert's own surface, the stored rows are served as they are."""
    try:
        known = state.fm_tier.surfaces(version)  # loads the version's engine on first use
    except Exception:  # an unreadable event log or checkpoint: serve what is stored
        log.exception("read-through unavailable", extra={"fields": {"fm_version": version.version}})
        return matrix, missing, []
    if known is None:
        return matrix, missing, []
    if surface is not None and surface not in known:
        if not surface_from_request:
            return matrix, missing, []
        raise HTTPException(422, f"unknown surface {surface!r}; FM {version.version} knows {known}")
    now = datetime.now(UTC)
    holes = np.asarray(missing, dtype=np.int64)
    try:
        result = state.fm_tier.compute(version, user_id, items[holes], surface, now)
    except Exception:  # the FM tier is an optimisation: stored rows are still served
        log.exception("read-through failed", extra={"fields": {"fm_version": version.version}})
        return matrix, missing, []
    if result is None or len(result[0]) == 0:
        return matrix, missing, []
    pos, tae = result
    done = holes[pos]
    matrix = matrix.copy()
    matrix[done] = tae
    ts = np.full(len(done), int(now.timestamp() * 1_000_000), dtype=np.int64)
    try:
        state.store.write(version.version, np.full(len(done), user_id), items[done], ts, tae)
    except StoreUnavailable as e:
        m.store_errors.labels("write").inc()  # still served; the next request computes again
        log.warning("write-back failed", extra={"fields": {"error": str(e)}})
    computed = sorted(int(i) for i in done)
    left = sorted(set(missing) - set(computed))
    return matrix, left, computed


_fetchers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="foundex-fetch")


def _score(state: ServingState, m: Metrics, name: str, req: ScoreRequest) -> ScoreResponse:
    cfg = state.expert(name)
    model = state.expert_model(cfg)  # loads from disk on first use: off the event loop
    items = as_int_array(req.item_ids)
    # The pinned version's TAEs and the expert's Feast features are fetched concurrently.
    taes = None
    if cfg.fm_version is not None:
        version = state.version(cfg.fm_version)
        taes = _fetchers.submit(state.store.read, version.version, version.dim, req.user_id, items)
    try:
        feats = state.online_features(cfg, req.user_id, req.item_ids)
    finally:
        rows = taes.result() if taes is not None else None
    frame = pd.DataFrame({"user_id": req.user_id, "item_id": items})
    for f in cfg.item_features:
        frame[f] = [np.nan if v is None else v for v in feats[f]]
    k = cfg.history_length
    hist_items = feats["recent_items"][0] or []
    hist_actions = feats["recent_actions"][0] or []
    frame["recent_items"] = [_last_k(hist_items, k)] * len(items)
    frame["recent_actions"] = [_last_k(hist_actions, k)] * len(items)
    missing: list[int] = []
    computed: list[int] = []
    if rows is not None:
        matrix, missing = rows.matrix, rows.missing
        # The same read-through as a lookup: the expert scores with the TAE it was trained on
        # rather than without one.
        if missing and state.settings.read_through and version.status == "active":
            matrix, missing, computed = _read_through(
                state, m, version, req.user_id, items, matrix, missing, cfg.surface,
                surface_from_request=False,
            )
        m.rows(len(items) - len(missing) - len(computed), len(computed), len(missing))
        gone = set(missing)
        frame["embedding"] = [None if i in gone else r for i, r in enumerate(matrix)]
    probs = predict(model, frame)
    return ScoreResponse(
        expert=cfg.name,
        fm_version=cfg.fm_version,
        tasks=cfg.tasks,
        scores=np.asarray(probs, dtype=float).tolist(),
        missing_embeddings=missing,
        computed_embeddings=computed,
    )


def _last_k(values: list[int], k: int) -> np.ndarray:
    """Right-aligned last k entries, 0-padded on the left (the experts' history format)."""
    out = np.zeros(k, dtype=np.int64)
    tail = np.asarray(values[-k:], dtype=np.int64)
    if len(tail):
        out[k - len(tail) :] = tail
    return out
