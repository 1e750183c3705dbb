"""Process entry points of the controller: ``lorafleet rollout-controller`` and ``lorafleet up``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker
from lorafleet.platform.domain.errors import NotFound
from lorafleet.platform.events import EventBus, event_backend, make_event_bus
from lorafleet.services.rollout.client import ReplicaClient
from lorafleet.services.rollout.controller import RolloutController
from lorafleet.services.rollout.options import ControllerOptions


def _admin_key(options: ControllerOptions, settings: Settings) -> str:
    if options.rollout_admin_key is not None:
        return options.rollout_admin_key.get_secret_value()
    path: Path = settings.admin_key_path
    if path.exists():
        return path.read_text().strip()
    raise NotFound(
        "the rollout controller needs the platform admin key: set LORAFLEET_ROLLOUT_ADMIN_KEY or run "
        f"`lorafleet up` once to create {path}",
        code="admin_key_missing",
        param="rollout_admin_key",
    )


async def serve_controller(
    settings: Settings,
    stop: asyncio.Event,
    *,
    bus: EventBus | None = None,
    options: ControllerOptions | None = None,
) -> None:
    """Run a controller on the current event loop until ``stop`` is set."""
    options = options or ControllerOptions.from_settings(settings)
    engine = make_engine(settings.resolved_database_url)
    # The shared in-process bus outlives one controller; a Redis bus made for it does not.
    own_bus = bus is None and event_backend(settings) == "redis"
    bus = bus or make_event_bus(settings)
    client = ReplicaClient(
        admin_key=_admin_key(options, settings), timeout=options.rollout_call_timeout_seconds
    )
    try:
        await RolloutController(
            sessions=make_sessionmaker(engine), client=client, bus=bus, options=options
        ).run(stop)
    finally:
        await client.aclose()
        if own_bus:
            bus.close()
        engine.dispose()


def run_controller(settings: Settings, *, options: ControllerOptions | None = None) -> None:
    """The body of ``lorafleet rollout-controller``: run until SIGINT / SIGTERM."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_controller(settings, stop, options=options)

    asyncio.run(main())


def start_background(
    settings: Settings, *, bus: EventBus | None = None, options: ControllerOptions | None = None
) -> tuple[threading.Thread, Callable[[], None]]:
    """For ``lorafleet up``: the controller on its own thread and event loop. Returns the thread
    and a function that stops it (then join the thread)."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    def body() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve_controller(settings, stop, bus=bus, options=options))
        finally:
            loop.close()

    thread = threading.Thread(target=body, name="lorafleet-rollout-controller", daemon=True)
    thread.start()

    def request_stop() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)

    return thread, request_stop
