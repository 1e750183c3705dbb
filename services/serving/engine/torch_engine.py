"""The embedded serving engine: lorafleet's own torch model with continuous, mixed-adapter batching.

One step thread (:mod:`._batcher`) runs the model; the event loop(s) only validate requests,
wait for adapters (:mod:`lorafleet.services.serving.tiers`) and turn tokens into text. A request
holds a use on its adapter from before the adapter's load starts until its row has left the
batch, so an adapter serving a request is never evicted, and a slot is never rewritten while a
row still reads it.

Every adapter load goes through the engine's :class:`AdmissionController`: a request whose
adapter is not on the device tier is a *foreground* cold load (bounded in flight, bounded
queue, deduplicated per revision, refused with ``Unavailable`` ``cold_load_queue_full`` and a
``retry_after`` when the queue is full); :meth:`TorchEngine.load` (the agent's warm endpoint,
driven by the rollout controller) is a *background* load under the same gate, paced by the
steps' inter-token latency. A request whose adapter is on the device already never waits.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import torch

from lorafleet.adapters_store import BundleCache, ExpectedBase
from lorafleet.platform import metrics
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest, LorafleetError, Unavailable
from lorafleet.platform.modeling import CausalLM, DeviceAdapterBank
from lorafleet.services.serving.admission import BACKGROUND, FOREGROUND, AdmissionController, LoadKind
from lorafleet.services.serving.engine._batcher import Batcher, Row, RowEvent
from lorafleet.services.serving.engine._sampler import RowSampling
from lorafleet.services.serving.engine._text import IncrementalDetokenizer, StopStringFilter
from lorafleet.services.serving.engine.base import (
    AdapterHandle,
    GenerationChunk,
    GenerationRequest,
    LoadReport,
    ResidentAdapter,
    Tier,
)
from lorafleet.services.serving.tiers import AdapterTiers


class TorchEngine:
    """Implements :class:`~lorafleet.services.serving.engine.base.Engine` over a resident :class:`CausalLM`.

    Capacities: ``max_batch_rows`` requests run at once (KV cache slots; more wait in a queue),
    each at most ``max_context`` tokens long; ``max_device_adapters`` adapters are usable by the
    running batch (bank slots of rank up to ``max_lora_rank``: every slot costs memory and
    compute at that rank, so keep it near the ranks actually served); ``max_host_adapter_bytes``
    of adapter tensors stay in host memory (device-resident ones included). A step reads at most
    ``max_prefill_tokens`` prompt tokens. A request whose adapter cannot get a slot within
    ``adapter_wait_seconds`` (every slot serving other requests) is refused with ``Unavailable``.

    Admission of loads: at most ``max_cold_loads`` run at once (``max_background_loads`` of them
    background), at most ``max_cold_load_queue`` wait; background loads start only while the
    recent inter-token latency is within ``step_latency_budget_seconds`` (None: no pacing).
    """

    def __init__(
        self,
        model: CausalLM,
        spec: ArchitectureSpec,
        tokenizer: Any,
        *,
        base_model_id: str,
        expected_base: ExpectedBase,
        bundle_cache: BundleCache,
        max_batch_rows: int = 64,
        max_context: int | None = None,
        max_device_adapters: int = 8,
        max_host_adapter_bytes: int = 1 << 30,
        max_lora_rank: int = 16,
        max_prefill_tokens: int = 512,
        adapter_wait_seconds: float = 30.0,
        eos_token_ids: Sequence[int] | None = None,
        replica_id: str = "local",
        max_cold_loads: int = 2,
        max_cold_load_queue: int = 16,
        max_background_loads: int = 1,
        step_latency_budget_seconds: float | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_prefill_tokens < 1:
            raise InvalidRequest("max_batch_rows and max_prefill_tokens must be at least 1")
        self.base_model_id = base_model_id
        self.tokenizer = tokenizer
        self.spec = spec
        self.model = model
        self.max_context = max_context or spec.max_position_embeddings
        self.max_lora_rank = min(max_lora_rank, expected_base.max_lora_rank)
        self.bank = DeviceAdapterBank(
            spec, capacity=max_device_adapters, max_rank=self.max_lora_rank, dtype=model.dtype, device=model.device
        )
        self._batcher = Batcher(
            model,
            bank=self.bank,
            max_batch_rows=max_batch_rows,
            max_context=self.max_context,
            max_prefill_tokens=max_prefill_tokens,
        )
        self.tiers = AdapterTiers(
            bank=self.bank,
            bundle_cache=bundle_cache,
            max_device_adapters=max_device_adapters,
            max_host_adapter_bytes=max_host_adapter_bytes,
            installer=self._batcher.call,
            wait_seconds=adapter_wait_seconds,
            replica_id=replica_id,
        )
        self.admission = AdmissionController(
            max_in_flight=max_cold_loads,
            max_queue=max_cold_load_queue,
            max_background_in_flight=min(max_background_loads, max_cold_loads),
            step_latency_budget_seconds=step_latency_budget_seconds,
            replica_id=replica_id,
        )
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._batcher.start()
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        await self.admission.close()
        await asyncio.to_thread(self._batcher.stop)
        self.tiers.close()
        self._started = False

    # -- adapters -----------------------------------------------------------------------------

    async def load(self, adapter: AdapterHandle, *, tier: Tier = Tier.DEVICE, pin: bool = False) -> LoadReport:
        """A background load (nobody's request waits on it) under admission control; refused with
        ``Unavailable`` (``cold_load_queue_full``, retryable) when the load queue is full. A
        revision resident in ``tier`` already is only (un)pinned: no admission needed."""
        if tier == Tier.DEVICE:
            self._require_running()
        if self.tiers.holds(adapter.revision_id, tier):
            return await self.tiers.load(adapter, tier=tier, pin=pin)
        report = await self._admitted_load(adapter, tier, kind=BACKGROUND)
        if pin:  # after the shared load: a caller that joined it still gets its own pin
            await self.tiers.load(adapter, tier=tier, pin=True)
        return report

    async def _admitted_load(self, adapter: AdapterHandle, tier: Tier, *, kind: LoadKind) -> LoadReport:
        """Load to ``tier`` through admission control (unpinned), shared by every caller asking
        for the same revision and tier while it runs."""
        return await self.admission.run(
            f"{tier.value}:{adapter.revision_id}",
            partial(self.tiers.load, adapter, tier=tier, pin=False),
            kind=kind,
        )

    def unpin(self, revision_id: str) -> None:
        self.tiers.unpin(revision_id)

    async def evict(self, revision_id: str) -> None:
        self.tiers.evict(revision_id)

    def resident(self) -> list[ResidentAdapter]:
        return self.tiers.resident()

    def load_factor(self) -> tuple[int, int]:
        """(requests in the batch, requests waiting for a KV slot)."""
        return self._batcher.load()

    # -- generation ---------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._check(request)
        self._require_running()
        arrival = time.perf_counter()
        adapter = request.adapter
        slot, waited = -1, 0.0
        if adapter is not None:
            try:
                cold = not self.tiers.holds(adapter.revision_id, Tier.DEVICE)
                if cold:  # a scheduled cold load: bounded, deduplicated, or refused with Retry-After
                    await self._admitted_load(adapter, Tier.DEVICE, kind=FOREGROUND)
                acquired = await self.tiers.acquire(adapter)
            except BaseException:
                metrics.GEN_REQUESTS.labels(outcome="error").inc()
                raise
            slot = acquired.slot
            waited = time.perf_counter() - arrival if cold else acquired.waited_seconds
            metrics.USER_VISIBLE_LOAD_SECONDS.observe(waited)
        row = self._row(request, slot=slot, arrival=arrival)
        try:
            self._batcher.submit(row)
        except BaseException:
            if row.on_done is not None:
                row.on_done()
            raise
        outcome = "abort"  # unless the stream ends on its own
        try:
            async for chunk in self._stream(request, row, adapter_wait=waited):
                if chunk.finish_reason is not None:
                    outcome = chunk.finish_reason
                yield chunk
        except LorafleetError:
            outcome = "error"
            raise
        finally:
            # Always safe: the step thread ignores an abort of a row that already left the batch.
            self._batcher.abort(row)
            metrics.GEN_REQUESTS.labels(outcome=outcome).inc()

    async def _stream(
        self, request: GenerationRequest, row: Row, *, adapter_wait: float
    ) -> AsyncIterator[GenerationChunk]:
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringFilter(request.sampling.stop)
        prompt_tokens, completion = len(request.prompt_ids), 0
        first = True
        while True:
            events: list[RowEvent] = [await row.events.get()]
            while not row.events.empty():
                events.append(row.events.get_nowait())
            token_ids: list[int] = []
            text = ""
            finish = None
            for event in events:
                if event.error is not None:
                    raise event.error
                if event.token is not None:
                    completion += 1
                    token_ids.append(event.token)
                    if event.finish != "stop":  # a stop token / EOS is counted, never rendered
                        text += stops.push(detok.push([event.token]))
                if stops.stopped:
                    finish = "stop"
                    break
                if event.finish is not None:
                    finish = event.finish
                    text += stops.push(detok.flush()) + stops.flush()
                    break
            yield GenerationChunk(
                token_ids=token_ids,
                text=text,
                finish_reason=finish,  # type: ignore[arg-type]  # one of FinishReason
                prompt_tokens=prompt_tokens,
                completion_tokens=completion,
                adapter_wait_seconds=adapter_wait if first else 0.0,
            )
            first = False
            if finish is not None:
                return

    # -- helpers ------------------------------------------------------------------------------

    def _check(self, request: GenerationRequest) -> None:
        prompt = request.prompt_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty", code="empty_prompt", param="prompt")
        vocab = self.spec.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in 0..{vocab - 1}", code="invalid_token_id", param="prompt")
        total = len(prompt) + request.sampling.max_tokens
        if total > self.max_context:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {request.sampling.max_tokens} in the completion).",
                code="context_length_exceeded",
                param="max_tokens",
            )

    def _require_running(self) -> None:
        if not self._started or not self._batcher.running:
            raise Unavailable("the engine is not running", code="engine_not_running", retry_after=5.0)

    def _row(self, request: GenerationRequest, *, slot: int, arrival: float) -> Row:
        s = request.sampling
        generator = None
        if s.temperature > 0:
            seed = s.seed if s.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        stop_ids = frozenset(s.stop_token_ids) | (frozenset() if s.ignore_eos else self.eos_token_ids)
        adapter = request.adapter
        policy = metrics.policy_label(adapter.policy if adapter is not None else None)
        return Row(
            prompt=list(request.prompt_ids),
            adapter_slot=slot,
            sampling=RowSampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, generator=generator),
            stop_ids=stop_ids,
            max_tokens=s.max_tokens,
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            on_done=None if adapter is None else partial(self.tiers.release, adapter.revision_id),
            arrival=arrival,
            ttft=metrics.TTFT_SECONDS.labels(policy=policy, first_request="true" if request.first_request else "false"),
            itl=self._itl_observer(policy),
        )

    def _itl_observer(self, policy: str) -> Any:
        """The row's inter-token observer: the histogram alone, or with the admission pacer when
        background loads are paced (every decode token passes through it: no extra call otherwise)."""
        histogram = metrics.ITL_SECONDS.labels(policy=policy)
        return histogram if self.admission.pacer is None else _InterTokenFeed(histogram, self.admission)


class _InterTokenFeed:
    """The row's inter-token observer: the ITL histogram, and the admission pacer (a decode
    token's gap is one engine step, so it is the serving latency background loads must not hurt)."""

    __slots__ = ("_admission", "_histogram")

    def __init__(self, histogram: Any, admission: AdmissionController) -> None:
        self._histogram = histogram
        self._admission = admission

    def observe(self, seconds: float) -> None:
        self._histogram.observe(seconds)
        self._admission.observe_step_latency(seconds)

