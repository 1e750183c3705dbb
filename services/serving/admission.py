"""Admission control for adapter loads on one serving replica.

A cold load (object store → disk → host → device) costs I/O, CPU and, on the device tier, a
pause between two engine steps. Unbounded, a burst of long-tail requests or a large rollout
would queue without limit and push every user's latency up. :class:`AdmissionController` puts
every load through one gate:

- at most ``max_in_flight`` loads run at once;
- at most ``max_queue`` loads wait, in FIFO order, foreground (a user request is waiting on
  it) before background (a rollout warming a revision nobody uses yet);
- a load of a revision that is already running or waiting is not started again: the new
  caller shares the first one's result (a foreground caller also promotes a waiting background
  load to foreground);
- a load that would find the queue full is refused at once with ``Unavailable``
  (``cold_load_queue_full``, with ``retry_after``), which the HTTP edge answers as 503 with
  ``Retry-After``: a bounded refusal, never an unbounded wait. A waiting background load gives
  its place up to a new foreground one when the queue is full (its callers get the refusal and
  retry; the rollout controller backs off);
- background loads are paced: at most ``max_background_in_flight`` at a time, and none starts
  while the replica's recent step latency (fed by the engine through
  :meth:`AdmissionController.observe_step_latency`) is above ``step_latency_budget_seconds``,
  unless it has been held back ``max_defer_seconds`` already (so warming still finishes on a
  replica that is never idle, just later).

The controller only schedules: it never touches tensors or tiers. What a "load" does is the
function the caller passes. Sharing applies to the load only: a caller that needs more than
the shared result (a pin, say) does that after :meth:`run` returns. Use one instance from one
event loop; :meth:`observe_step_latency` alone may be called from any thread (the engine's
step thread).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable

T = TypeVar("T")

LoadKind = Literal["foreground", "background"]
FOREGROUND: LoadKind = "foreground"
BACKGROUND: LoadKind = "background"


class StepLatencyPacer:
    """Is the replica's serving latency within budget right now?

    The engine reports each step's wall time; the pacer averages the steps of the last
    ``window_seconds``. No step in the window means nothing is being served: within budget.
    """

    def __init__(
        self,
        *,
        budget_seconds: float,
        window_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget_seconds <= 0 or window_seconds <= 0:
            raise InvalidRequest(
                "the step latency budget and window must be positive", param="step_latency_budget_seconds"
            )
        self.budget_seconds = budget_seconds
        self.window_seconds = window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._steps: deque[tuple[float, float]] = deque()

    def observe(self, seconds: float) -> None:
        now = self._clock()
        with self._lock:
            self._steps.append((now, seconds))
            self._trim(now)

    def recent(self) -> float | None:
        """Mean step latency over the window; None when no step ran in it."""
        now = self._clock()
        with self._lock:
            self._trim(now)
            if not self._steps:
                return None
            return sum(s for _, s in self._steps) / len(self._steps)

    def within_budget(self) -> bool:
        recent = self.recent()
        return recent is None or recent <= self.budget_seconds

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_seconds:
            self._steps.popleft()


@dataclass
class _Load:
    key: str
    fn: Callable[[], Awaitable[Any]]
    kind: LoadKind
    future: asyncio.Future[Any]
    enqueued_at: float
    waiters: int = 1
    started: bool = False


@dataclass(frozen=True)
class AdmissionStats:
    in_flight: int
    background_in_flight: int
    queued_foreground: int
    queued_background: int
    refusals: dict[str, int] = field(default_factory=dict)
    """Refused loads by kind since start."""

    @property
    def queued(self) -> int:
        return self.queued_foreground + self.queued_background


class AdmissionController:
    def __init__(
        self,
        *,
        max_in_flight: int,
        max_queue: int,
        max_background_in_flight: int = 1,
        step_latency_budget_seconds: float | None = None,
        pacing_window_seconds: float = 1.0,
        max_defer_seconds: float = 30.0,
        pacing_poll_seconds: float = 0.05,
        replica_id: str = "local",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_in_flight < 1:
            raise InvalidRequest("max_in_flight must be at least 1", param="max_in_flight")
        if max_queue < 0:
            raise InvalidRequest("max_queue must not be negative", param="max_queue")
        if not 1 <= max_background_in_flight <= max_in_flight:
            raise InvalidRequest(
                "max_background_in_flight must be between 1 and max_in_flight",
                param="max_background_in_flight",
            )
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.max_background_in_flight = max_background_in_flight
        self.max_defer_seconds = max_defer_seconds
        self.pacing_poll_seconds = pacing_poll_seconds
        self.replica_id = replica_id
        self.pacer = (
            StepLatencyPacer(
                budget_seconds=step_latency_budget_seconds, window_seconds=pacing_window_seconds, clock=clock
            )
            if step_latency_budget_seconds is not None
            else None
        )
        self._clock = clock
        self._loads: dict[str, _Load] = {}
        self._foreground: deque[_Load] = deque()
        self._background: deque[_Load] = deque()
        self._in_flight = 0
        self._background_in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pacing_timer: asyncio.TimerHandle | None = None
        self._mean_load_seconds = 1.0
        """Running mean of load durations; prices ``retry_after``."""
        self._refusals: dict[str, int] = {FOREGROUND: 0, BACKGROUND: 0}
        self._publish_depth()

    # -- the engine's feed --------------------------------------------------------------------------
    def observe_step_latency(self, seconds: float) -> None:
        """One engine step took ``seconds`` (thread-safe; call it from the step thread)."""
        if self.pacer is not None:
            self.pacer.observe(seconds)

    # -- loads --------------------------------------------------------------------------------------
    async def run(self, key: str, load: Callable[[], Awaitable[T]], *, kind: LoadKind = FOREGROUND) -> T:
        """Run ``load`` under admission (or share the one already admitted for ``key``) and return
        its result. Raises ``Unavailable`` (``cold_load_queue_full``) when it cannot even wait."""
        existing = self._loads.get(key)
        if existing is not None:
            existing.waiters += 1
            if kind == FOREGROUND and existing.kind == BACKGROUND and not existing.started:
                self._background.remove(existing)
                existing.kind = FOREGROUND
                self._foreground.append(existing)
                self._dispatch()
            return await self._wait(existing)  # type: ignore[no-any-return]

        entry = _Load(
            key=key,
            fn=load,
            kind=kind,
            future=asyncio.get_running_loop().create_future(),
            enqueued_at=self._clock(),
        )
        entry.future.add_done_callback(_mark_retrieved)
        self._loads[key] = entry
        (self._foreground if kind == FOREGROUND else self._background).append(entry)
        self._dispatch()
        if not entry.started and self._queued() > self.max_queue:
            victim = self._background[-1] if kind == FOREGROUND and self._background else entry
            self._refuse(victim)
        return await self._wait(entry)  # type: ignore[no-any-return]

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            in_flight=self._in_flight,
            background_in_flight=self._background_in_flight,
            queued_foreground=len(self._foreground),
            queued_background=len(self._background),
            refusals=dict(self._refusals),
        )

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the backlog ahead, priced at the mean load time."""
        rounds = math.ceil((self._queued() + self._in_flight + 1) / self.max_in_flight)
        return float(min(60.0, max(1.0, rounds * self._mean_load_seconds)))

    async def close(self) -> None:
        """Cancel waiting and running loads (shutdown)."""
        if self._pacing_timer is not None:
            self._pacing_timer.cancel()
            self._pacing_timer = None
        for entry in [*self._foreground, *self._background]:
            self._drop_queued(entry)
            entry.future.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------------
    def _queued(self) -> int:
        return len(self._foreground) + len(self._background)

    def _refuse(self, entry: _Load) -> None:
        self._drop_queued(entry)
        self._refusals[entry.kind] += 1
        metrics.COLD_LOAD_REFUSALS.labels(replica=self.replica_id, kind=entry.kind).inc()
        entry.future.set_exception(
            Unavailable(
                f"the adapter load queue of replica {self.replica_id} is full ({self.max_queue} waiting, "
                f"{self._in_flight} loading); retry later",
                code="cold_load_queue_full",
                retry_after=self.retry_after(),
                details={"replica": self.replica_id, "kind": entry.kind},
            )
        )

    def _drop_queued(self, entry: _Load) -> None:
        queue = self._foreground if entry in self._foreground else self._background
        if entry in queue:
            queue.remove(entry)
        if self._loads.get(entry.key) is entry:
            del self._loads[entry.key]
        self._publish_depth()

    async def _wait(self, entry: _Load) -> Any:
        try:
            # shield: one caller going away (client disconnect) must not cancel a load others share
            return await asyncio.shield(entry.future)
        except asyncio.CancelledError:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.started and not entry.future.done():
                self._drop_queued(entry)  # nobody wants it any more and it has not begun: drop it
                entry.future.cancel()
            raise

    def _may_start_background(self, entry: _Load, now: float) -> bool:
        if self._background_in_flight >= self.max_background_in_flight:
            return False
        if self.pacer is None or self.pacer.within_budget():
            return True
        return now - entry.enqueued_at >= self.max_defer_seconds

    def _dispatch(self) -> None:
        now = self._clock()
        held_back = False
        while self._in_flight < self.max_in_flight:
            if self._foreground:
                entry = self._foreground.popleft()
            elif self._background and self._may_start_background(self._background[0], now):
                entry = self._background.popleft()
            else:
                held_back = bool(self._background)
                break
            self._start(entry)
        self._publish_depth()
        if (
            held_back
            and self._pacing_timer is None
            and self._background_in_flight < self.max_background_in_flight
        ):
            # Nothing else wakes us when the latency comes back under budget: look again shortly.
            self._pacing_timer = asyncio.get_running_loop().call_later(
                self.pacing_poll_seconds, self._on_pacing_timer
            )

    def _on_pacing_timer(self) -> None:
        self._pacing_timer = None
        self._dispatch()

    def _start(self, entry: _Load) -> None:
        entry.started = True
        self._in_flight += 1
        if entry.kind == BACKGROUND:
            self._background_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._execute(entry), name=f"adapter-load-{entry.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, entry: _Load) -> None:
        start = self._clock()
        try:
            result = await entry.fn()
        except asyncio.CancelledError:
            entry.future.cancel()
            raise
        except BaseException as exc:  # handed to every waiter, not swallowed
            if not entry.future.done():
                entry.future.set_exception(exc)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to stop
                raise
        else:
            if not entry.future.done():
                entry.future.set_result(result)
            self._mean_load_seconds = 0.8 * self._mean_load_seconds + 0.2 * (self._clock() - start)
        finally:
            self._in_flight -= 1
            if entry.kind == BACKGROUND:
                self._background_in_flight -= 1
            if self._loads.get(entry.key) is entry:
                del self._loads[entry.key]
            self._dispatch()

    def _publish_depth(self) -> None:
        metrics.COLD_LOAD_QUEUE.labels(replica=self.replica_id).set(self._queued())


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    """Every waiter may have gone; do not let asyncio log the shared exception as unretrieved."""
    if not future.cancelled():
        future.exception()
