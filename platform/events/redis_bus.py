"""The production bus: Redis pub/sub, one channel per topic under the deployment's prefix.

Each subscription holds its own pub/sub connection and delivery thread (redis-py's worker
thread). When the connection drops, the thread waits ``reconnect_seconds`` and reads again;
redis-py then reconnects and re-subscribes the channel by itself. Events published while it was
away are lost (pub/sub keeps nothing): subscribers reconcile from the database for that.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from pydantic import ValidationError
from redis.client import PubSub, PubSubWorkerThread

from lorafleet.platform.domain.errors import Unavailable
from lorafleet.platform.events.base import Callback, Event, encode_event, validate_topic
from lorafleet.platform.queue.keys import RedisKeys

log = logging.getLogger(__name__)


class _CallbackFailed(Exception):
    """Carries a subscriber callback's exception out of redis-py's reader to our handler."""


class _RedisSubscription:
    def __init__(self, bus: RedisBus, topic: str, callback: Callback, *, subscribe_timeout: float) -> None:
        self.topic = topic
        self._bus = bus
        self._callback = callback
        self._error: BaseException | None = None
        self._closed = threading.Event()
        self._pubsub: PubSub = bus.client.pubsub()
        channel = bus.keys.events_channel(topic)
        try:
            self._pubsub.subscribe(**{channel: self._on_message})
            self._await_confirmation(channel, subscribe_timeout)
        except redis.RedisError as exc:
            self._pubsub.close()
            raise Unavailable(
                f"cannot subscribe to {topic!r} on Redis: {exc}",
                code="event_bus_unavailable",
                retry_after=bus.reconnect_seconds,
            ) from exc
        self._thread: PubSubWorkerThread = self._pubsub.run_in_thread(
            sleep_time=0.2, daemon=True, exception_handler=self._on_error
        )

    def _await_confirmation(self, channel: str, timeout: float) -> None:
        """Only once Redis has confirmed SUBSCRIBE is a later PUBLISH (from any connection) ours."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            if message and message.get("type") == "subscribe":
                return
        raise redis.TimeoutError(f"no confirmation of SUBSCRIBE {channel} within {timeout}s")

    @property
    def alive(self) -> bool:
        return not self._closed.is_set() and self._error is None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._bus._forget(self)
        self._thread.stop()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _on_message(self, message: dict[str, Any]) -> None:
        if self._closed.is_set():
            return
        try:
            event = Event.model_validate_json(message["data"])
        except ValidationError as exc:  # someone else's message on our channel: not ours to act on
            log.warning("dropped a malformed event on %r: %s", self.topic, exc)
            return
        try:
            self._callback(event)
        except BaseException as exc:
            raise _CallbackFailed() from exc

    def _on_error(self, exc: BaseException, pubsub: PubSub, thread: PubSubWorkerThread) -> None:
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and not self._closed.is_set():
            log.warning(
                "event subscription %r lost Redis (%s); retrying in %.1fs",
                self.topic,
                exc,
                self._bus.reconnect_seconds,
            )
            self._closed.wait(self._bus.reconnect_seconds)
            return
        # The subscription ends (documented): a callback raised, or Redis answered something
        # this reader does not understand. The error is kept and logged with its traceback.
        self._error = exc.__cause__ if isinstance(exc, _CallbackFailed) and exc.__cause__ else exc
        self._closed.set()
        self._bus._forget(self)
        thread.stop()
        log.error("event subscription %r ended", self.topic, exc_info=self._error)


class RedisBus:
    """:class:`~lorafleet.platform.events.base.EventBus` over Redis pub/sub."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        reconnect_seconds: float = 1.0,
        subscribe_timeout: float = 5.0,
    ) -> None:
        self.client = client
        self.keys = RedisKeys(prefix)
        self.reconnect_seconds = reconnect_seconds
        self._subscribe_timeout = subscribe_timeout
        self._lock = threading.Lock()
        self._subs: list[_RedisSubscription] = []

    @classmethod
    def from_url(cls, url: str, prefix: str, **kwargs: Any) -> RedisBus:
        # A short socket timeout keeps a publish from hanging when Redis is gone.
        client = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=5.0, health_check_interval=10
        )
        return cls(client, prefix, **kwargs)

    def publish(self, topic: str, payload: dict[str, Any]) -> Event:
        wire = encode_event(topic, payload)
        try:
            self.client.publish(self.keys.events_channel(topic), wire)
        except redis.RedisError as exc:
            raise Unavailable(
                f"cannot publish {topic!r} to Redis: {exc}",
                code="event_bus_unavailable",
                retry_after=self.reconnect_seconds,
            ) from exc
        return Event.model_validate_json(wire)

    def subscribe(self, topic: str, callback: Callback) -> _RedisSubscription:
        validate_topic(topic)
        sub = _RedisSubscription(self, topic, callback, subscribe_timeout=self._subscribe_timeout)
        with self._lock:
            self._subs.append(sub)
        return sub

    def close(self) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            sub.close()
        self.client.close()

    def _forget(self, sub: _RedisSubscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
