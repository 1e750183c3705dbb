"""One contract, every JobQueue: the database queue on SQLite and PostgreSQL, and Redis streams."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, event

from lorafleet.platform.config.settings import Settings
from lorafleet.platform.db import make_engine, upgrade
from lorafleet.platform.domain.errors import Conflict, InvalidRequest
from lorafleet.platform.queue import DatabaseQueue, JobQueue, Message, RedisQueue, make_job_queue

LEASE = 0.3
"""Short enough to wait out in a test, long enough for a claim round trip on a busy machine."""


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied per test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("queue-template") / "queue.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration),
                        pytest.param("redis", marks=pytest.mark.integration)])
def queue(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> Iterator[JobQueue]:
    if request.param == "sqlite":
        path = tmp_path / "queue.db"
        shutil.copyfile(sqlite_template, path)
        engine = make_engine(f"sqlite:///{path}")

        @event.listens_for(engine, "connect")
        def _no_fsync_per_commit(dbapi_conn: Any, _record: Any) -> None:
            # These tests check locking, not power-loss durability; WAL + NORMAL locks the
            # same way and spares the shared test disk an fsync per transaction.
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        yield DatabaseQueue(engine)
        engine.dispose()
    elif request.param == "postgresql":
        yield DatabaseQueue(request.getfixturevalue("pg_engine"))
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisQueue(client, request.getfixturevalue("redis_prefix"))
        client.close()


@pytest.fixture
def name() -> str:
    """A queue name of its own per test (the PostgreSQL database is shared by the session)."""
    return f"q-{uuid.uuid4().hex[:12]}"


def _claim(queue: JobQueue, name: str, worker: str = "w1", lease: float = LEASE) -> Message | None:
    return queue.claim(name, worker=worker, lease_seconds=lease)


def test_implements_the_protocol(queue: JobQueue) -> None:
    assert isinstance(queue, JobQueue)


def test_a_message_is_claimed_once_while_leased(queue: JobQueue, name: str) -> None:
    message_id = queue.enqueue(name, {"job": "ftjob-1", "n": [1, 2]})
    message = _claim(queue, name, lease=30)
    assert message is not None
    assert (message.id, message.queue, message.payload, message.attempts) == (
        message_id, name, {"job": "ftjob-1", "n": [1, 2]}, 1)
    assert _claim(queue, name, worker="w2") is None
    assert queue.depth(name) == 1


def test_oldest_first_and_queues_are_separate(queue: JobQueue, name: str) -> None:
    ids = [queue.enqueue(name, {"i": i}) for i in range(3)]
    queue.enqueue(f"{name}-other", {"i": 99})
    claimed = [_claim(queue, name, lease=30) for _ in range(3)]
    assert [m.id for m in claimed if m] == ids
    assert _claim(queue, name) is None
    assert queue.depth(f"{name}-other") == 1


def test_lease_expiry_redelivers_and_fences_the_old_holder(queue: JobQueue, name: str) -> None:
    message_id = queue.enqueue(name, {"x": 1})
    first = _claim(queue, name, worker="w1")
    assert first is not None
    time.sleep(LEASE + 0.15)
    second = _claim(queue, name, worker="w2", lease=30)
    assert second is not None
    assert (second.id, second.attempts) == (message_id, 2)

    assert queue.extend(first, lease_seconds=30) is False
    for stale in (lambda: queue.ack(first), lambda: queue.release(first)):
        with pytest.raises(Conflict) as info:
            stale()
        assert info.value.code == "lease_lost"
    queue.ack(second)
    assert queue.depth(name) == 0
    assert _claim(queue, name) is None


def test_same_worker_name_cannot_use_a_receipt_from_an_earlier_claim(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {})
    first = _claim(queue, name, worker="same")
    time.sleep(LEASE + 0.15)
    again = _claim(queue, name, worker="same", lease=30)
    assert first is not None and again is not None and again.attempts == 2
    with pytest.raises(Conflict):
        queue.ack(first)
    queue.ack(again)


def test_an_expired_lease_nobody_reclaimed_can_still_be_acked(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {})
    message = _claim(queue, name)
    assert message is not None
    time.sleep(LEASE + 0.15)
    queue.ack(message)
    assert _claim(queue, name) is None


def test_ack_removes_for_good(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {})
    message = _claim(queue, name)
    assert message is not None
    queue.ack(message)
    assert queue.depth(name) == 0
    time.sleep(LEASE + 0.15)
    assert _claim(queue, name) is None
    with pytest.raises(Conflict):  # a second ack of the same claim
        queue.ack(message)


def test_extend_keeps_the_lease(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {})
    message = _claim(queue, name)
    assert message is not None
    for _ in range(4):  # 0.8 s in all, well past the first lease
        time.sleep(LEASE * 2 / 3)
        assert queue.extend(message, lease_seconds=LEASE)
        assert _claim(queue, name, worker="w2") is None
    queue.ack(message)


def test_a_long_lease_is_not_cut_short_by_a_claimer_with_a_short_one(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {})
    holder = _claim(queue, name, worker="patient", lease=30)
    assert holder is not None
    time.sleep(LEASE)
    assert _claim(queue, name, worker="hasty", lease=0.05) is None
    queue.ack(holder)


def test_release_with_delay(queue: JobQueue, name: str) -> None:
    message_id = queue.enqueue(name, {"retry": True})
    message = _claim(queue, name)
    assert message is not None
    queue.release(message, delay_seconds=0.4)
    assert _claim(queue, name, worker="w2") is None
    assert queue.depth(name) == 1
    with pytest.raises(Conflict):  # released: the receipt is spent
        queue.ack(message)
    time.sleep(0.5)
    again = _claim(queue, name, worker="w2")
    assert again is not None
    assert (again.id, again.payload, again.attempts) == (message_id, {"retry": True}, 2)
    queue.release(again)  # no delay: available at once
    third = _claim(queue, name, worker="w3", lease=30)
    assert third is not None and (third.id, third.attempts) == (message_id, 3)
    queue.ack(third)
    assert queue.depth(name) == 0


def test_enqueue_with_delay(queue: JobQueue, name: str) -> None:
    queue.enqueue(name, {"late": 1}, delay_seconds=0.4)
    early = queue.enqueue(name, {"early": 1})
    first = _claim(queue, name, lease=30)
    assert first is not None and first.id == early
    assert _claim(queue, name) is None
    assert queue.depth(name) == 2
    time.sleep(0.5)
    late = _claim(queue, name, lease=30)
    assert late is not None and late.payload == {"late": 1}


def test_dedupe_key_returns_the_first_id(queue: JobQueue, name: str) -> None:
    first = queue.enqueue(name, {"v": 1}, dedupe_key="ftjob-7")
    assert queue.enqueue(name, {"v": 2}, dedupe_key="ftjob-7") == first
    assert queue.enqueue(name, {"v": 3}, dedupe_key="ftjob-8") != first
    assert queue.enqueue(f"{name}-b", {"v": 4}, dedupe_key="ftjob-7") != first  # per queue
    assert queue.depth(name) == 2
    message = _claim(queue, name)
    assert message is not None and message.payload == {"v": 1}
    queue.ack(message)
    # Acknowledged work is not re-enqueued by a late duplicate either.
    assert queue.enqueue(name, {"v": 5}, dedupe_key="ftjob-7") == first
    assert queue.depth(name) == 1


def test_depth_counts_waiting_leased_and_delayed(queue: JobQueue, name: str) -> None:
    assert queue.depth(name) == 0
    for i in range(3):
        queue.enqueue(name, {"i": i})
    queue.enqueue(name, {"i": 3}, delay_seconds=60)
    message = _claim(queue, name, lease=30)
    assert message is not None
    assert queue.depth(name) == 4
    queue.ack(message)
    assert queue.depth(name) == 3


def test_invalid_arguments_are_refused(queue: JobQueue, name: str) -> None:
    for call in (
        lambda: queue.enqueue("bad name!", {}),
        lambda: queue.enqueue("x" * 61, {}),
        lambda: queue.enqueue(name, {"x": object()}),
        lambda: queue.enqueue(name, {}, delay_seconds=-1),
        lambda: queue.enqueue(name, {}, dedupe_key=""),
        lambda: queue.claim(name, worker="w", lease_seconds=0),
        lambda: queue.claim(name, worker="", lease_seconds=1),
        lambda: queue.ack(Message(id="msg-x", queue=name, payload={}, attempts=1, receipt="garbage")),
    ):
        with pytest.raises(InvalidRequest):
            call()
    assert queue.depth(name) == 0


def test_concurrent_claimers_process_every_message_exactly_once(queue: JobQueue, name: str) -> None:
    workers, per_worker = 8, 50
    expected = {queue.enqueue(name, {"n": n}) for n in range(workers * per_worker)}
    processed: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(worker: str) -> None:
        try:
            while (message := queue.claim(name, worker=worker, lease_seconds=60)) is not None:
                with lock:
                    processed.append(message.id)
                queue.ack(message)
        except BaseException as exc:  # surfaced by the assertion below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"worker-{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    duplicates = [mid for mid, count in Counter(processed).items() if count > 1]
    assert duplicates == []
    assert set(processed) == expected
    assert queue.depth(name) == 0


def test_factory_builds_the_configured_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    upgrade(url)
    engine = make_engine(url)
    assert isinstance(make_job_queue(Settings(queue_backend="database", data_dir=tmp_path), engine),
                      DatabaseQueue)
    with pytest.raises(InvalidRequest):
        make_job_queue(Settings(queue_backend="database", data_dir=tmp_path), None)
    engine.dispose()


@pytest.mark.integration
def test_factory_builds_a_redis_queue(redis_url: str, redis_prefix: str, tmp_path: Path, name: str) -> None:
    queue = make_job_queue(Settings(queue_backend="redis", redis_url=redis_url, redis_prefix=redis_prefix,
                                    data_dir=tmp_path))
    assert isinstance(queue, RedisQueue)
    queue.enqueue(name, {"via": "factory"})
    keys = {k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(f"{redis_prefix}*")}
    assert keys and all(k.startswith(f"{redis_prefix}:{{queue:{name}}}:") for k in keys)
