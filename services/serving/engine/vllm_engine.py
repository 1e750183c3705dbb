"""The Engine protocol over vLLM's ``AsyncLLM`` with LoRA enabled (GPU deployments).

Adapters: a committed revision is fetched and verified through the :class:`BundleCache` (disk
tier), exported to the PEFT layout (:func:`export_peft`) in ``work_dir``, and registered with
vLLM as a ``LoRARequest`` (``add_lora``). A registered adapter is reported on the ``device``
tier: vLLM moves it into one of its ``max_loras`` batch slots at schedule time, a tensor copy
from its own host cache, so it is usable by the next step; lorafleet keeps the number of
registered adapters within vLLM's host cache (``max_cpu_loras``) and evicts (least recently
used, never pinned, never in use) itself, so vLLM never drops one on its own. vLLM has no
separate host stage lorafleet can drive, so a warm to ``host`` registers as well.

The base-row guard. vLLM 0.32's CPU LoRA ops index the stacked slot weights with the row's slot
index, and a base row's index is -1 (``lora_b_weights[lora_indices_tensor]`` in
``vllm/lora/ops/torch_ops``): Python's negative indexing picks the *last* slot, so in a batch
that also runs adapters a base-model row gets whatever adapter sits there. lorafleet therefore
never submits a row without an adapter: base-model requests run with a dedicated all-zero
"base" adapter (rank 1, every target module, pinned in vLLM at start), so their slot holds
zeros and adds exactly 0 to every projection. Chosen over scheduling base rows apart from
adapter rows because it removes the condition the bug needs (no row has index -1) instead of
avoiding batches where it shows, costs no throughput or latency to either kind of request (a
split schedule makes each wait for the other's batch to drain), and holds for any backend that
mishandles unadapted rows. Its costs: one of ``max_loras`` slots while base rows run, and the
base rows pay the (rank-1) LoRA matmuls.

vLLM is imported on first use: this module imports (and its helpers are testable) without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.adapters_store import BundleCache, ExpectedBase
from lorafleet.platform import metrics
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import Conflict, InvalidRequest, LorafleetError, Unavailable
from lorafleet.platform.domain.lora import ALL_TARGETS, LoraConfig
from lorafleet.services.serving.engine.base import (
    AdapterHandle,
    GenerationChunk,
    GenerationRequest,
    LoadReport,
    ResidentAdapter,
    SamplingOptions,
    Tier,
)

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)

BASE_ADAPTER_NAME = "lorafleet-base-zero"
BASE_ADAPTER_ID = 1
"""vLLM's integer id of the zero adapter; revisions get 2, 3, ..."""
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts as ``max_lora_rank``."""


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise InvalidRequest(f"LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})", param="max_lora_rank")


def sampling_kwargs(options: SamplingOptions) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for lorafleet's options (one completion, text deltas
    rendered without special tokens, stop strings cut out of the text as the torch engine does)."""
    return {
        "n": 1,
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,  # 0 disables the cut in both engines
        "seed": options.seed,
        "stop": list(options.stop),
        "stop_token_ids": list(options.stop_token_ids),
        "ignore_eos": options.ignore_eos,
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }


def write_zero_adapter(spec: ArchitectureSpec, out_dir: Path, *, base_model_name_or_path: str | None) -> Path:
    """A PEFT adapter of rank 1 over every target module of ``spec`` whose factors are all zero.

    Written atomically (temporary directory, then rename); an existing one is kept.
    """
    import torch
    from safetensors.torch import save_file

    from lorafleet.adapters_store.bundle.peft import (
        PEFT_CONFIG_FILE,
        PEFT_WEIGHTS_FILE,
        engine_to_peft,
        peft_config,
    )

    if (out_dir / PEFT_WEIGHTS_FILE).exists():
        return out_dir
    lora = LoraConfig(rank=1, alpha=1.0, targets=ALL_TARGETS)
    tensors = {name: torch.zeros(shape, dtype=torch.float32) for name, shape in spec.lora_shapes(lora).items()}
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        # engine_to_peft returns views of the stacked expert tensors; safetensors wants each stored alone.
        save_file(
            {k: v.contiguous().clone() for k, v in engine_to_peft(tensors).items()},
            tmp / PEFT_WEIGHTS_FILE,
            metadata={"format": "pt"},
        )
        config = peft_config(lora, base_model_name_or_path=base_model_name_or_path)
        (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(out_dir)
        except OSError:  # another process wrote it first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class _Registered:
    lora_id: int
    path: Path
    nbytes: int
    policy: str | None


class VllmEngine:
    """Implements :class:`~lorafleet.services.serving.engine.base.Engine` over ``vllm.v1`` ``AsyncLLM``.

    ``max_device_adapters`` becomes vLLM's ``max_loras`` (distinct adapters in one batch; one
    more slot is added for the zero base adapter), ``max_registered_adapters`` the adapters
    registered at once (vLLM's ``max_cpu_loras`` is one more), ``max_batch_rows`` its
    ``max_num_seqs``. ``engine_args`` passes anything else to ``AsyncEngineArgs``.
    """

    def __init__(
        self,
        *,
        base_model_id: str,
        model_path: str | Path,
        expected_base: ExpectedBase,
        bundle_cache: BundleCache,
        work_dir: Path,
        max_context: int | None = None,
        max_batch_rows: int = 64,
        max_device_adapters: int = 8,
        max_registered_adapters: int = 31,
        max_lora_rank: int = 16,
        dtype: str = "auto",
        engine_args: dict[str, Any] | None = None,
        replica_id: str = "local",
    ) -> None:
        from transformers import AutoTokenizer

        if max_registered_adapters < max_device_adapters:
            raise InvalidRequest(
                "max_registered_adapters must be at least max_device_adapters",
                param="max_registered_adapters",
            )
        self.base_model_id = base_model_id
        self.model_path = str(model_path)
        self.spec = expected_base.spec
        self.expected_base = expected_base
        self.max_context = max_context or self.spec.max_position_embeddings
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.bundle_cache = bundle_cache
        self.work_dir = Path(work_dir)
        self.replica_id = replica_id
        self.max_registered = max_registered_adapters
        self._args: dict[str, Any] = {
            "model": self.model_path,
            "tokenizer": self.model_path,
            "dtype": dtype,
            "max_model_len": self.max_context,
            "max_num_seqs": max_batch_rows,
            "enable_lora": True,
            "max_loras": max_device_adapters + 1,
            "max_cpu_loras": max_registered_adapters + 1,
            "max_lora_rank": vllm_lora_rank(min(max_lora_rank, expected_base.max_lora_rank)),
            "disable_log_stats": True,
            **(engine_args or {}),
        }
        self._llm: Any = None
        self._base_lora: LoRARequest | None = None
        self._registered: OrderedDict[str, _Registered] = OrderedDict()
        """Revisions registered with vLLM, least recently used first."""
        self._loading: dict[str, asyncio.Task[dict[str, float]]] = {}
        self._uses: dict[str, int] = {}
        self._pins: set[str] = set()
        self._on_disk: dict[str, int] = {}
        self._next_lora_id = BASE_ADAPTER_ID + 1

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._llm is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        zero = await asyncio.to_thread(
            write_zero_adapter,
            self.spec,
            self.work_dir / BASE_ADAPTER_NAME,
            base_model_name_or_path=self.model_path,
        )
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._args))
        self._base_lora = LoRARequest(BASE_ADAPTER_NAME, BASE_ADAPTER_ID, str(zero))
        await self._llm.add_lora(self._base_lora)
        await self._llm.pin_lora(BASE_ADAPTER_ID)

    async def stop(self) -> None:
        if self._llm is None:
            return
        for task in list(self._loading.values()):
            task.cancel()
        llm, self._llm = self._llm, None
        llm.shutdown()

    def _require_running(self) -> Any:
        if self._llm is None:
            raise Unavailable("the engine is not running", code="engine_not_running", retry_after=5.0)
        return self._llm

    # -- adapters ------------------------------------------------------------------------------------

    async def load(self, adapter: AdapterHandle, *, tier: Tier = Tier.DEVICE, pin: bool = False) -> LoadReport:
        rid = adapter.revision_id
        if tier == Tier.REMOTE:
            raise InvalidRequest("an adapter cannot be loaded into the remote tier", param="tier")
        if tier == Tier.DISK:
            already = self.bundle_cache.contains(rid)
            seconds = {} if already else await asyncio.to_thread(self._fetch, adapter)
            return LoadReport(rid, Tier.DISK, seconds=seconds, already_resident=already)
        self._require_running()
        already = rid in self._registered
        self._uses[rid] = self._uses.get(rid, 0) + 1  # held so the budget cannot evict it mid-load
        try:
            seconds = await self._register(adapter)
        finally:
            self._release(rid)
        if pin:
            self._pins.add(rid)
        return LoadReport(rid, Tier.DEVICE, seconds=seconds, already_resident=already)

    def unpin(self, revision_id: str) -> None:
        self._pins.discard(revision_id)

    async def evict(self, revision_id: str) -> None:
        if self._uses.get(revision_id, 0) > 0:
            raise Conflict(
                f"revision {revision_id} has {self._uses[revision_id]} requests in flight",
                code="adapter_in_use",
            )
        self._pins.discard(revision_id)
        await self._unregister(revision_id)

    def resident(self) -> list[ResidentAdapter]:
        rows = [
            ResidentAdapter(
                revision_id=rid,
                tier=Tier.DEVICE,
                bytes=r.nbytes,
                pinned=rid in self._pins,
                in_flight=self._uses.get(rid, 0),
            )
            for rid, r in list(self._registered.items())  # a snapshot: the agent lists from a worker thread
        ]
        rows += [
            ResidentAdapter(revision_id=rid, tier=Tier.DISK, bytes=n, pinned=False, in_flight=0)
            for rid, n in list(self._on_disk.items())
            if rid not in self._registered and self.bundle_cache.contains(rid)
        ]
        return rows

    def _fetch(self, adapter: AdapterHandle) -> dict[str, float]:
        start = time.perf_counter()
        with self.bundle_cache.open(adapter.ref) as bundle:
            self._on_disk[adapter.revision_id] = sum(f.bytes for f in bundle.manifest.files.values())
        seconds = time.perf_counter() - start
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="fetch", tier=Tier.DISK).observe(seconds)
        return {"fetch": seconds}

    def _export(self, adapter: AdapterHandle) -> tuple[Path, int, dict[str, float]]:
        """Fetch (disk tier) and write the PEFT form vLLM reads: (directory, bytes, seconds per stage)."""
        from lorafleet.adapters_store.bundle.peft import export_peft

        start = time.perf_counter()
        out = self.work_dir / adapter.revision_id
        with self.bundle_cache.open(adapter.ref) as bundle:
            fetched = time.perf_counter()
            nbytes = sum(f.bytes for f in bundle.manifest.files.values())
            self._on_disk[adapter.revision_id] = nbytes
            if out.exists():  # an export left by an earlier registration: revisions never change
                shutil.rmtree(out)
            export_peft(bundle.path, out, base_model_name_or_path=self.model_path)
        read = time.perf_counter()
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="fetch", tier=Tier.DISK).observe(fetched - start)
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="read", tier=Tier.HOST).observe(read - fetched)
        return out, nbytes, {"fetch": fetched - start, "read": read - fetched}

    async def _register(self, adapter: AdapterHandle) -> dict[str, float]:
        """Make the revision registered with vLLM; concurrent callers share one load."""
        rid = adapter.revision_id
        if rid in self._registered:
            self._registered.move_to_end(rid)
            return {}
        task = self._loading.get(rid)
        if task is None:
            task = asyncio.ensure_future(self._install(adapter))
            self._loading[rid] = task
            task.add_done_callback(lambda _: self._loading.pop(rid, None))
        return dict(await asyncio.shield(task))

    async def _install(self, adapter: AdapterHandle) -> dict[str, float]:
        from vllm.lora.request import LoRARequest

        llm = self._require_running()
        await self._make_room()
        path, nbytes, seconds = await asyncio.to_thread(self._export, adapter)
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        start = time.perf_counter()
        try:
            await llm.add_lora(LoRARequest(adapter.revision_id, lora_id, str(path)))
        except (ValueError, RuntimeError) as exc:  # vLLM refuses an adapter it cannot apply to this model
            shutil.rmtree(path, ignore_errors=True)
            raise InvalidRequest(
                f"vLLM refused revision {adapter.revision_id}: {exc}", code="adapter_unsupported_by_engine"
            ) from exc
        seconds["install"] = time.perf_counter() - start
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="install", tier=Tier.DEVICE).observe(seconds["install"])
        self._registered[adapter.revision_id] = _Registered(lora_id, path, nbytes, adapter.policy)
        self._update_gauges()
        return seconds

    async def _make_room(self) -> None:
        while len(self._registered) + len(self._loading) > self.max_registered:
            victim = next(
                (rid for rid in self._registered if rid not in self._pins and self._uses.get(rid, 0) == 0),
                None,
            )
            if victim is None:
                raise Unavailable(
                    "every registered adapter is pinned or serving requests",
                    code="adapter_slots_busy",
                    retry_after=1.0,
                )
            await self._unregister(victim)

    async def _unregister(self, revision_id: str) -> None:
        entry = self._registered.pop(revision_id, None)
        if entry is None:
            return
        if self._llm is not None:
            await self._llm.remove_lora(entry.lora_id)
        shutil.rmtree(entry.path, ignore_errors=True)  # vLLM read it into memory at add_lora
        self._update_gauges()

    def _release(self, revision_id: str) -> None:
        left = self._uses.get(revision_id, 0) - 1
        if left > 0:
            self._uses[revision_id] = left
        else:
            self._uses.pop(revision_id, None)

    def _update_gauges(self) -> None:
        metrics.RESIDENT_ADAPTERS.labels(self.replica_id, Tier.DEVICE).set(len(self._registered))
        metrics.RESIDENT_BYTES.labels(self.replica_id, Tier.DEVICE).set(
            sum(r.nbytes for r in self._registered.values())
        )

    # -- generation ----------------------------------------------------------------------------------

    async def _lora_request(self, adapter: AdapterHandle | None) -> LoRARequest:
        """The LoRA every submitted row runs with: its revision's, or the zero adapter for the base.

        The one place requests get their LoRA; never returns None (see the module docstring).
        """
        if adapter is None:
            if self._base_lora is None:
                raise Unavailable("the engine is not running", code="engine_not_running", retry_after=5.0)
            return self._base_lora
        from vllm.lora.request import LoRARequest

        await self._register(adapter)
        entry = self._registered[adapter.revision_id]
        return LoRARequest(adapter.revision_id, entry.lora_id, str(entry.path))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        llm = self._require_running()
        if not request.prompt_ids:
            raise InvalidRequest("the prompt is empty", code="empty_prompt", param="prompt")
        arrival = time.perf_counter()
        adapter = request.adapter
        rid = adapter.revision_id if adapter else None
        policy = metrics.policy_label(adapter.policy if adapter else None)
        if rid is not None:
            self._uses[rid] = self._uses.get(rid, 0) + 1
        outcome = "abort"  # unless it finishes or fails: the client went away, or the engine stopped
        try:
            lora = await self._lora_request(adapter)
            waited = time.perf_counter() - arrival
            if adapter is not None:
                metrics.USER_VISIBLE_LOAD_SECONDS.observe(waited)
            params = SamplingParams(**sampling_kwargs(request.sampling), output_kind=RequestOutputKind.DELTA)
            stream = llm.generate(
                TokensPrompt(prompt_token_ids=list(request.prompt_ids)),
                params,
                request.request_id,
                lora_request=lora,
            )
            completion, last = 0, 0.0
            ttft = metrics.TTFT_SECONDS.labels(policy=policy, first_request=str(request.first_request).lower())
            itl = metrics.ITL_SECONDS.labels(policy=policy)
            async with contextlib.aclosing(stream):  # closing it early aborts the request in vLLM
                async for out in stream:
                    output = out.outputs[0]
                    token_ids = list(output.token_ids)  # this step's new tokens (DELTA output)
                    now = time.perf_counter()
                    if token_ids and not completion:
                        ttft.observe(now - arrival)
                    elif token_ids:
                        itl.observe((now - last) / len(token_ids))
                    finish = _finish_reason(output.finish_reason) if out.finished else None
                    yield GenerationChunk(
                        token_ids=token_ids,
                        text=output.text,
                        finish_reason=finish,
                        prompt_tokens=len(request.prompt_ids),
                        completion_tokens=completion + len(token_ids),
                        adapter_wait_seconds=waited if not completion else 0.0,
                    )
                    completion += len(token_ids)
                    last = now if token_ids else last
                    if finish is not None:
                        outcome = finish
                        metrics.GEN_TOKENS.inc(completion)
                        metrics.PROMPT_TOKENS.inc(len(request.prompt_ids))
                        return
        except LorafleetError:
            outcome = "error"
            raise
        finally:
            metrics.GEN_REQUESTS.labels(outcome=outcome).inc()
            if rid is not None:
                self._release(rid)
                if rid in self._registered:
                    self._registered.move_to_end(rid)


def _finish_reason(reason: str | None) -> Any:
    return reason if reason in ("stop", "length") else "abort"
