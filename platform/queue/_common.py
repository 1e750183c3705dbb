"""Argument checks and ids shared by the queue backends, so both refuse the same inputs."""

from __future__ import annotations

import json
from typing import Any

from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.ids import new_ulid
from lorafleet.platform.queue.keys import validate_queue_name

MAX_DEDUPE_KEY = 200
MAX_WORKER = 100


def new_message_id() -> str:
    return f"msg-{new_ulid()}"


def check_enqueue(queue: str, payload: dict[str, Any], dedupe_key: str | None, delay_seconds: float) -> str:
    """Validate an enqueue and return the payload as JSON (both backends store that text)."""
    validate_queue_name(queue)
    if dedupe_key is not None and not 0 < len(dedupe_key) <= MAX_DEDUPE_KEY:
        raise InvalidRequest(f"dedupe_key must be 1-{MAX_DEDUPE_KEY} characters", code="invalid_dedupe_key",
                             param="dedupe_key")
    if delay_seconds < 0:
        raise InvalidRequest("delay_seconds must be >= 0", code="invalid_delay", param="delay_seconds")
    if not isinstance(payload, dict):
        raise InvalidRequest("a queue payload is a JSON object", code="invalid_payload", param="payload")
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"payload is not JSON: {exc}", code="invalid_payload", param="payload") from exc


def check_claim(queue: str, worker: str, lease_seconds: float) -> None:
    validate_queue_name(queue)
    if not 0 < len(worker) <= MAX_WORKER:
        raise InvalidRequest(f"worker must be 1-{MAX_WORKER} characters", code="invalid_worker",
                             param="worker")
    check_lease(lease_seconds)


def check_lease(lease_seconds: float) -> None:
    if not lease_seconds > 0:
        raise InvalidRequest("lease_seconds must be > 0", code="invalid_lease", param="lease_seconds")


def check_delay(delay_seconds: float) -> None:
    if delay_seconds < 0:
        raise InvalidRequest("delay_seconds must be >= 0", code="invalid_delay", param="delay_seconds")


def bad_receipt(receipt: str) -> InvalidRequest:
    return InvalidRequest(f"not a receipt of this queue backend: {receipt!r}", code="invalid_receipt",
                          param="receipt")
