"""Health and metrics endpoints for the roles that have no HTTP API of their own (trainer, rollout
controller), so Kubernetes probes and Prometheus can reach them on ``settings.port``."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from lorafleet.platform import metrics as m
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine


def probe_app(settings: Settings, *, role: str) -> FastAPI:
    app = FastAPI(title=f"lorafleet {role}", docs_url=None, redoc_url=None, openapi_url=None)
    engine = make_engine(settings.resolved_database_url)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "role": role}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any driver error means not ready; reported to the probe
            return JSONResponse({"error": {"code": "database_unavailable", "message": str(exc)[:200],
                                           "param": None}}, status_code=503, headers={"Retry-After": "5"})
        return JSONResponse({"status": "ready", "role": role})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def start_probe_server(settings: Settings, *, role: str) -> threading.Thread:
    """Serve /healthz, /readyz and /metrics on settings.host:port from a daemon thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(probe_app(settings, role=role), host=settings.host, port=settings.port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"lorafleet-{role}-probes", daemon=True)
    thread.start()
    return thread
