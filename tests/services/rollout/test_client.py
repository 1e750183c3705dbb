"""The replica client's error classification and retries, against a real ASGI app answering the
agent's warm endpoint from a script (refusals with Retry-After, verification errors, success)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from lorafleet.services.rollout.client import ReplicaClient, ReplicaError


def scripted_agent(script: list[tuple[int, dict[str, str]]]) -> tuple[FastAPI, list[float]]:
    """Each warm call takes the next (status, headers) from ``script``; the last one repeats."""
    app = FastAPI()
    calls: list[float] = []

    @app.post("/internal/adapters/warm")
    async def warm(body: dict[str, Any]) -> JSONResponse:
        calls.append(time.monotonic())
        status, headers = script[min(len(calls) - 1, len(script) - 1)]
        if status == 200:
            return JSONResponse({"object": "adapter_load", "replica_id": "r", "revision_id": body["revision_id"],
                                 "tier": body["tier"], "pinned": body["pin"], "already_resident": False,
                                 "seconds": {"fetch": 0.1}, "a_field_from_the_future": 1})
        codes = {503: "cold_load_queue_full", 500: "checksum_mismatch", 409: "base_mismatch", 401: "invalid_api_key"}
        return JSONResponse({"error": {"code": codes[status], "message": "no", "param": None}}, status_code=status,
                            headers=headers)

    return app, calls


def run(script: list[tuple[int, dict[str, str]]], *, within: float = 10.0) -> tuple[Any, list[float], int]:
    app, calls = scripted_agent(script)
    attempts = 0

    async def go() -> Any:
        nonlocal attempts
        client = ReplicaClient(admin_key="k", transport=httpx.ASGITransport(app=app))

        def count() -> None:
            nonlocal attempts
            attempts += 1

        try:
            return await ReplicaClient.retrying(lambda: client.warm("http://replica", "rev1"), within_seconds=within,
                                                on_attempt=count)
        finally:
            await client.aclose()

    try:
        return asyncio.run(go()), calls, attempts
    except ReplicaError as exc:
        return exc, calls, attempts


def test_success_is_parsed_tolerantly() -> None:
    report, calls, attempts = run([(200, {})])
    assert (report.revision_id, report.tier, report.pinned, report.seconds) == ("rev1", "device", True, {"fetch": 0.1})
    assert attempts == len(calls) == 1


def test_a_refusal_is_retried_no_sooner_than_retry_after() -> None:
    report, calls, attempts = run([(503, {"Retry-After": "1"}), (200, {})])
    assert report.revision_id == "rev1" and attempts == 2
    assert calls[1] - calls[0] >= 0.95  # the replica's hint, not the 0.1 s first backoff


@pytest.mark.parametrize(("status", "code"), [(500, "checksum_mismatch"), (409, "base_mismatch"),
                                              (401, "invalid_api_key")])
def test_other_errors_are_final_at_once(status: int, code: str) -> None:
    exc, calls, _ = run([(status, {})])
    assert isinstance(exc, ReplicaError) and not exc.retryable
    assert (exc.code, exc.status, len(calls)) == (code, status, 1)


def test_refusals_give_up_after_the_time_allowed() -> None:
    start = time.monotonic()
    exc, calls, _ = run([(503, {"Retry-After": "0"})], within=1.0)
    assert isinstance(exc, ReplicaError) and exc.retryable and exc.code == "cold_load_queue_full"
    assert 1.0 <= time.monotonic() - start < 5.0 and len(calls) >= 3


def test_an_unreachable_replica_is_retryable() -> None:
    async def go() -> ReplicaError:
        client = ReplicaClient(admin_key="k", connect_timeout=0.5)
        try:
            await client.warm("http://127.0.0.1:9", "rev1")  # discard port: nothing listens
        except ReplicaError as exc:
            return exc
        finally:
            await client.aclose()
        raise AssertionError("a warm to a closed port succeeded")

    exc = asyncio.run(go())
    assert exc.retryable and exc.code == "replica_unreachable" and exc.status is None
