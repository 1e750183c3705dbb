"""The database-backed job queue (the embedded default): rows of ``queue_items`` with leases.

A claim stamps a row with the worker, a lease expiry and ``attempts + 1``. ``attempts`` is
therefore a fencing token: it changes on every claim, so the receipt ``<seq>:<attempts>:<worker>``
names exactly one claim, and a worker whose lease expired and was re-claimed (even by a worker
of the same name) can no longer ack, extend or release.

Concurrency: on PostgreSQL a claim picks its row with ``FOR UPDATE SKIP LOCKED``, so claimers
never wait on each other's rows. SQLite has one writer at a time; a claim takes the write lock
up front (``BEGIN IMMEDIATE``) so that its read and its update cannot interleave with another's.
Either way the update repeats the "claimable" condition as a guard.

Times are the workers' clocks (UTC); leases assume clocks in step to well under a lease.
Acknowledged rows are kept (``acked``) so a dedupe key keeps answering with its first id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from lorafleet.platform.db.models import QueueItem, utcnow
from lorafleet.platform.domain.errors import Conflict, InvalidRequest
from lorafleet.platform.queue._common import (
    bad_receipt,
    check_claim,
    check_delay,
    check_enqueue,
    check_lease,
    new_message_id,
)
from lorafleet.platform.queue.base import Message

_SUPPORTED = ("postgresql", "sqlite")


class DatabaseQueue:
    def __init__(self, engine: Engine) -> None:
        if engine.dialect.name not in _SUPPORTED:
            raise InvalidRequest(f"the database queue supports {_SUPPORTED}, not {engine.dialect.name}",
                                 code="invalid_settings")
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"

    def enqueue(self, queue: str, payload: dict[str, Any], *, dedupe_key: str | None = None,
                delay_seconds: float = 0.0) -> str:
        check_enqueue(queue, payload, dedupe_key, delay_seconds)
        now = utcnow()
        message_id = new_message_id()
        insert = (sqlite.insert if self._sqlite else postgresql.insert)(QueueItem).values(
            id=message_id, queue=queue, dedupe_key=dedupe_key, payload=payload,
            available_at=now + timedelta(seconds=delay_seconds), attempts=0, acked=False, created_at=now,
        )
        if dedupe_key is not None:
            insert = insert.on_conflict_do_nothing(index_elements=["queue", "dedupe_key"])
        with self._write() as conn:
            if conn.execute(insert.returning(QueueItem.id)).scalar_one_or_none() is not None:
                return message_id
            # Only a dedupe conflict skips the insert: answer with the id the key already names.
            return conn.execute(select(QueueItem.id).where(
                QueueItem.queue == queue, QueueItem.dedupe_key == dedupe_key)).scalar_one()

    def claim(self, queue: str, *, worker: str, lease_seconds: float) -> Message | None:
        check_claim(queue, worker, lease_seconds)
        now = utcnow()
        claimable = and_(
            QueueItem.queue == queue,
            QueueItem.acked.is_(False),
            QueueItem.available_at <= now,
            or_(QueueItem.lease_expires_at.is_(None), QueueItem.lease_expires_at <= now),
        )
        candidate = (select(QueueItem.seq).where(claimable)
                     .order_by(QueueItem.available_at, QueueItem.seq).limit(1))
        if not self._sqlite:
            candidate = candidate.with_for_update(skip_locked=True)
        with self._write() as conn:
            seq = conn.scalar(candidate)
            if seq is None:
                return None
            row = conn.execute(
                update(QueueItem)
                .where(QueueItem.seq == seq, claimable)
                .values(lease_owner=worker, lease_expires_at=now + timedelta(seconds=lease_seconds),
                        attempts=QueueItem.attempts + 1)
                .returning(QueueItem.id, QueueItem.payload, QueueItem.attempts)
            ).one_or_none()
        if row is None:
            return None
        return Message(id=row.id, queue=queue, payload=row.payload, attempts=row.attempts,
                       receipt=f"{seq}:{row.attempts}:{worker}")

    def extend(self, message: Message, *, lease_seconds: float) -> bool:
        check_lease(lease_seconds)
        with self._write() as conn:
            result = conn.execute(update(QueueItem).where(self._held(message)).values(
                lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)))
        return result.rowcount == 1

    def ack(self, message: Message) -> None:
        with self._write() as conn:
            result = conn.execute(update(QueueItem).where(self._held(message)).values(
                acked=True, lease_expires_at=None))
        if result.rowcount != 1:
            raise _lease_lost(message)

    def release(self, message: Message, *, delay_seconds: float = 0.0) -> None:
        check_delay(delay_seconds)
        with self._write() as conn:
            result = conn.execute(update(QueueItem).where(self._held(message)).values(
                lease_owner=None, lease_expires_at=None,
                available_at=utcnow() + timedelta(seconds=delay_seconds)))
        if result.rowcount != 1:
            raise _lease_lost(message)

    def depth(self, queue: str) -> int:
        with self._engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(QueueItem).where(
                QueueItem.queue == queue, QueueItem.acked.is_(False))) or 0)

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _held(message: Message) -> ColumnElement[bool]:
        """Still this claim: same row, same claim number, same worker, not yet acknowledged.
        An expired lease nobody re-claimed still counts: the work is not duplicated."""
        try:
            seq, attempts, worker = message.receipt.split(":", 2)
            seq_n, attempts_n = int(seq), int(attempts)
        except ValueError:
            raise bad_receipt(message.receipt) from None
        return and_(QueueItem.seq == seq_n, QueueItem.id == message.id, QueueItem.attempts == attempts_n,
                    QueueItem.lease_owner == worker, QueueItem.acked.is_(False))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction; on SQLite it holds the database's write lock from its start."""
        with self._engine.connect() as conn:
            if self._sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()


def _lease_lost(message: Message) -> Conflict:
    return Conflict(f"message {message.id} is no longer held by this receipt (lease expired and "
                    "re-claimed, released, or already acknowledged)", code="lease_lost")
