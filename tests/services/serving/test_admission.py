"""Admission control of adapter loads: bounds, FIFO with foreground first, dedupe, refusal,
pacing of background loads. The loads are coroutines gated by events, so every interleaving
is chosen by the test, not by timing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.services.serving.admission import AdmissionController, StepLatencyPacer


@dataclass
class Loads:
    """Gated fake loads: ``fn(key)`` starts, records itself, and finishes when ``finish(key)`` is called."""

    started: list[str] = field(default_factory=list)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    fail: dict[str, BaseException] = field(default_factory=dict)

    def fn(self, key: str) -> Callable[[], Awaitable[str]]:
        async def load() -> str:
            self.started.append(key)
            gate = self.gates.setdefault(key, asyncio.Event())
            await gate.wait()
            gate.clear()
            if key in self.fail:
                raise self.fail[key]
            return f"loaded:{key}"

        return load

    def finish(self, key: str) -> None:
        self.gates.setdefault(key, asyncio.Event()).set()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# (max_in_flight, max_queue, requests as "key:kind", started, outcome per request)
# outcome: "ok" = resolves with its key's result, "refused" = Unavailable(cold_load_queue_full)
TABLE = [
    pytest.param(1, 1, ["a:fg", "b:fg", "c:fg"], ["a"], ["ok", "ok", "refused"], id="queue-full-refuses"),
    pytest.param(2, 0, ["a:fg", "b:fg", "c:fg"], ["a", "b"], ["ok", "ok", "refused"], id="no-queue"),
    pytest.param(
        1,
        1,
        ["a:fg", "a:fg", "b:fg", "b:bg", "c:fg"],
        ["a"],
        ["ok", "ok", "ok", "ok", "refused"],
        id="dedupe-takes-no-slot",
    ),
    pytest.param(
        1,
        1,
        ["a:fg", "x:bg", "y:fg"],
        ["a"],
        ["ok", "refused", "ok"],
        id="foreground-preempts-waiting-background",
    ),
    pytest.param(
        1, 1, ["a:fg", "y:fg", "x:bg"], ["a"], ["ok", "ok", "refused"], id="background-never-preempts"
    ),
    pytest.param(
        3, 4, ["a:bg", "b:bg", "c:fg", "d:fg"], ["a", "c", "d"], ["ok"] * 4, id="one-background-at-a-time"
    ),
]


@pytest.mark.parametrize(("k", "q", "requests", "started", "outcomes"), TABLE)
def test_admission_table(
    k: int, q: int, requests: list[str], started: list[str], outcomes: list[str]
) -> None:
    async def scenario() -> None:
        loads = Loads()
        ac = AdmissionController(max_in_flight=k, max_queue=q, replica_id="table")
        tasks = []
        for req in requests:
            key, kind = req.split(":")
            tasks.append(
                asyncio.create_task(
                    ac.run(key, loads.fn(key), kind="foreground" if kind == "fg" else "background")
                )
            )
            await settle()
        assert loads.started == started
        for key in dict.fromkeys(r.split(":")[0] for r in requests):
            loads.finish(key)
        for _ in range(len(requests)):  # queued loads start as slots free up; finish them too
            await settle()
            for key in loads.started:
                loads.finish(key)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for req, outcome, result in zip(requests, outcomes, results, strict=True):
            if outcome == "ok":
                assert result == f"loaded:{req.split(':')[0]}", req
            else:
                assert isinstance(result, Unavailable), req
                assert result.code == "cold_load_queue_full" and result.retry_after >= 1
        # every distinct admitted key ran exactly once
        admitted = {r.split(":")[0] for r, o in zip(requests, outcomes, strict=True) if o == "ok"}
        assert sorted(loads.started) == sorted(admitted)
        assert ac.stats().in_flight == 0 and ac.stats().queued == 0

    run(scenario())


def test_fifo_within_a_class_and_foreground_first() -> None:
    async def scenario() -> list[str]:
        loads = Loads()
        ac = AdmissionController(max_in_flight=1, max_queue=10, max_background_in_flight=1)
        tasks = [asyncio.create_task(ac.run("first", loads.fn("first")))]
        await settle()
        for key, kind in [
            ("bg1", "background"),
            ("fg1", "foreground"),
            ("bg2", "background"),
            ("fg2", "foreground"),
        ]:
            tasks.append(asyncio.create_task(ac.run(key, loads.fn(key), kind=kind)))  # type: ignore[arg-type]
            await settle()
        assert ac.stats().queued_foreground == 2 and ac.stats().queued_background == 2
        while len(loads.started) < 5 or not all(t.done() for t in tasks):
            loads.finish(loads.started[-1])
            await settle()
        return loads.started

    assert run(scenario()) == ["first", "fg1", "fg2", "bg1", "bg2"]


def test_foreground_caller_promotes_a_waiting_background_load() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        loads = Loads()
        ac = AdmissionController(max_in_flight=1, max_queue=10)
        busy = asyncio.create_task(ac.run("busy", loads.fn("busy")))
        await settle()
        bg_a = asyncio.create_task(ac.run("a", loads.fn("a"), kind="background"))
        bg_b = asyncio.create_task(ac.run("b", loads.fn("b"), kind="background"))
        await settle()
        fg_b = asyncio.create_task(ac.run("b", loads.fn("b"), kind="foreground"))  # a user now needs b
        await settle()
        for key in ("busy", "b", "a"):
            loads.finish(key)
            await settle()
        results = await asyncio.gather(busy, bg_a, bg_b, fg_b)
        return loads.started, results

    started, results = run(scenario())
    assert started == ["busy", "b", "a"]
    assert results == ["loaded:busy", "loaded:a", "loaded:b", "loaded:b"]


def test_a_failed_load_fails_every_waiter_and_is_not_cached() -> None:
    async def scenario() -> None:
        loads = Loads()
        loads.fail["bad"] = InvalidRequest("bundle refused", code="bundle_corrupt")
        ac = AdmissionController(max_in_flight=2, max_queue=2)
        waiters = [asyncio.create_task(ac.run("bad", loads.fn("bad"))) for _ in range(3)]
        await settle()
        loads.finish("bad")
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, InvalidRequest) and r.code == "bundle_corrupt" for r in results)
        assert results[0] is results[1] is results[2]
        assert loads.started == ["bad"]
        del loads.fail["bad"]
        again = asyncio.create_task(ac.run("bad", loads.fn("bad")))
        await settle()
        loads.finish("bad")
        assert await again == "loaded:bad"
        assert loads.started == ["bad", "bad"]

    run(scenario())


def test_cancelled_sole_waiter_drops_its_queued_load_but_a_shared_running_load_goes_on() -> None:
    async def scenario() -> None:
        loads = Loads()
        ac = AdmissionController(max_in_flight=1, max_queue=5)
        running_1 = asyncio.create_task(ac.run("r", loads.fn("r")))
        running_2 = asyncio.create_task(ac.run("r", loads.fn("r")))
        queued = asyncio.create_task(ac.run("q", loads.fn("q")))
        await settle()
        assert ac.stats().queued == 1
        queued.cancel()
        running_1.cancel()  # a client disconnected; the other caller still wants "r"
        await settle()
        assert ac.stats().queued == 0
        loads.finish("r")
        assert await running_2 == "loaded:r"
        await settle()
        assert loads.started == ["r"]  # "q" never ran: nobody wanted it any more
        assert queued.cancelled() and running_1.cancelled()

    run(scenario())


def test_background_waits_while_step_latency_is_over_budget() -> None:
    async def scenario() -> None:
        clock = Clock()
        loads = Loads()
        ac = AdmissionController(
            max_in_flight=2,
            max_queue=5,
            step_latency_budget_seconds=0.05,
            pacing_window_seconds=1.0,
            max_defer_seconds=60.0,
            pacing_poll_seconds=0.01,
            clock=clock,
        )
        for _ in range(5):
            ac.observe_step_latency(0.2)  # serving is slow right now
        warm = asyncio.create_task(ac.run("warm", loads.fn("warm"), kind="background"))
        user = asyncio.create_task(ac.run("user", loads.fn("user"), kind="foreground"))
        await asyncio.sleep(0.05)
        assert loads.started == ["user"]  # foreground is never paced
        loads.finish("user")
        await user
        await asyncio.sleep(0.05)
        assert loads.started == ["user"]  # still over budget (window not yet passed)
        clock.now += 2.0  # the slow steps leave the window; new steps are fast
        ac.observe_step_latency(0.01)
        await asyncio.sleep(0.05)
        assert loads.started == ["user", "warm"]
        loads.finish("warm")
        assert await warm == "loaded:warm"

    run(scenario())


def test_background_held_back_longer_than_max_defer_runs_anyway() -> None:
    async def scenario() -> None:
        clock = Clock()
        loads = Loads()
        ac = AdmissionController(
            max_in_flight=1,
            max_queue=5,
            step_latency_budget_seconds=0.05,
            pacing_window_seconds=100.0,
            max_defer_seconds=10.0,
            pacing_poll_seconds=0.01,
            clock=clock,
        )
        ac.observe_step_latency(1.0)
        warm = asyncio.create_task(ac.run("warm", loads.fn("warm"), kind="background"))
        await asyncio.sleep(0.05)
        assert loads.started == []
        clock.now += 11.0  # latency is still over budget, but the warm has waited long enough
        await asyncio.sleep(0.05)
        assert loads.started == ["warm"]
        loads.finish("warm")
        await warm

    run(scenario())


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], None),
        ([(0.0, 0.1), (0.5, 0.3)], 0.2),
        ([(0.0, 9.0), (2.0, 0.1)], 0.1),  # the first step left the 1 s window
    ],
)
def test_pacer_averages_the_window(steps: list[tuple[float, float]], expected: float | None) -> None:
    clock = Clock()
    start = clock.now
    pacer = StepLatencyPacer(budget_seconds=0.15, window_seconds=1.0, clock=clock)
    for at, seconds in steps:
        clock.now = start + at
        pacer.observe(seconds)
    assert pacer.recent() == (pytest.approx(expected) if expected is not None else None)
    assert pacer.within_budget() == (expected is None or expected <= 0.15)


def test_metrics_count_queue_depth_and_refusals() -> None:
    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    async def scenario() -> None:
        loads = Loads()
        ac = AdmissionController(max_in_flight=1, max_queue=2, replica_id="rep-metrics")
        before = sample("lorafleet_cold_load_refusals_total", replica="rep-metrics", kind="background")
        tasks = [
            asyncio.create_task(ac.run(k, loads.fn(k), kind="background" if k == "z" else "foreground"))
            for k in ("a", "b", "c")
        ]
        await settle()
        assert sample("lorafleet_cold_load_queue_depth", replica="rep-metrics") == 2
        refused = asyncio.create_task(ac.run("z", loads.fn("z"), kind="background"))
        await settle()
        with pytest.raises(Unavailable):
            await refused
        assert (
            sample("lorafleet_cold_load_refusals_total", replica="rep-metrics", kind="background")
            == before + 1
        )
        for key in ("a", "b", "c"):
            loads.finish(key)
            await settle()
        await asyncio.gather(*tasks)
        assert sample("lorafleet_cold_load_queue_depth", replica="rep-metrics") == 0
        assert ac.stats().refusals == {"foreground": 0, "background": 1}

    run(scenario())


def test_refusal_is_a_503_with_retry_after_at_the_http_edge() -> None:
    from lorafleet.services.serving.api import errors

    app = FastAPI()
    errors.install(app)
    ac_holder: dict[str, AdmissionController] = {}
    gate: dict[str, asyncio.Event] = {}

    @app.post("/load/{key}")
    async def load(key: str) -> dict[str, str]:
        ac = ac_holder.setdefault("ac", AdmissionController(max_in_flight=1, max_queue=0))

        async def slow() -> str:
            await gate.setdefault("g", asyncio.Event()).wait()
            return key

        if key == "hold":  # occupy the only slot without waiting for it here
            asyncio.get_running_loop().create_task(ac.run(key, slow))
            await asyncio.sleep(0)
            return {"held": key}
        return {"loaded": await ac.run(key, slow)}

    with TestClient(app) as client:
        assert client.post("/load/hold").status_code == 200
        r = client.post("/load/other")
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "cold_load_queue_full"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_in_flight": 0, "max_queue": 1},
        {"max_in_flight": 1, "max_queue": -1},
        {"max_in_flight": 2, "max_queue": 1, "max_background_in_flight": 3},
        {"max_in_flight": 1, "max_queue": 1, "step_latency_budget_seconds": 0.0},
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        AdmissionController(**kwargs)
