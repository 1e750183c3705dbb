"""What the API process holds: built once from Settings at start-up and shared by requests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store.objectstore import ObjectStore, make_object_store
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models
from lorafleet.platform.queue import JobQueue, make_job_queue

JOBS_QUEUE = "jobs"


@dataclass
class ApiState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    queue: JobQueue

    @classmethod
    def create(cls, settings: Settings) -> ApiState:
        engine = make_engine(settings.resolved_database_url)
        return cls(settings=settings, engine=engine, sessions=make_sessionmaker(engine),
                   store=make_object_store(settings), queue=make_job_queue(settings, engine))

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any error."""
        with self.sessions() as session, session.begin():
            yield session

    def audit(self, session: Session, *, tenant_id: str | None, actor: str | None, action: str,
              object_type: str, object_id: str, data: dict[str, Any] | None = None) -> None:
        session.add(models.AuditLog(tenant_id=tenant_id, actor_key_id=actor, action=action,
                                    object_type=object_type, object_id=object_id, data=data))

    def close(self) -> None:
        self.engine.dispose()
