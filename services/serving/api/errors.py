"""The error edge of a serving-only app (``lorafleet serve``).

When serving is mounted on the control plane's app (``lorafleet up``) the control plane's
handlers answer instead; both write the one error body ``{"error": {"code", "message",
"param"}}`` with the same status per error class (a test holds the two tables equal). The
table is repeated here because services do not import each other.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.platform.domain import errors as e

log = logging.getLogger(__name__)

STATUS: list[tuple[type[e.LorafleetError], int]] = [
    (e.InvalidTransition, 409),
    (e.InvalidRequest, 400),
    (e.Unauthorized, 401),
    (e.Forbidden, 403),
    (e.NotFound, 404),
    (e.Conflict, 409),
    (e.PayloadTooLarge, 413),
    (e.QuotaExceeded, 429),
    (e.Unavailable, 503),
    (e.IntegrityFailure, 500),
]


def status_for(exc: e.LorafleetError) -> int:
    return next((status for cls, status in STATUS if isinstance(exc, cls)), 500)


def install(app: FastAPI) -> None:
    @app.exception_handler(e.LorafleetError)
    async def _lorafleet(_: Request, exc: e.LorafleetError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.error("request failed: %s (%s)", exc.message, exc.code)
        headers = {}
        if isinstance(exc, e.Unavailable):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        if isinstance(exc, e.Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.to_body(), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        details = [
            {"param": ".".join(str(p) for p in err.get("loc", ())[1:]), "message": err.get("msg")}
            for err in errors[:20]
        ]
        return JSONResponse(
            {
                "error": {
                    "code": "invalid_request_schema",
                    "message": f"{param or 'request'}: {first.get('msg')}",
                    "param": param,
                    "details": details,
                }
            },
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"error": {"code": code, "message": str(exc.detail), "param": None}}, status_code=exc.status_code
        )
