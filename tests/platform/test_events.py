"""The EventBus contract, run against both implementations (Redis: the real server)."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from lorafleet.platform.config import Settings
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.platform.events import Event, EventBus, InProcessBus, event_backend, make_event_bus
from lorafleet.platform.events.redis_bus import RedisBus


def _collector() -> tuple[queue.Queue[Event], Callable[[Event], None]]:
    got: queue.Queue[Event] = queue.Queue()
    return got, got.put


def _take(got: queue.Queue[Event], n: int, timeout: float = 5.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    out = []
    while len(out) < n:
        out.append(got.get(timeout=max(0.01, deadline - time.monotonic())))
    return out


def _nothing(got: queue.Queue[Event], wait: float = 0.3) -> bool:
    try:
        got.get(timeout=wait)
    except queue.Empty:
        return True
    return False


@pytest.fixture(params=["inprocess", "redis"])
def bus(request: pytest.FixtureRequest) -> Iterator[EventBus]:
    if request.param == "inprocess":
        b: EventBus = InProcessBus()
    else:
        b = RedisBus.from_url(request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))
    yield b
    b.close()


def test_delivers_payload_in_order_to_every_subscriber_of_the_topic(bus: EventBus) -> None:
    got_a, cb_a = _collector()
    got_b, cb_b = _collector()
    got_other, cb_other = _collector()
    bus.subscribe("pointer", cb_a)
    bus.subscribe("pointer", cb_b)
    bus.subscribe("other", cb_other)
    sent = [bus.publish("pointer", {"n": i, "nested": {"policy": "p", "ids": [i, i + 1]}}) for i in range(50)]
    for got in (got_a, got_b):
        events = _take(got, 50)
        assert [e.payload["n"] for e in events] == list(range(50))
        assert [e.id for e in events] == [s.id for s in sent]
        assert events[7].payload == {"n": 7, "nested": {"policy": "p", "ids": [7, 8]}}
        assert all(e.topic == "pointer" for e in events)
    assert _nothing(got_other)


def test_subscribers_get_their_own_copy(bus: EventBus) -> None:
    seen: queue.Queue[dict[str, Any]] = queue.Queue()

    def mutating(event: Event) -> None:
        event.payload["ids"].append("mutated")
        seen.put(event.payload)

    got, cb = _collector()
    bus.subscribe("t", mutating)
    bus.subscribe("t", cb)
    bus.publish("t", {"ids": [1]})
    assert seen.get(timeout=5)["ids"] == [1, "mutated"]
    assert _take(got, 1)[0].payload == {"ids": [1]}


def test_closed_subscription_gets_nothing_more(bus: EventBus) -> None:
    got, cb = _collector()
    sub = bus.subscribe("t", cb)
    bus.publish("t", {"n": 1})
    assert _take(got, 1)[0].payload == {"n": 1}
    sub.close()
    sub.close()  # idempotent
    assert not sub.alive
    bus.publish("t", {"n": 2})
    assert _nothing(got)


def test_raising_callback_ends_only_its_own_subscription(bus: EventBus) -> None:
    def broken(event: Event) -> None:
        raise KeyError(event.payload["n"])

    got, cb = _collector()
    bad = bus.subscribe("t", broken)
    good = bus.subscribe("t", cb)
    bus.publish("t", {"n": 1})
    bus.publish("t", {"n": 2})
    assert [e.payload["n"] for e in _take(got, 2)] == [1, 2]
    deadline = time.monotonic() + 5
    while bad.alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not bad.alive
    assert isinstance(bad.error, KeyError)
    assert good.alive and good.error is None


def test_publish_without_subscribers_is_fine_and_returns_the_event(bus: EventBus) -> None:
    event = bus.publish("nobody-listens", {"x": 1})
    assert event.topic == "nobody-listens" and event.payload == {"x": 1} and event.id


@pytest.mark.parametrize("topic", ["", "has space", "a/b", "x" * 61, "ünïcode"])
def test_invalid_topic_is_refused(bus: EventBus, topic: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        bus.publish(topic, {})
    assert exc.value.code == "invalid_event_topic"
    with pytest.raises(InvalidRequest):
        bus.subscribe(topic, lambda e: None)


@pytest.mark.parametrize("payload", [{"b": b"\xff"}, {"o": object()}, ["not", "a", "dict"]])
def test_non_json_payload_is_refused(bus: EventBus, payload: Any) -> None:
    with pytest.raises(InvalidRequest) as exc:
        bus.publish("t", payload)
    assert exc.value.code == "invalid_event_payload"


def test_redis_prefix_isolates_deployments(redis_url: str, redis_prefix: str) -> None:
    ours = RedisBus.from_url(redis_url, redis_prefix)
    theirs = RedisBus.from_url(redis_url, redis_prefix + "-other")
    try:
        got, cb = _collector()
        ours.subscribe("t", cb)
        theirs.publish("t", {"from": "them"})
        ours.publish("t", {"from": "us"})
        assert _take(got, 1)[0].payload == {"from": "us"}
        assert _nothing(got)
    finally:
        ours.close()
        theirs.close()


def test_redis_subscriber_ignores_malformed_messages(redis_url: str, redis_prefix: str) -> None:
    bus = RedisBus.from_url(redis_url, redis_prefix)
    try:
        got, cb = _collector()
        sub = bus.subscribe("t", cb)
        bus.client.publish(bus.keys.events_channel("t"), b"not json")
        bus.publish("t", {"ok": True})
        assert _take(got, 1)[0].payload == {"ok": True}
        assert sub.alive
    finally:
        bus.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.Popen(
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def test_redis_subscription_survives_a_server_restart(tmp_path: Path) -> None:
    """A private Redis is stopped and started again on the same port: the subscription comes back
    by itself; events published while it was down are lost (documented), later ones arrive."""
    port = _free_port()
    proc = _start_redis(port, tmp_path)
    bus = RedisBus.from_url(f"redis://127.0.0.1:{port}/0", "lfrestart", reconnect_seconds=0.2)
    try:
        got, cb = _collector()
        sub = bus.subscribe("t", cb)
        bus.publish("t", {"n": 1})
        assert _take(got, 1)[0].payload == {"n": 1}
        proc.terminate()
        proc.wait(timeout=10)
        with pytest.raises(Unavailable) as exc:
            bus.publish("t", {"n": 2})
        assert exc.value.code == "event_bus_unavailable"
        proc = _start_redis(port, tmp_path)
        deadline = time.monotonic() + 15
        n = 3
        while True:  # publish until the re-subscribed reader hears one
            bus.publish("t", {"n": n})
            try:
                event = got.get(timeout=0.3)
                break
            except queue.Empty:
                n += 1
                assert time.monotonic() < deadline, "the subscription did not come back after the restart"
        assert event.payload["n"] >= 3
        assert sub.alive
    finally:
        bus.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_factory_follows_settings(tmp_path: Path, redis_url: str) -> None:
    embedded = Settings(data_dir=tmp_path)
    assert event_backend(embedded) == "inprocess"
    first, second = make_event_bus(embedded), make_event_bus(embedded)
    assert isinstance(first, InProcessBus) and first is second  # one bus per process: up's roles share it
    prod = Settings(data_dir=tmp_path, queue_backend="redis", redis_url=redis_url, redis_prefix="lffactory")
    assert event_backend(prod) == "redis"
    bus = make_event_bus(prod)
    try:
        assert isinstance(bus, RedisBus)
    finally:
        bus.close()
