"""The REST face of foundex (DESIGN.md "Outside contract")."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
import pandas as pd
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from api.settings import Settings
from api.state import NotFound, ServingState, as_int_array
from experts import predict
from store_bridge.online import StoreUnavailable

MAX_ITEM_IDS = 2000  # hard ceiling of the schema; settings.max_candidates may lower it


class VersionInfo(BaseModel):
    version: str
    dim: int
    status: str
    view: str
    checkpoint_digest: str
    training_window: tuple[str, str]
    ttl_seconds: int
    created_at: str


class VersionList(BaseModel):
    versions: list[VersionInfo]


class ExpertInfo(BaseModel):
    name: str
    surface: str
    tasks: list[str]
    fm_version: str | None
    item_features: list[str]


class ExpertList(BaseModel):
    experts: list[ExpertInfo]


class LookupRequest(BaseModel):
    user_id: int
    item_ids: list[int] = Field(min_length=1, max_length=MAX_ITEM_IDS)
    fm_version: str | None = None
    expert: str | None = None

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


class ScoreRequest(BaseModel):
    user_id: int
    item_ids: list[int] = Field(min_length=1, max_length=MAX_ITEM_IDS)


class ScoreResponse(BaseModel):
    expert: str
    fm_version: str | None
    tasks: list[str]
    scores: list[list[float]]
    missing_embeddings: list[int]


class Health(BaseModel):
    status: str
    detail: str = ""


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


State = Annotated[ServingState, Depends(get_state)]


def _check_size(state: ServingState, item_ids: list[int]) -> None:
    if len(item_ids) > state.settings.max_candidates:
        raise HTTPException(
            422, f"item_ids has {len(item_ids)} entries; at most {state.settings.max_candidates}"
        )


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.serving = ServingState(settings, redis_url)
        yield

    app = FastAPI(title="foundex", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"online store unavailable: {exc}"}, status_code=503)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz(state: State):
        ok, detail = state.ready()
        body = Health(status="ok" if ok else "unavailable", detail=detail)
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/v1/fm-versions", response_model=VersionList)
    def fm_versions(state: State) -> VersionList:
        return VersionList(
            versions=[
                VersionInfo(
                    version=v.version,
                    dim=v.dim,
                    status=v.status,
                    view=f"fm_tae_{v.version}",
                    checkpoint_digest=v.digest,
                    training_window=v.training_window,
                    ttl_seconds=v.ttl_seconds,
                    created_at=v.created_at,
                )
                for v in state.manifest().versions.values()
            ]
        )

    @app.get("/v1/experts", response_model=ExpertList)
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

    @app.post("/v1/embeddings/lookup", response_model=LookupResponse)
    def lookup(req: LookupRequest, state: State) -> LookupResponse:
        _check_size(state, req.item_ids)
        if req.expert is not None:
            cfg = state.expert(req.expert)
            if cfg.fm_version is None:
                raise HTTPException(422, f"expert {cfg.name!r} uses no FM embeddings")
            name = cfg.fm_version
        else:
            name = req.fm_version  # type: ignore[assignment]
        version = state.version(name)
        rows = state.store.read(version.version, version.dim, req.user_id, as_int_array(req.item_ids))
        missing = set(rows.missing)
        embeddings = [
            None if i in missing else row for i, row in enumerate(rows.matrix.tolist())
        ]
        return LookupResponse(
            fm_version=version.version, dim=version.dim, embeddings=embeddings, missing=rows.missing
        )

    @app.post("/v1/experts/{name}/score", response_model=ScoreResponse)
    async def score(name: str, req: ScoreRequest, state: State) -> ScoreResponse:
        _check_size(state, req.item_ids)
        cfg = state.expert(name)
        model = state.expert_model(cfg)
        return await run_in_threadpool(_score, state, cfg, model, req)

    return app


def _score(state: ServingState, cfg, model, req: ScoreRequest) -> ScoreResponse:
    items = as_int_array(req.item_ids)
    feats = state.online_features(cfg, req.user_id, req.item_ids)
    frame = pd.DataFrame({"user_id": req.user_id, "item_id": items})
    for f in cfg.item_features:
        frame[f] = [np.nan if v is None else v for v in feats[f]]
    k = cfg.history_length
    hist_items = feats["recent_items"][0] or []
    hist_actions = feats["recent_actions"][0] or []
    frame["recent_items"] = [_last_k(hist_items, k)] * len(items)
    frame["recent_actions"] = [_last_k(hist_actions, k)] * len(items)
    missing: list[int] = []
    if cfg.fm_version is not None:
        version = state.version(cfg.fm_version)
        rows = state.store.read(version.version, version.dim, req.user_id, items)
        missing = rows.missing
        gone = set(missing)
        frame["embedding"] = [None if i in gone else r for i, r in enumerate(rows.matrix)]
    probs = predict(model, frame)
    return ScoreResponse(
        expert=cfg.name,
        fm_version=cfg.fm_version,
        tasks=cfg.tasks,
        scores=np.asarray(probs, dtype=float).tolist(),
        missing_embeddings=missing,
    )


def _last_k(values: list[int], k: int) -> np.ndarray:
    """Right-aligned last k entries, 0-padded on the left (the experts' history format)."""
    out = np.zeros(k, dtype=np.int64)
    tail = np.asarray(values[-k:], dtype=np.int64)
    if len(tail):
        out[k - len(tail) :] = tail
    return out
