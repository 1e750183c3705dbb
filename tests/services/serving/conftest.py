"""Serving fixtures shared by the engine, tier, API and agent tests.

- ``serving_base``: the tiny-moe base loaded once per session (model, spec, tokenizer, the
  ``ExpectedBase`` bundles are verified against);
- ``serving_adapters``: a local object store holding a few trained-looking adapter revisions
  (random, non-zero A *and* B of every target, ranks 2/4/8, float32), published with
  ``publish_revision``; each comes with its engine-form tensors for reference computations;
- ``make_engine``: a factory of started :class:`TorchEngine` objects (stopped at teardown) over
  that base and store, each with its own disk cache; ``torch_engine`` is one with defaults.

The engine works from any event loop, so tests drive it with ``asyncio.run`` (and an HTTP
test client's loop works too).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.adapters_store import BundleCache, ExpectedBase, publish_revision
from lorafleet.adapters_store.bundle import BundleMeta, write_bundle
from lorafleet.adapters_store.objectstore import LocalObjectStore
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.modeling import CausalLM, fingerprint, load_base_model
from lorafleet.services.serving.engine import AdapterHandle
from lorafleet.services.serving.engine.torch_engine import TorchEngine

BASE_MODEL_ID = "tiny-moe"
TENANT = "tenant-serving"
ADAPTER_RANKS = (8, 4, 2, 8, 4, 8)
"""One published revision per entry (policy ``pol-{i}``), of that rank."""


@dataclass(frozen=True)
class ServingBase:
    path: Path
    model: CausalLM
    spec: ArchitectureSpec
    tokenizer: Any
    expected: ExpectedBase


@dataclass(frozen=True)
class PublishedAdapter:
    handle: AdapterHandle
    tensors: dict[str, torch.Tensor]
    """Engine form, float32, exactly what was published."""
    lora: LoraConfig
    nbytes: int
    """Bytes of the bundle's tensor file (what the host tier counts)."""


@dataclass(frozen=True)
class AdapterStore:
    store: LocalObjectStore
    adapters: list[PublishedAdapter]
    workdir: Path


@pytest.fixture(scope="session")
def serving_base(tiny_moe_path: Path) -> ServingBase:
    model, spec, tokenizer = load_base_model(tiny_moe_path)
    if tokenizer is None:
        pytest.fail(f"{tiny_moe_path} has no tokenizer")
    expected = ExpectedBase(spec=spec, fingerprint=fingerprint(tiny_moe_path), max_lora_rank=16)
    return ServingBase(path=tiny_moe_path, model=model, spec=spec, tokenizer=tokenizer, expected=expected)


def trained_like_adapter(spec: ArchitectureSpec, lora: LoraConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor ``spec.lora_shapes(lora)`` names, with A at the standard init scale and B
    non-zero (as after training), large enough that greedy outputs visibly change."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in spec.lora_shapes(lora).items():
        if key.endswith("lora_A"):
            bound = 1.0 / math.sqrt(shape[-1])
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        else:
            out[key] = torch.randn(shape, generator=gen) * (0.5 / lora.scaling)
    return out


def publish_adapter(
    store: LocalObjectStore,
    base: ServingBase,
    workdir: Path,
    *,
    policy: str,
    rank: int,
    seed: int,
    tensors: dict[str, torch.Tensor] | None = None,
    base_fingerprint: str | None = None,
) -> PublishedAdapter:
    """Write a bundle and publish it as a committed-looking revision of ``policy``."""
    lora = LoraConfig(rank=rank, alpha=2.0 * rank)
    tensors = tensors if tensors is not None else trained_like_adapter(base.spec, lora, seed=seed)
    meta = BundleMeta(
        tenant_id=TENANT,
        policy_id=policy,
        base_model_id=BASE_MODEL_ID,
        base_fingerprint=base_fingerprint or base.expected.fingerprint,
    )
    bundle_dir = workdir / "bundles" / meta.revision_id
    manifest = write_bundle(bundle_dir, tensors, meta=meta, lora=lora)
    published = publish_revision(store, bundle_dir)
    handle = AdapterHandle(revision_id=published.revision_id, ref=published.ref, policy=policy, tenant_id=TENANT)
    return PublishedAdapter(handle=handle, tensors=tensors, lora=lora, nbytes=manifest.total_bytes)


@pytest.fixture(scope="session")
def serving_adapters(serving_base: ServingBase, tmp_path_factory: pytest.TempPathFactory) -> AdapterStore:
    workdir = tmp_path_factory.mktemp("serving-store")
    store = LocalObjectStore(workdir / "objects")
    adapters = [
        publish_adapter(store, serving_base, workdir, policy=f"pol-{i}", rank=rank, seed=100 + i)
        for i, rank in enumerate(ADAPTER_RANKS)
    ]
    return AdapterStore(store=store, adapters=adapters, workdir=workdir)


EngineFactory = Callable[..., TorchEngine]


@pytest.fixture
def make_engine(
    serving_base: ServingBase, serving_adapters: AdapterStore, tmp_path: Path
) -> Iterator[EngineFactory]:
    """``make_engine(**overrides)``: a started TorchEngine; keyword overrides go to its constructor
    (``cache_bytes`` sizes its disk cache)."""
    engines: list[TorchEngine] = []

    def factory(*, cache_bytes: int = 64 << 20, **overrides: Any) -> TorchEngine:
        cache = BundleCache(
            tmp_path / f"cache-{len(engines)}",
            max_bytes=cache_bytes,
            store=serving_adapters.store,
            base=serving_base.expected,
        )
        kwargs: dict[str, Any] = {
            "base_model_id": BASE_MODEL_ID,
            "expected_base": serving_base.expected,
            "bundle_cache": cache,
            "max_batch_rows": 16,
            "max_context": 256,
            "max_device_adapters": 4,
            "max_host_adapter_bytes": 256 << 20,
            "max_lora_rank": 8,
            "adapter_wait_seconds": 10.0,
        }
        kwargs.update(overrides)
        engine = TorchEngine(serving_base.model, serving_base.spec, serving_base.tokenizer, **kwargs)
        asyncio.run(engine.start())
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        asyncio.run(engine.stop())


@pytest.fixture
def torch_engine(make_engine: EngineFactory) -> TorchEngine:
    """A started TorchEngine over tiny-moe with the ``serving_adapters`` store (defaults of make_engine)."""
    return make_engine()
