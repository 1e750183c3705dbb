"""The torch engine's step thread: continuous batching over one KV cache and one adapter bank.

Every iteration:

1. applies the commands that arrived since the last step (new rows, aborts, adapter installs),
   so rows join and leave, and bank slots change, only between steps;
2. runs one decode step over every row that has its prompt in the cache (one token each);
3. runs one prefill step over rows still reading their prompt, admitting waiting rows while KV
   slots and the step's prompt-token budget last (a long prompt is read in chunks, so running
   rows keep decoding while it loads);
4. samples each finished position with the row's own parameters and generator, ends rows on
   a stop token / EOS / max_tokens, and hands each row's new token to its request's event loop.

Each step is one forward over all its rows, each row with its own adapter slot (or -1 for the
base model) in a single :class:`LoraBatch`: adapters are never merged into the base weights
and rows are never run one at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import LorafleetError, Unavailable
from lorafleet.platform.modeling import CausalLM, DeviceAdapterBank, KVCache, LoraBatch
from lorafleet.services.serving.engine._sampler import RowSampling, choose_tokens

EngineFinish = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class RowEvent:
    """What a request's consumer receives from the step thread."""

    token: int | None
    """The token sampled for this row in one step (None on abort or error)."""
    finish: EngineFinish | None = None
    """"stop": ``token`` is a stop token or EOS; "length": max_tokens reached."""
    error: LorafleetError | None = None


@dataclass(eq=False)
class Row:
    """One request inside the step thread (identity, not value, names it)."""

    prompt: list[int]
    adapter_slot: int
    """Device bank slot, or -1 for the plain base model."""
    sampling: RowSampling
    stop_ids: frozenset[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[RowEvent]
    on_done: Callable[[], None] | None
    """Called once on the step thread after the row left the batch (releases its adapter use)."""
    arrival: float
    """perf_counter() when the request arrived (TTFT includes any adapter wait)."""
    ttft: Any
    itl: Any
    kv_slot: int = -1
    prefilled: int = 0
    generated: int = 0
    last_token: int = -1
    last_emit: float = 0.0
    done: bool = False


@dataclass
class _Call:
    fn: Callable[[], None]
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Batcher:
    def __init__(
        self,
        model: CausalLM,
        *,
        bank: DeviceAdapterBank,
        max_batch_rows: int,
        max_context: int,
        max_prefill_tokens: int,
    ) -> None:
        self.model = model
        self.bank = bank
        self.max_prefill_tokens = max_prefill_tokens
        self.cache = KVCache(
            model.spec, max_slots=max_batch_rows, max_len=max_context, dtype=model.dtype, device=model.device
        )
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._waiting: deque[Row] = deque()
        self._prefilling: list[Row] = []
        self._decoding: list[Row] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failure: BaseException | None = None
        self._outbox: list[tuple[Row, RowEvent]] = []

    # -- called from any thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="torch-engine-step", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def submit(self, row: Row) -> None:
        if not self.running:
            raise Unavailable("the engine is not running", code="engine_not_running", retry_after=5.0)
        self._commands.put(row)

    def abort(self, row: Row) -> None:
        self._commands.put(("abort", row))

    def call(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Run ``fn`` on the step thread between two steps."""
        call = _Call(fn)
        if not self.running:
            call.future.set_exception(Unavailable("the engine is not running", code="engine_not_running"))
            return call.future
        self._commands.put(call)
        return call.future

    def load(self) -> tuple[int, int]:
        """(rows running, rows waiting for a KV slot), for a replica's heartbeat."""
        return len(self._prefilling) + len(self._decoding), len(self._waiting)

    # -- the step thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._apply_commands(block=not self._has_work()):
                    if self._has_work():
                        self._step()
                    self._flush()
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self._closed = True
            self._shutdown()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    def _apply_commands(self, *, block: bool) -> bool:
        """Apply pending commands (waiting for one when ``block``); False once told to stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is _STOP:
                return False
            if isinstance(command, Row):
                self._waiting.append(command)
            elif isinstance(command, _Call):
                try:
                    command.fn()
                except Exception as exc:  # handed to the caller (an adapter install), as an executor does
                    command.future.set_exception(exc)
                else:
                    command.future.set_result(None)
            elif isinstance(command, tuple):
                self._finish(command[1], RowEvent(token=None, finish="abort"))

    def _step(self) -> None:
        decode = list(self._decoding)
        if decode:
            logits = self.model.step(
                torch.tensor([r.last_token for r in decode], device=self.model.device)[:, None],  # [B, 1]
                cache=self.cache,
                slots=[r.kv_slot for r in decode],
                lora=self._lora([r.adapter_slot for r in decode]),
                last_only=True,
            )  # [B, V]
            tokens = choose_tokens(logits, [r.sampling for r in decode])
            now = time.perf_counter()
            for row, token in zip(decode, tokens, strict=True):
                self._advance(row, token, now)
        prefill, counts = self._plan_prefill()
        if prefill:
            width = max(counts)
            chunks = [
                row.prompt[row.prefilled : row.prefilled + n] + [0] * (width - n)
                for row, n in zip(prefill, counts, strict=True)
            ]
            logits = self.model.step(
                torch.tensor(chunks, device=self.model.device),  # [B, T], right padding
                cache=self.cache,
                slots=[r.kv_slot for r in prefill],
                num_tokens=counts,
                lora=self._lora([r.adapter_slot for r in prefill]),
                last_only=True,
            )  # [B, V]
            for row, n in zip(prefill, counts, strict=True):
                row.prefilled += n
            ready = [i for i, r in enumerate(prefill) if r.prefilled == len(r.prompt)]
            if ready:
                tokens = choose_tokens(logits[ready], [prefill[i].sampling for i in ready])
                now = time.perf_counter()
                for i, token in zip(ready, tokens, strict=True):
                    row = prefill[i]
                    self._prefilling.remove(row)
                    self._decoding.append(row)
                    self._advance(row, token, now)
            metrics.PROMPT_TOKENS.inc(sum(counts))
        rows = decode + prefill
        metrics.BATCH_SIZE.observe(len(rows))
        metrics.BATCH_ADAPTERS.observe(len({r.adapter_slot for r in rows if r.adapter_slot >= 0}))

    def _plan_prefill(self) -> tuple[list[Row], list[int]]:
        """Rows reading their prompt this step and how many prompt tokens each reads."""
        budget = self.max_prefill_tokens
        rows: list[Row] = []
        counts: list[int] = []
        for row in self._prefilling:
            if budget <= 0:
                break
            n = min(len(row.prompt) - row.prefilled, budget)
            rows.append(row)
            counts.append(n)
            budget -= n
        while budget > 0 and self._waiting and self.cache.free_slots:
            row = self._waiting.popleft()
            row.kv_slot = self.cache.acquire()
            self._prefilling.append(row)
            n = min(len(row.prompt), budget)
            rows.append(row)
            counts.append(n)
            budget -= n
        return rows, counts

    def _lora(self, slots: list[int]) -> LoraBatch | None:
        if all(s < 0 for s in slots):
            return None
        return LoraBatch(self.bank.bank, slots)

    def _advance(self, row: Row, token: int, now: float) -> None:
        row.generated += 1
        row.last_token = token
        if row.generated == 1:
            row.ttft.observe(now - row.arrival)
        else:
            row.itl.observe(now - row.last_emit)
        row.last_emit = now
        metrics.GEN_TOKENS.inc()
        finish: EngineFinish | None = None
        if token in row.stop_ids:
            finish = "stop"
        elif row.generated >= row.max_tokens:
            finish = "length"
        if finish is None:
            self._outbox.append((row, RowEvent(token=token)))
        else:
            self._finish(row, RowEvent(token=token, finish=finish))

    def _finish(self, row: Row, event: RowEvent) -> None:
        """Remove the row from the batch, free its KV slot and adapter use, send its last event."""
        if row.done:
            return
        row.done = True
        if row in self._decoding:
            self._decoding.remove(row)
        elif row in self._prefilling:
            self._prefilling.remove(row)
        elif row in self._waiting:
            self._waiting.remove(row)
        if row.kv_slot >= 0:
            self.cache.release(row.kv_slot)
            row.kv_slot = -1
        if row.on_done is not None:
            row.on_done()
        self._outbox.append((row, event))

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops: one wake-up per loop, not per token."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Row, RowEvent]]] = defaultdict(list)
        for row, event in self._outbox:
            by_loop[row.loop].append((row, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:
                pass  # that loop is closed: its requests are gone, nobody reads these events

    def _shutdown(self) -> None:
        if self.failure is None:
            error = Unavailable("the engine stopped", code="engine_not_running", retry_after=5.0)
        else:
            error = Unavailable(f"the engine failed: {self.failure!r}", code="engine_failed", retry_after=5.0)
        for row in [*self._waiting, *self._prefilling, *self._decoding]:
            self._finish(row, RowEvent(token=None, finish="abort", error=error))
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, Row):
                self._finish(command, RowEvent(token=None, finish="abort", error=error))
            elif isinstance(command, _Call):
                command.future.set_exception(error)
        self._flush()


def _deliver(items: list[tuple[Row, RowEvent]]) -> None:
    for row, event in items:
        row.events.put_nowait(event)


