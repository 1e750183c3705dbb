"""Database: SQLAlchemy models, engine helpers, tenant-scoped access and migrations."""

from lorafleet.platform.db import models
from lorafleet.platform.db.engine import make_engine, make_sessionmaker, transaction
from lorafleet.platform.db.migrate import downgrade, upgrade
from lorafleet.platform.db.replicas import record_heartbeat
from lorafleet.platform.db.repos import TenantScope

__all__ = [
    "TenantScope",
    "downgrade",
    "make_engine",
    "make_sessionmaker",
    "models",
    "record_heartbeat",
    "transaction",
    "upgrade",
]
