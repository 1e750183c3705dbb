"""The control plane: ``create_app(settings)`` builds the FastAPI application."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from lorafleet.platform import metrics as m
from lorafleet.platform.config import Settings
from lorafleet.services.api import errors
from lorafleet.services.api.routes import adapters, admin, files, health, jobs, models, policies, rollouts, ui
from lorafleet.services.api.routes import metrics as metrics_route
from lorafleet.services.api.state import ApiState

ROUTERS = (health.router, files.router, jobs.router, models.router, policies.router, admin.router,
           metrics_route.router, rollouts.router, ui.router, adapters.router)


def create_app(settings: Settings, *, state: ApiState | None = None,
               extra_routers: tuple[object, ...] = ()) -> FastAPI:
    """``extra_routers`` lets `lorafleet up` mount the serving and rollout roles on the same port."""
    api_state = state or ApiState.create(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if state is None:
            api_state.close()

    app = FastAPI(title="lorafleet", version="0.1.0", lifespan=lifespan)
    app.state.api = api_state
    errors.install(app)
    for router in (*ROUTERS, *extra_routers):
        app.include_router(router)  # type: ignore[arg-type]

    @app.middleware("http")
    async def _http_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", "unmatched")
        m.HTTP_REQUESTS.labels(request.method, template, str(response.status_code)).inc()
        m.HTTP_LATENCY.labels(request.method, template).observe(time.perf_counter() - start)
        return response

    return app
