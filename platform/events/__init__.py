"""Notifications between processes: one ``EventBus`` protocol, in-process or Redis pub/sub.

``make_event_bus(settings)`` picks the implementation: Redis when the deployment runs on Redis
(``events_backend = "redis"``, or by default when ``queue_backend == "redis"``), else the
process-wide in-process bus of the embedded mode, which every component of one process shares.
"""

from __future__ import annotations

import threading

from lorafleet.platform.config.settings import Settings
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.events.base import Callback, Event, EventBus, Subscription, validate_topic
from lorafleet.platform.events.inprocess import InProcessBus
from lorafleet.platform.events.topics import (
    POLICY_POINTER_CHANGED,
    PolicyPointerChanged,
    on_pointer_change,
    on_pointer_changed,
)

__all__ = [
    "POLICY_POINTER_CHANGED",
    "Callback",
    "Event",
    "EventBus",
    "InProcessBus",
    "PolicyPointerChanged",
    "Subscription",
    "event_backend",
    "make_event_bus",
    "on_pointer_change",
    "on_pointer_changed",
    "validate_topic",
]

_shared_lock = threading.Lock()
_shared: InProcessBus | None = None


def event_backend(settings: Settings) -> str:
    """``inprocess`` or ``redis``. An explicit ``events_backend`` setting (when the deployment's
    Settings has one) wins; otherwise the bus follows the queue backend."""
    explicit = getattr(settings, "events_backend", None)
    backend = explicit or ("redis" if settings.queue_backend == "redis" else "inprocess")
    if backend not in ("inprocess", "redis"):
        raise InvalidRequest(
            f"unknown events backend {backend!r}; known: inprocess, redis",
            code="invalid_settings",
            param="events_backend",
        )
    return str(backend)


def make_event_bus(settings: Settings) -> EventBus:
    """A new Redis bus (close it when done), or the process's shared in-process bus."""
    if event_backend(settings) == "redis":
        from lorafleet.platform.events.redis_bus import RedisBus

        return RedisBus.from_url(settings.redis_url, settings.redis_prefix)
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = InProcessBus()
        return _shared
