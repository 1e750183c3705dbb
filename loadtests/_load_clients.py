"""The load generators of ``rollout_under_load.py``: the request, the closed-loop and open-loop
clients and the first-request sender, each of the latter three run in a spawned process of its own. Each process
puts None on its output queue once it is ready, so that the benchmark starts no phase before
every generator runs (a spawned process re-imports the benchmark, torch included, first)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import httpx


def _chat_request(url: str, key: str, model: str, max_tokens: int) -> dict[str, Any]:
    """The one request every load generator sends (``client.stream(**...)``): a short greedy
    streamed chat completion."""
    return {
        "method": "POST",
        "url": f"{url}/v1/chat/completions",
        "json": {
            "model": model,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        },
        "headers": {"Authorization": f"Bearer {key}"},
        "timeout": 120,
    }


def stream_chat(
    client: httpx.Client, url: str, key: str, model: str, max_tokens: int
) -> tuple[int, float | None, float | None, str | None]:
    """(status, ttft, adapter wait, revision) of one streamed chat completion, read to the end.

    ``client`` is long-lived (kept-alive connections): a new httpx client per request builds an
    SSL context and a connection each time, which cost the load generators more CPU than the
    replicas spent serving, on a machine the replicas share with them."""
    t0 = time.perf_counter()
    with client.stream(**_chat_request(url, key, model, max_tokens)) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, None, None, None
        ttft = None
        for line in r.iter_lines():
            if ttft is None and line.startswith("data:"):
                ttft = time.perf_counter() - t0
        wait = r.headers.get("X-Lorafleet-Adapter-Wait-Seconds")
        return 200, ttft, float(wait) if wait is not None else None, r.headers.get("X-Lorafleet-Revision")


def client_loop(
    seed: int, urls: list[str], key: str, policies: list[str], max_tokens: int, stop: Any, out: Any
) -> None:
    """One closed-loop background client (a process of its own): (start time, status, ttft, wait, revision)."""
    rng = random.Random(seed)
    with httpx.Client() as client:
        out.put(None)  # ready
        while not stop.is_set():
            started = time.time()
            status, ttft, wait, rev = stream_chat(client, rng.choice(urls), key, rng.choice(policies), max_tokens)
            out.put((started, status, ttft, wait, rev))


async def _stream_chat_async(
    client: httpx.AsyncClient, url: str, key: str, model: str, max_tokens: int
) -> tuple[int, float | None, float | None, str | None]:
    """:func:`stream_chat` on an async client (the open-loop generator keeps many requests open)."""
    t0 = time.perf_counter()
    async with client.stream(**_chat_request(url, key, model, max_tokens)) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None, None
        ttft = None
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data:"):
                ttft = time.perf_counter() - t0
        wait = r.headers.get("X-Lorafleet-Adapter-Wait-Seconds")
        return 200, ttft, float(wait) if wait is not None else None, r.headers.get("X-Lorafleet-Revision")


def open_loop(
    seed: int, urls: list[str], key: str, policies: list[str], max_tokens: int, rate: float, stop: Any, out: Any
) -> None:
    """One open-loop background client (a process of its own): requests arrive as a Poisson process
    of ``rate`` per second, each sent when it arrives whether or not earlier ones have finished (a
    service's users do not wait for each other). Puts (start time, status, ttft, wait, revision)."""
    rng = random.Random(seed)

    async def one(client: httpx.AsyncClient, started: float) -> None:
        try:
            status, ttft, wait, rev = await _stream_chat_async(
                client, rng.choice(urls), key, rng.choice(policies), max_tokens
            )
        except httpx.HTTPError:
            status, ttft, wait, rev = 599, None, None, None
        out.put((started, status, ttft, wait, rev))

    async def run() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits) as client:
            out.put(None)  # ready
            tasks: set[asyncio.Task[None]] = set()
            due = time.perf_counter()
            while not stop.is_set():
                due += rng.expovariate(rate)
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(client, time.time()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=120)

    asyncio.run(run())


def first_loop(key: str, max_tokens: int, tasks: Any, out: Any) -> None:
    """One sender of first requests (a process of its own): (name, revision, status, ttft, wait, answered by)."""
    with httpx.Client() as client:
        out.put(None)  # ready
        while (task := tasks.get()) is not None:
            url, name, revision = task
            status, ttft, wait, rev = stream_chat(client, url, key, name, max_tokens)
            out.put((name, revision, status, ttft, wait, rev))
