"""Job queues: one ``JobQueue`` protocol, backed by the database (embedded) or Redis streams.

``make_job_queue(settings, engine)`` picks one by ``settings.queue_backend``.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from lorafleet.platform.config.settings import Settings
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.queue.base import JobQueue, Message
from lorafleet.platform.queue.database import DatabaseQueue
from lorafleet.platform.queue.keys import RedisKeys
from lorafleet.platform.queue.redis_queue import RedisQueue

__all__ = ["DatabaseQueue", "JobQueue", "Message", "RedisKeys", "RedisQueue", "make_job_queue"]


def _database(settings: Settings, engine: Engine | None) -> JobQueue:
    if engine is None:
        raise InvalidRequest("the database queue needs the database engine", code="invalid_settings",
                             param="queue_backend")
    return DatabaseQueue(engine)


def _redis(settings: Settings, engine: Engine | None) -> JobQueue:
    import redis

    return RedisQueue(redis.Redis.from_url(settings.redis_url), settings.redis_prefix)


JOB_QUEUES: dict[str, Callable[[Settings, Engine | None], JobQueue]] = {
    "database": _database,
    "redis": _redis,
}
"""The registry: ``settings.queue_backend`` names one of these."""


def make_job_queue(settings: Settings, engine: Engine | None = None) -> JobQueue:
    try:
        factory = JOB_QUEUES[settings.queue_backend]
    except KeyError:
        raise InvalidRequest(f"unknown queue backend {settings.queue_backend!r}; known: {sorted(JOB_QUEUES)}",
                             code="invalid_settings", param="queue_backend") from None
    return factory(settings, engine)
