from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from lorafleet.platform.domain.errors import LorafleetError, Unavailable
from lorafleet.services.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: StateDep) -> dict[str, object]:
    """The database and the object store answer."""
    checks: dict[str, str] = {}
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means not ready; reported, not swallowed
        raise Unavailable(f"database unreachable: {exc.__class__.__name__}", code="database_unavailable") from exc
    try:
        state.store.ping()
        checks["object_store"] = "ok"
    except LorafleetError as exc:
        raise Unavailable(f"object store unreachable: {exc.message}", code="object_store_unavailable") from exc
    return {"status": "ready", "checks": checks}
