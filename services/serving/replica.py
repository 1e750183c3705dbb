"""A serving replica assembled from Settings: base model, engine, resolver, agent, HTTP routers.

``lorafleet up`` mounts :attr:`ServingReplica.routers` on the control plane's app (one port);
``lorafleet serve`` runs :func:`run_serving`, a serving-only app. Either way, including the
routers in an app ties the replica's lifecycle to the app's: the engine and the agent start
when the app starts and stop when it stops (the first router carries that lifespan).

The database must already be migrated (``lorafleet migrate``, or ``up``'s bootstrap); a replica
never migrates it, since several replicas starting together would race to.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import BundleCache, ExpectedBase
from lorafleet.adapters_store.objectstore import ObjectStore, make_object_store
from lorafleet.platform import metrics as m
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest, NotFound
from lorafleet.platform.domain.ids import new_id
from lorafleet.platform.events import event_backend, make_event_bus
from lorafleet.services.serving.agent import ReplicaAgent, internal_router
from lorafleet.services.serving.api import Resolver, openai_router
from lorafleet.services.serving.api import errors as http_errors
from lorafleet.services.serving.api.auth import KeyCache
from lorafleet.services.serving.api.pointer_events import PointerWatch
from lorafleet.services.serving.engine.base import Engine


class ServingOptions(BaseModel):
    """The serving settings :class:`Settings` does not have yet. Each is read from Settings when it
    has a field of that name, else from ``LORAFLEET_<NAME>`` in the environment, else the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serving_base_model: str = "tiny-moe"
    """The registered base model this replica serves."""
    serving_engine: Literal["torch", "vllm"] = "torch"
    serving_replica_id: str | None = None
    """Stable replica id (a pod name); default: a new ``rep-…`` id per process start."""
    serving_advertise_url: str | None = None
    """Where other processes reach this replica; default ``http://{host}:{port}``."""
    serving_heartbeat_seconds: float = Field(default=5.0, gt=0)
    serving_resolve_ttl_seconds: float = Field(default=1.0, ge=0)
    """How long a policy's serving pointer is cached before it is read again."""
    serving_auth_cache_seconds: float = Field(default=5.0, ge=0)
    """How long a verified API key is trusted without asking the database again (so a revoked
    key still works on replicas for up to this long); 0: every request asks."""
    serving_device: str = "cpu"
    serving_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    serving_max_batch_rows: int = Field(default=64, ge=1)
    serving_max_context: int | None = Field(default=None, ge=2)
    """Prompt + completion tokens per request; default: the base's max_position_embeddings."""
    serving_max_lora_rank: int = Field(default=16, ge=1)
    serving_adapter_wait_seconds: float = Field(default=30.0, gt=0)
    max_device_adapters: int = Field(default=8, ge=1)
    """Adapters usable by the running batch at once (device slots)."""
    max_host_adapter_bytes: int = Field(default=1 << 30, ge=0)
    serving_max_cold_loads: int = Field(default=2, ge=1)
    """Adapter loads in flight at once on this replica (user cold loads and rollout warms)."""
    serving_max_cold_load_queue: int = Field(default=16, ge=0)
    """Adapter loads that may wait for a slot; beyond it a load is refused (503, Retry-After)."""
    serving_max_background_loads: int = Field(default=1, ge=1)
    """Of the loads in flight, how many may be rollout warms (background)."""
    serving_step_latency_budget_seconds: float | None = Field(default=None, gt=0)
    """Background loads start only while the recent inter-token latency is within this; None: no pacing."""
    vllm_max_cpu_loras: int = Field(default=32, ge=2)
    """Adapters registered with vLLM (one is the guard's zero adapter)."""
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ServingOptions:
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if hasattr(settings, name):
                values[name] = getattr(settings, name)
            elif (env := os.environ.get(f"LORAFLEET_{name.upper()}")) is not None:
                values[name] = env
        return cls.model_validate(values | overrides)


@dataclass
class ServingReplica:
    options: ServingOptions
    replica_id: str
    engine: Engine
    resolver: Resolver
    agent: ReplicaAgent
    pointers: PointerWatch
    routers: tuple[APIRouter, ...]
    """Include them all, in order, in the app that serves this replica."""

    @asynccontextmanager
    async def lifespan(self, _: Any = None) -> AsyncIterator[None]:
        await self.engine.start()
        try:
            await self.pointers.start()
            try:
                await self.agent.start()
                try:
                    yield
                finally:
                    await self.agent.stop()
            finally:
                await self.pointers.stop()
        finally:
            await self.engine.stop()


@dataclass(frozen=True)
class _Base:
    id: str
    path: str
    expected: ExpectedBase


def _base_row(sessions: sessionmaker[Session], base_id: str) -> _Base:
    with sessions() as session:
        row = session.get(models.BaseModelRow, base_id)
        if row is None:
            raise NotFound(
                f"base model {base_id!r} is not registered (lorafleet models register DIR)",
                code="model_not_found",
                param="serving_base_model",
            )
        spec = ArchitectureSpec.model_validate(row.config["spec"]) if "spec" in (row.config or {}) else None
        path, fp, max_rank = row.path, row.fingerprint, row.max_lora_rank
    if spec is None:
        from lorafleet.platform.modeling import read_spec  # torch-importing; only for old rows

        spec, _ = read_spec(path)
    return _Base(base_id, path, ExpectedBase(spec=spec, fingerprint=fp, max_lora_rank=max_rank))


def build_engine(
    settings: Settings,
    options: ServingOptions,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    replica_id: str,
) -> Engine:
    """Load the base and build the configured engine (blocking: loads weights)."""
    base = _base_row(sessions, options.serving_base_model)
    cache = BundleCache(
        settings.resolved_cache_dir / base.id,
        max_bytes=settings.max_cache_bytes,
        store=store,
        base=base.expected,
    )
    if options.serving_engine == "vllm":
        from lorafleet.services.serving.engine.vllm_engine import VllmEngine

        return VllmEngine(
            base_model_id=base.id,
            model_path=base.path,
            expected_base=base.expected,
            bundle_cache=cache,
            work_dir=settings.resolved_cache_dir / "peft" / base.id,
            max_context=options.serving_max_context,
            max_batch_rows=options.serving_max_batch_rows,
            max_device_adapters=options.max_device_adapters,
            max_registered_adapters=options.vllm_max_cpu_loras - 1,
            max_lora_rank=options.serving_max_lora_rank,
            dtype=options.serving_dtype,
            engine_args={"gpu_memory_utilization": options.vllm_gpu_memory_utilization},
            replica_id=replica_id,
        )
    import torch

    from lorafleet.platform.modeling import load_base_model
    from lorafleet.services.serving.engine.torch_engine import TorchEngine

    model, spec, tokenizer = load_base_model(
        base.path, dtype=getattr(torch, options.serving_dtype), device=options.serving_device
    )
    if tokenizer is None:
        raise InvalidRequest(f"base model {base.id} has no tokenizer", code="tokenizer_unusable")
    return TorchEngine(
        model,
        spec,
        tokenizer,
        base_model_id=base.id,
        expected_base=base.expected,
        bundle_cache=cache,
        max_batch_rows=options.serving_max_batch_rows,
        max_context=options.serving_max_context,
        max_device_adapters=options.max_device_adapters,
        max_host_adapter_bytes=options.max_host_adapter_bytes,
        max_lora_rank=options.serving_max_lora_rank,
        adapter_wait_seconds=options.serving_adapter_wait_seconds,
        replica_id=replica_id,
        max_cold_loads=options.serving_max_cold_loads,
        max_cold_load_queue=options.serving_max_cold_load_queue,
        max_background_loads=options.serving_max_background_loads,
        step_latency_budget_seconds=options.serving_step_latency_budget_seconds,
    )


def build_serving(
    settings: Settings,
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    engine: Engine | None = None,
    options: ServingOptions | None = None,
) -> ServingReplica:
    """Everything a serving replica is, not yet started: include ``.routers`` in an app to run it.

    ``engine`` replaces the one the options describe (tests, or a caller that shares a base).
    """
    options = options or ServingOptions.from_settings(settings)
    replica_id = options.serving_replica_id or new_id("replica")
    if engine is None:
        engine = build_engine(settings, options, sessions=sessions, store=store, replica_id=replica_id)
    address = options.serving_advertise_url or f"http://{_reachable(settings.host)}:{settings.port}"
    capacity = {
        "engine": options.serving_engine,
        "max_context": engine.max_context,
        "max_batch_rows": options.serving_max_batch_rows,
        "max_device_adapters": options.max_device_adapters,
        "max_host_adapter_bytes": options.max_host_adapter_bytes,
    }
    agent = ReplicaAgent(
        sessions=sessions,
        engine=engine,
        replica_id=replica_id,
        address=address,
        capacity=capacity,
        heartbeat_seconds=options.serving_heartbeat_seconds,
    )
    keys = KeyCache(sessions, ttl_seconds=options.serving_auth_cache_seconds)
    resolver = Resolver(
        sessions,
        served_base_ids=frozenset({engine.base_model_id}),
        ttl_seconds=options.serving_resolve_ttl_seconds,
    )
    # The shared in-process bus (embedded mode) is the process's, not ours to close; a Redis bus is.
    pointers = PointerWatch(make_event_bus(settings), resolver, owns_bus=event_backend(settings) == "redis")
    replica = ServingReplica(
        options=options,
        replica_id=replica_id,
        engine=engine,
        resolver=resolver,
        agent=agent,
        pointers=pointers,
        routers=(),
    )
    lifecycle = APIRouter(lifespan=replica.lifespan)
    replica.routers = (
        lifecycle,
        openai_router(engine=engine, resolver=resolver, keys=keys),
        internal_router(engine=engine, agent=agent, resolver=resolver, keys=keys),
    )
    return replica


def _reachable(host: str) -> str:
    """A wildcard bind address is not an address anyone can call: advertise the host name."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def create_serving_app(replica: ServingReplica) -> FastAPI:
    """A serving-only app: the replica's routers, ``/healthz`` and ``/metrics``."""
    app = FastAPI(title="lorafleet serving", version="0.1.0")
    http_errors.install(app)
    for router in replica.routers:
        app.include_router(router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "replica_id": replica.replica_id, "base_model": replica.engine.base_model_id}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(m.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app


def run_serving(settings: Settings) -> None:
    """The body of ``lorafleet serve``: one serving replica on ``settings.host:port`` until interrupted."""
    import uvicorn

    db = make_engine(settings.resolved_database_url)
    try:
        replica = build_serving(settings, sessions=make_sessionmaker(db), store=make_object_store(settings))
        uvicorn.run(
            create_serving_app(replica),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
        )
    finally:
        db.dispose()
