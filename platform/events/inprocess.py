"""The embedded mode's bus: subscribers in this process, one delivery thread each."""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from lorafleet.platform.events.base import Callback, Event, encode_event, validate_topic

log = logging.getLogger(__name__)

class _Subscription:
    def __init__(self, bus: InProcessBus, topic: str, callback: Callback) -> None:
        self.topic = topic
        self._bus = bus
        self._callback = callback
        # A deque under a condition, not queue.SimpleQueue: inside platform/, ``queue`` is our own
        # package to the type checker.
        self._inbox: deque[Event] = deque()
        self._ready = threading.Condition()
        self._error: BaseException | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"events-{topic}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed.is_set() and self._error is None

    @property
    def error(self) -> BaseException | None:
        return self._error

    def deliver(self, event: Event) -> None:
        if self.alive:
            with self._ready:
                self._inbox.append(event)
                self._ready.notify()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._bus._forget(self)
        with self._ready:
            self._ready.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def _next(self) -> Event | None:
        with self._ready:
            while not self._inbox and not self._closed.is_set():
                self._ready.wait()
            return None if self._closed.is_set() else self._inbox.popleft()

    def _run(self) -> None:
        while (event := self._next()) is not None:
            try:
                self._callback(event)
            except BaseException as exc:
                # Not "keep going": the subscription ends here (documented), its error is kept and
                # logged with the traceback, and the subscriber's reconciliation repairs what it misses.
                self._error = exc
                self._closed.set()
                self._bus._forget(self)
                log.exception("subscriber of %r raised; its subscription ended", self.topic)
                return


class InProcessBus:
    """:class:`~lorafleet.platform.events.base.EventBus` for one process (``lorafleet up``).

    Payloads go through JSON exactly as they would over Redis, so a payload that works here
    works in production, and no subscriber can mutate what another one receives.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, list[_Subscription]] = {}

    def publish(self, topic: str, payload: dict[str, Any]) -> Event:
        wire = encode_event(topic, payload)
        with self._lock:
            targets = list(self._subs.get(topic, ()))
        for sub in targets:
            sub.deliver(Event.model_validate_json(wire))  # each subscriber its own copy
        return Event.model_validate_json(wire)

    def subscribe(self, topic: str, callback: Callback) -> _Subscription:
        validate_topic(topic)
        sub = _Subscription(self, topic, callback)
        with self._lock:
            self._subs.setdefault(topic, []).append(sub)
        return sub

    def subscriber_count(self, topic: str) -> int:
        with self._lock:
            return len(self._subs.get(topic, ()))

    def close(self) -> None:
        with self._lock:
            subs = [s for group in self._subs.values() for s in group]
        for sub in subs:
            sub.close()

    def _forget(self, sub: _Subscription) -> None:
        with self._lock:
            group = self._subs.get(sub.topic, [])
            if sub in group:
                group.remove(sub)
