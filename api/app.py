"""The REST face of foundex (DESIGN.md "Outside contract"): the app, its middleware, error
handlers and routers. Routes live in `api.routes`, use-cases in `api.services`."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.http_errors import install_error_handlers
from api.observability import (
    Metrics,
    ObservabilityMiddleware,
    configure_logging,
    silence_uvicorn_access_log,
)
from api.routes import ROUTERS
from api.schemas import INT64_MAX, INT64_MIN
from api.security import BodySizeLimit
from api.services.context import ServiceContext
from api.settings import Settings

SYNC_CHECK_S = 1.0  # how often the server looks for a newer weight sync of its loaded FMs


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


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    """The service over `settings.repo` and the Redis at `redis_url`; its ServiceContext is
    built at startup (app.state.context) and closed at shutdown."""
    metrics = Metrics()
    configure_logging(settings.json_logs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.context = ServiceContext(settings, redis_url)
        app.state.context.warm()
        metrics.live.context = app.state.context  # /metrics reads the streams' lag through it
        # FM weight sync within a version: caught up off the request path, swapped in between
        app.state.context.fm_tier.start_sync(SYNC_CHECK_S)
        # Everything imported so far (torch, pandas, feast) lives as long as the process: move
        # it out of the collector's sight so full collections stay short under traffic.
        gc.collect()
        gc.freeze()
        silence_uvicorn_access_log()  # the middleware logs each request once, with its id
        yield
        metrics.live.context = None
        app.state.context.fm_tier.stop_sync()
        app.state.context.close()
        # Frozen objects are never collected, not even at interpreter exit, where nanobind
        # modules (triton's, DuckDB's) then report them as "leaked": thaw them on shutdown.
        gc.unfreeze()

    app = FastAPI(title="foundex", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every reply
    install_error_handlers(app, metrics)
    for router in ROUTERS:
        app.include_router(router)

    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _integer_bounds(generate_openapi())  # generated once and cached on the app
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
