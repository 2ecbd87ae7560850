"""The REST face of foundex (DESIGN.md "Outside contract")."""

from __future__ import annotations

import gc
import json
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.observability import (
    Metrics,
    ObservabilityMiddleware,
    configure_logging,
    log,
    silence_uvicorn_access_log,
)
from api.security import BodySizeLimit, require_admin, require_read
from api.settings import Settings
from api.state import Conflict, NotFound, ServingState, as_int_array
from experts import predict
from store_bridge.online import EmbeddingRows, StoreUnavailable
from store_bridge.repo import FMVersion, view_name

try:  # optional speed-up: orjson writes float32 rows straight from NumPy
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None

MAX_ITEM_IDS = 2000  # hard ceiling of the schema; settings.max_candidates may lower it
OCTET = "application/octet-stream"
DTYPES = {"f32": "<f4", "f16": "<f2"}
F16_MAX = float(np.finfo(np.float16).max)  # 65504: beyond it a value would become inf in f16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Entity ids are int64 in the store. Request bodies are validated strictly: an id is a JSON
# integer in int64's range, never a string ("3"), a float (3.0, 1e3, NaN, Infinity) or a
# boolean. Negative ids are valid keys (the store and the event schema allow them); they are
# simply never in an FM's vocabulary or history.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
# Strict types, and an unknown field is an error rather than silently ignored (a misspelt
# "fromat" or "surfce" would otherwise change the answer without a word).
STRICT = ConfigDict(strict=True, extra="forbid")
# Names (versions, experts, surfaces) are short; a bound keeps a 404 that names an unknown one
# from echoing a huge input back.
MAX_NAME = 128
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
PathName = Annotated[str, PathParam(min_length=1, max_length=MAX_NAME)]
MAX_ERRORS_SHOWN = 5  # a 422 names this many problems, then counts the rest


class ErrorBody(BaseModel):
    detail: str


def _error(description: str) -> dict:
    return {"model": ErrorBody, "description": description}


E401 = {401: _error("Missing or invalid bearer token (FOUNDEX_READ_TOKEN / FOUNDEX_ADMIN_TOKEN)")}
E413 = {413: _error("Request body too large (FOUNDEX_MAX_BODY_BYTES)")}
E422 = {422: _error("Invalid input: the detail names the field (and index)")}
E503 = {503: _error("Online store unavailable (down, unreachable or timed out)")}
LOOKUP_ERRORS = {
    404: _error("Unknown FM version or expert"),
    409: _error("The repo's files disagree: an expert pins a version the manifest does not "
                "hold, or was trained on another width than the version it pins"),
    **E413, **E422, **E503,
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
    model_config = STRICT

    checkpoint: str = Field(min_length=1, description="path of an FM checkpoint on the server")
    train_start: str = Field(min_length=1, description="ISO start of the training window")
    train_end: str = Field(min_length=1, description="ISO end of the training window")
    ttl_days: int = Field(default=7, gt=0, le=3650)
    description: str = Field(default="", max_length=500)
    allow_duplicate: bool = Field(
        default=False, description="publish a checkpoint that is already a version again"
    )


class ExpertInfo(BaseModel):
    name: str
    surface: str
    tasks: list[str]
    fm_version: str | None
    item_features: list[str]


class ExpertList(BaseModel):
    experts: list[ExpertInfo]


class LookupRequest(BaseModel):
    model_config = STRICT

    user_id: Int64
    item_ids: list[Int64] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    fm_version: Name | None = None
    expert: Name | None = None
    format: Literal["json", "f32", "f16"] | None = Field(
        default=None,
        description="json (default), or a raw little-endian float32/float16 matrix [n, dim] "
        "(also chosen by `Accept: application/octet-stream`, as f32)",
    )
    surface: Name | None = Field(
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
    model_config = STRICT

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


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _kind(value: object) -> str:
    """What a JSON value is, in words: the value itself is never quoted back (it may be huge,
    and NaN or Infinity cannot even be written in a JSON answer)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a value of another type"


_SOURCES = {"body", "query", "path", "header", "cookie"}


def _where(loc: tuple) -> str:
    """A pydantic error location as a field path: ("body", "item_ids", 3) -> "item_ids[3]"."""
    parts = list(loc)
    source = parts.pop(0) if parts and parts[0] in _SOURCES else None
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _short(str(part))
    if source in (None, "body"):
        return out or "body"
    return f"{source} parameter {out}"


def _problem(err: dict) -> str:
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid"))
    if kind == "json_invalid":
        pos = err["loc"][-1] if err.get("loc") else "?"
        reason = (err.get("ctx") or {}).get("error", "")
        return f"body: not valid JSON (at character {pos}: {reason})"
    where = _where(tuple(err.get("loc", ())))
    if kind == "missing":
        return f"{where}: required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = "must be a JSON object"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") and "input" in err:
        msg = f"{msg}, got {_kind(err['input'])}"
    return f"{where}: {_short(msg, 200)}"


def validation_detail(errors: list[dict]) -> str:
    """One line naming each invalid field (at most MAX_ERRORS_SHOWN, then a count), never
    echoing the input."""
    problems = [_problem(e) for e in errors] or ["invalid request"]
    shown = "; ".join(problems[:MAX_ERRORS_SHOWN])
    if len(problems) > MAX_ERRORS_SHOWN:
        shown += f" (and {len(problems) - MAX_ERRORS_SHOWN} more)"
    return shown


def _integer_bounds(node: object) -> None:
    """Print integer bounds in the OpenAPI document as integers, in place.

    FastAPI's OpenAPI models hold `minimum`/`maximum` as floats, so int64's 2**63 - 1 would
    print as 9.223372036854776e+18 (which is 2**63, one past the bound). Every integer bound
    here is either exact in a float (below 2**53) or int64's own limit, so rounding back and
    clamping to int64 restores the exact value."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                v = node.get(key)
                if isinstance(v, float) and v.is_integer():
                    node[key] = min(max(int(v), INT64_MIN), INT64_MAX)
        for v in node.values():
            _integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _integer_bounds(v)


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
        silence_uvicorn_access_log()  # the middleware logs each request once, with its id
        yield
        app.state.serving.client.close()
        # Frozen objects are never collected, not even at interpreter exit, where nanobind
        # modules (triton's, DuckDB's) then report them as "leaked": thaw them on shutdown.
        gc.unfreeze()

    app = FastAPI(title="foundex", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every reply

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(list(exc.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI could not even parse the body (not UTF-8, an integer of thousands of
            # digits): invalid input like any other, so 422 with the parser's reason.
            reason = _short(str(exc.__cause__).splitlines()[0] if str(exc.__cause__) else "", 120)
            return JSONResponse({"detail": f"body: not valid JSON ({reason})"}, status_code=422)
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

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

    read = APIRouter(prefix="/v1", dependencies=[Depends(require_read)],
                     responses={**E401, **E413})

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
                "zero-filled, with headers X-FM-Version, X-Dim, X-Dtype, X-Missing, X-Computed. "
                "No format carries NaN or Inf: a row that holds one is missing (or computed "
                "again by read-through), and in f16 a row with a value beyond +-65504 is "
                "missing too",
            },
            **LOOKUP_ERRORS,
        },
    )
    def lookup(req: LookupRequest, request: Request, state: State, m: AppMetrics) -> Response:
        _check_size(state, req.item_ids)
        surface = req.surface
        if req.expert is not None:
            cfg = state.expert(req.expert)
            if cfg.fm_version is None:
                raise HTTPException(422, f"expert {cfg.name!r} uses no FM embeddings")
            version = _pinned_version(state, cfg)
            surface = surface or cfg.surface
        else:
            version = state.version(req.fm_version)  # type: ignore[arg-type]
        items = as_int_array(req.item_ids)
        dtype = _wants_binary(req, request.headers.get("accept", ""))
        matrix, missing, computed = _embeddings(
            state, m, version, req.user_id, items, surface,
            limit=F16_MAX if dtype == "f16" else math.inf,
        )
        if dtype is not None:
            out = np.array(matrix, dtype=DTYPES[dtype])
            out[missing] = 0  # missing rows zero-filled, never NaN
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

    @read.post("/experts/{name}/score", response_model=ScoreResponse, responses=LOOKUP_ERRORS)
    async def score(name: PathName, req: ScoreRequest, state: State, m: AppMetrics) -> ScoreResponse:
        _check_size(state, req.item_ids)
        return await run_in_threadpool(_score, state, m, name, req)

    admin = APIRouter(
        prefix="/v1/admin",
        dependencies=[Depends(require_admin)],
        responses={
            **E401,
            403: _error("Admin API disabled: FOUNDEX_ADMIN_TOKEN is not set"),
            **E413,
        },
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
        responses={
            409: _error("The checkpoint is already published (send allow_duplicate: true)"),
            422: _error("Invalid input, or not a loadable FM checkpoint"),
            503: _error("feast apply failed"),
        },
    )
    def publish_version(req: PublishRequest, state: State) -> VersionInfo:
        """Publish a checkpoint as the next FM version (its own view), as `foundex fm publish`."""
        from store_bridge.repo import FeastApplyError
        from store_bridge.versions import DuplicateCheckpoint, VersionError, publish

        try:
            entry = publish(
                state.repo, Path(req.checkpoint), state.redis_url,
                training_window=(req.train_start, req.train_end),
                ttl_seconds=req.ttl_days * 86400, description=req.description,
                allow_duplicate=req.allow_duplicate,
            )
        except DuplicateCheckpoint as e:
            raise HTTPException(409, str(e)) from e
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

    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _integer_bounds(generate_openapi())  # generated once and cached on the app
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
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


def _pinned_version(state: ServingState, cfg) -> FMVersion:
    """The version an expert pins; Conflict (409) when the manifest does not hold it: the
    caller named a valid expert, it is the repo's files that disagree."""
    try:
        return state.version(cfg.fm_version)
    except NotFound:
        raise Conflict(
            f"expert {cfg.name!r} pins FM version {cfg.fm_version!r}, which the manifest does "
            "not hold: re-pin its config or publish the version"
        ) from None


def _unservable(matrix: np.ndarray, missing: list[int], limit: float) -> list[int]:
    """Rows outside `missing` that hold a non-finite value or one beyond +-limit, ascending."""
    if math.isinf(limit):
        fine = np.isfinite(matrix).all(axis=1)
    else:  # NaN and Inf fail a finite bound too
        fine = (np.abs(matrix) <= limit).all(axis=1)
    fine[missing] = True
    return np.flatnonzero(~fine).tolist()


def _embeddings(state: ServingState, m: Metrics, version: FMVersion, user_id: int,
                items: np.ndarray, surface: str | None, *, rows: EmbeddingRows | None = None,
                surface_from_request: bool = True,
                limit: float = math.inf) -> tuple[np.ndarray, list[int], list[int]]:
    """One version's TAEs of `items` for a user: ([n, dim] float32, missing, computed).

    Stored rows first (`rows`, when the caller read them already). Rows the store could not
    decode or that hold NaN/Inf count as missing, so read-through computes them again and its
    write-back replaces them. Whatever their source, rows holding a non-finite value or one
    beyond +-limit (float16's range, for an f16 answer) are never served: reported missing.
    `missing` and `computed` are ascending and disjoint; missing rows are NaN in the matrix.
    Raises StoreUnavailable, and HTTPException(422) for a requested surface the FM lacks.
    """
    if rows is None:
        rows = state.store.read(version.version, version.dim, user_id, items)
    matrix, missing = rows.matrix, list(rows.missing)
    if rows.undecodable:
        m.unusable.labels("undecodable").inc(len(rows.undecodable))
    bad = _unservable(matrix, missing, math.inf)  # the store reports these already: a guard
    if bad:
        m.unusable.labels("non_finite").inc(len(bad))
        matrix[bad] = np.nan
        missing = sorted({*missing, *bad})
    computed: list[int] = []
    if missing and state.settings.read_through and version.status == "active":
        matrix, missing, computed = _read_through(
            state, m, version, user_id, items, matrix, missing, surface,
            surface_from_request=surface_from_request,
        )
    bad = _unservable(matrix, missing, limit)
    if bad:
        n_finite = int(np.isfinite(matrix[bad]).all(axis=1).sum())
        for reason, n in (("f16_range", n_finite), ("non_finite", len(bad) - n_finite)):
            if n:
                m.unusable.labels(reason).inc(n)
        matrix[bad] = np.nan
        missing = sorted({*missing, *bad})
        dropped = set(bad)
        computed = [i for i in computed if i not in dropped]
    m.rows(len(items) - len(missing) - len(computed), len(computed), len(missing))
    return matrix, missing, computed


def _read_through(state: ServingState, m: Metrics, version: FMVersion, user_id: int,
                  items: np.ndarray, matrix: np.ndarray, missing: list[int],
                  surface: str | None, *, surface_from_request: bool = True):
    """Compute the missing rows with the same FM version, write them back, fill them in.

    Only for users with history in the FM tier's event log: an unknown user's rows stay
    missing and nothing is written, so requests cannot fill the online store with rows for
    arbitrary ids (counted as foundex_read_through_skipped_total{reason="unknown_user"}).
    Candidates outside the FM's vocabulary stay missing too (reason="unknown_item").

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
    if result is None:
        return matrix, missing, []
    if result.unknown_user:
        m.read_through_skipped.labels("unknown_user").inc(len(holes))
        return matrix, missing, []
    if result.unknown_items:
        m.read_through_skipped.labels("unknown_item").inc(result.unknown_items)
    if len(result.positions) == 0:
        return matrix, missing, []
    tae = result.taes
    done = holes[result.positions]
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
    version = _pinned_version(state, cfg) if cfg.fm_version is not None else None
    model = state.expert_model(cfg)  # loads from disk on first use: off the event loop
    items = as_int_array(req.item_ids)
    # The pinned version's TAEs and the expert's Feast features are fetched concurrently.
    taes = None
    if version is not None:
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
        # The same rules and read-through as a lookup: the expert scores with the TAE it was
        # trained on rather than without one.
        matrix, missing, computed = _embeddings(
            state, m, version, req.user_id, items, cfg.surface, rows=rows,
            surface_from_request=False,
        )
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
