"""One training step over several job runs on one resident base: their rollouts are generated
together and their rows share one forward and one backward pass, each row with its own adapter
(the per-row LoRA of ``platform.modeling``), then each run's optimizer steps on its own gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorafleet.platform.domain.errors import LorafleetError
from lorafleet.platform.modeling.lora import LoraBatch, stack_adapters
from lorafleet.platform.modeling.model import CausalLM
from lorafleet.platform.modeling.sampling import generate
from lorafleet.services.trainer.data import Batch
from lorafleet.services.trainer.recipes import JobRun, StepPlan, TrainingDiverged


class RunFailed(Exception):
    """One run's own error during a shared step; the other runs did not advance and may retry."""

    def __init__(self, job_id: str, error: BaseException) -> None:
        super().__init__(f"job {job_id}: {error}")
        self.job_id = job_id
        self.error = error


@dataclass
class StepResult:
    metrics: dict[str, float]
    tokens: int
    seconds: float


def _concat(batches: Sequence[Batch], pad_id: int) -> Batch:
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Batch(torch.cat([pad(b.input_ids, pad_id) for b in batches]),
                 torch.cat([pad(b.attention_mask, False) for b in batches]),
                 torch.cat([pad(b.loss_mask, False) for b in batches]))



def _passes(plans: Sequence[StepPlan], max_tokens: int) -> list[list[int]]:
    """Runs (by index, in order) grouped into forward/backward passes of at most ``max_tokens``
    padded tokens (rows x widest row) each. A run is never split across passes, since its loss may
    couple rows (DPO's chosen and rejected); a run larger than the bound gets a pass to itself."""
    passes: list[list[int]] = []
    rows = width = 0
    for i, plan in enumerate(plans):
        n, w = plan.batch.input_ids.shape
        if passes and (rows + n) * max(width, w) <= max_tokens:
            passes[-1].append(i)
            rows, width = rows + n, max(width, w)
        else:
            passes.append([i])
            rows, width = n, w
    return passes


class MultiPolicyStep:
    def __init__(self, model: CausalLM, *, pad_id: int, stop_ids: Sequence[int],
                 max_tokens_per_pass: int | None = None) -> None:
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = list(stop_ids)
        self.max_tokens_per_pass = max_tokens_per_pass
        """Padded tokens one forward/backward pass may hold; activation memory grows with it.
        None: as many as the largest run's batch of the step, so training runs together never
        needs more activation memory than the largest of them would alone (measured on tiny-moe:
        4 GRPO runs in one pass peaked 29% above one run alone). Rollouts are generated for all
        runs in one batch either way; they keep no activations."""

    def _rollouts(self, runs: Sequence[JobRun], generator: torch.Generator) -> None:
        requests = [(i, r.sample_requests()) for i, r in enumerate(runs)]
        flat = [(i, req) for i, reqs in requests for req in reqs]
        if not flat:
            return
        with torch.no_grad():
            bank = stack_adapters([r.params for r in runs])
        gens = generate(
            self.model, [req.prompt_ids for _, req in flat],
            max_new_tokens=max(req.max_new_tokens for _, req in flat), stop_ids=self.stop_ids,
            params=[req.params for _, req in flat], bank=bank, adapter_ids=[i for i, _ in flat], generator=generator,
        )
        offset = 0
        for i, reqs in requests:
            if reqs:
                mine = gens[offset: offset + len(reqs)]
                for g, req in zip(mine, reqs, strict=True):
                    if len(g.tokens) > req.max_new_tokens:
                        del g.tokens[req.max_new_tokens:], g.logprobs[req.max_new_tokens:]
                        g.finished = False
                runs[i].take_samples(mine)
                offset += len(reqs)

    def _target_logprobs(self, ids: torch.Tensor, attn: torch.Tensor, targets: torch.Tensor, *,
                         lora: LoraBatch | None) -> torch.Tensor:
        """log p(token t | < t) ``[B, T]`` at the loss positions only (0 elsewhere): the vocabulary
        projection runs on those positions alone, not on every prompt token."""
        hidden = self.model.hidden_states(ids, attn, lora=lora)  # [B, T, hidden]
        rows, cols = targets[:, 1:].nonzero(as_tuple=True)  # target at t+1 is predicted at t
        logits = self.model.logits(hidden[rows, cols])  # [M, V]
        picked = -torch.nn.functional.cross_entropy(logits.float(), ids[rows, cols + 1], reduction="none")
        out = torch.zeros(ids.shape, dtype=picked.dtype, device=ids.device)
        return out.index_put((rows, cols + 1), picked)

    def step(self, runs: Sequence[JobRun]) -> list[StepResult]:
        """Advance every run by one optimizer step. A run's own failure raises :class:`RunFailed`;
        then no run has stepped and no gradient is left behind, so the others may retry."""
        start = time.perf_counter()
        seed = sum(r.job.seed * 7919 + r.step for r in runs)
        self._rollouts(runs, torch.Generator(device="cpu").manual_seed(seed))
        plans: list[StepPlan] = []
        for r in runs:
            try:
                plans.append(r.plan())
            except LorafleetError as exc:
                raise RunFailed(r.job.id, exc) from exc
        budget = self.max_tokens_per_pass or max(p.batch.input_ids.numel() for p in plans)
        results_metrics: list[dict[str, float]] = [{} for _ in runs]
        try:
            for group in _passes(plans, budget):
                done = self._forward_backward([runs[i] for i in group], [plans[i] for i in group])
                for i, run_metrics in zip(group, done, strict=True):
                    results_metrics[i] = run_metrics
        except RunFailed:
            for r in runs:  # earlier passes have left gradients; nobody steps on them
                r.optimizer.zero_grad(set_to_none=True)
            raise
        seconds = time.perf_counter() - start
        results = []
        for run, plan, metrics in zip(runs, plans, results_metrics, strict=True):
            norm = run.apply_update()
            if not math.isfinite(norm):
                raise RunFailed(run.job.id, TrainingDiverged(f"gradient norm is {norm} at step {run.step}",
                                                             details={"step": run.step}))
            tokens = plan.batch.tokens
            run.tokens_seen += tokens
            metrics = metrics | {"grad_norm": norm, "lr": float(run.scheduler.get_last_lr()[0]),
                                 "tokens_per_second": tokens / seconds if seconds > 0 else 0.0}
            results.append(StepResult(metrics, tokens, seconds))
        return results

    def _forward_backward(self, runs: Sequence[JobRun], plans: Sequence[StepPlan]) -> list[dict[str, float]]:
        """One forward and one backward pass over these runs' rows, each row with its own adapter;
        gradients land in each run's adapter. Returns each run's loss metrics."""
        device = self.model.device
        joined = _concat([p.batch for p in plans], self.pad_id)
        ids = joined.input_ids.to(device)
        attn = joined.attention_mask.to(device)
        rows = [p.batch.input_ids.shape[0] for p in plans]
        owner = [i for i, n in enumerate(rows) for _ in range(n)]

        targets = joined.loss_mask.to(device)
        ref: torch.Tensor | None = None
        if any(p.needs_reference for p in plans):
            with torch.no_grad():
                ref = self._target_logprobs(ids, attn, targets, lora=None).cpu()
        lora = LoraBatch(stack_adapters([r.params for r in runs]), owner)
        logp = self._target_logprobs(ids, attn, targets, lora=lora).cpu()
        total = torch.zeros(())
        results_metrics = []
        offset = 0
        for run, plan, n in zip(runs, plans, rows, strict=True):
            width = plan.batch.input_ids.shape[1]
            mine = logp[offset: offset + n, :width]
            mine_ref = ref[offset: offset + n, :width] if ref is not None and plan.needs_reference else None
            loss, metrics = run.loss(mine, plan, mine_ref)
            if not math.isfinite(loss.item()):
                raise RunFailed(run.job.id, TrainingDiverged(f"loss is {loss.item()} at step {run.step + 1}",
                                                             details={"step": run.step + 1}))
            total = total + loss
            results_metrics.append(metrics)
            offset += n
        total.backward()
        return results_metrics
