"""Training methods as job runs: each holds one job's adapter, optimizer and data position, and
says what rows it wants trained this step and how to turn their log-probabilities into a loss.

The :mod:`scheduler` puts the rows of every active run into one forward pass (each row with its
own adapter), so several policies train at once on one resident base.

Randomness is derived from (job seed, step), never carried: data order, GRPO sampling and the
adapter initialisation are functions of those two numbers, so a job resumed from a checkpoint
at step k sees exactly what it would have seen had it never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lorafleet.platform.domain.datasets import ChatRow, PreferenceRow, PromptCompletionRow, RLRow
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.jobs import (
    DpoHyperparameters,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
)
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.modeling.lora import AdapterParams, LoraBatch, new_adapter_params, stack_adapters
from lorafleet.platform.modeling.model import CausalLM
from lorafleet.platform.modeling.sampling import Generation, SamplingParams
from lorafleet.services.trainer.data import Batch, Sequence, Tokenizing, collate, token_logprobs
from lorafleet.services.trainer.graders import Grader, GraderFailure
from lorafleet.services.trainer.ledger import JobSnapshot


class TrainingDiverged(InvalidRequest):
    code = "loss_not_finite"


@dataclass
class SampleRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int


@dataclass
class StepPlan:
    """What one run contributes to a step: its rows, and whether they need base-model log-probs."""

    batch: Batch
    needs_reference: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _permutation(n: int, *, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class JobRun:
    """Common state of every method: adapter, optimizer, schedule, step counter."""

    method = ""

    def __init__(self, job: JobSnapshot, *, model: CausalLM, tokenizing: Tokenizing, hp: Any) -> None:
        self.job = job
        self.model = model
        self.tokenizing = tokenizing
        self.hp = hp
        self.lora_config = LoraConfig.model_validate(job.lora)
        self.params: AdapterParams = new_adapter_params(model.spec, self.lora_config, seed=job.seed,
                                                        base_model=model, device=model.device)
        self.optimizer = torch.optim.AdamW(self.params.parameters(), lr=hp.learning_rate, weight_decay=0.0)
        self.step = 0
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(hp.lr_schedule, hp.warmup_steps, self.total_steps))
        self.tokens_seen = 0

    def _total_steps(self) -> int:
        raise NotImplementedError

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def sample_requests(self) -> list[SampleRequest]:
        return []

    def take_samples(self, generations: list[Generation]) -> None:
        """Receives the generations for :meth:`sample_requests`, in order."""

    def plan(self) -> StepPlan:
        raise NotImplementedError

    def loss(self, logp: Tensor, plan: StepPlan, ref_logp: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """logp ``[b, T]``: log p(token t | < t) of this run's rows under its adapter."""
        raise NotImplementedError

    def apply_update(self) -> float:
        """Clip, step, advance. Returns the gradient norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params.parameters(), self.hp.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return float(norm)

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics, where the method has a validation set."""
        return {}

    # checkpoints ---------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"adapter/{k}": v.detach().cpu().contiguous() for k, v in self.params.items()}
        meta: dict[str, Any] = {"step": self.step, "optimizer_steps": {},
                                "scheduler": self.scheduler.state_dict()}
        for k, p in self.params.items():
            state = self.optimizer.state.get(p)
            if state:
                tensors[f"optim/{k}/exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
                tensors[f"optim/{k}/exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
                meta["optimizer_steps"][k] = float(state["step"])
        return tensors, meta

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"adapter/{k}"])
        for k, p in self.params.items():
            if f"optim/{k}/exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": torch.tensor(meta["optimizer_steps"][k]),
                    "exp_avg": tensors[f"optim/{k}/exp_avg"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"optim/{k}/exp_avg_sq"].to(p.device).clone(),
                }
        self.step = int(meta["step"])
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # the scheduler's state does not reach the optimizer by itself


class _EpochData:
    """Deterministic epoch-shuffled minibatches over a list of items."""

    def __init__(self, n: int, *, batch_size: int, epochs: int, seed: int) -> None:
        self.n, self.batch_size, self.epochs, self.seed = n, batch_size, epochs, seed
        self.steps_per_epoch = math.ceil(n / batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = _permutation(self.n, seed=self.seed, epoch=epoch)
        return order[within * self.batch_size: (within + 1) * self.batch_size]


def _masked_mean_nll(logp: Tensor, mask: Tensor) -> Tensor:
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


class SupervisedRun(JobRun):
    method = "supervised"
    hp: SupervisedHyperparameters

    def __init__(self, job: JobSnapshot, *, model: CausalLM, tokenizing: Tokenizing,
                 rows: list[ChatRow | PromptCompletionRow], validation: list[ChatRow | PromptCompletionRow]) -> None:
        self.seqs = [tokenizing.sft(r, line=i + 1) for i, r in enumerate(rows)]
        self.val_seqs = [tokenizing.sft(r, line=i + 1) for i, r in enumerate(validation)]
        hp = SupervisedHyperparameters.model_validate(job.hyperparameters)
        self.data = _EpochData(len(self.seqs), batch_size=hp.batch_size, epochs=hp.n_epochs, seed=job.seed)
        super().__init__(job, model=model, tokenizing=tokenizing, hp=hp)

    def _total_steps(self) -> int:
        return self.data.total_steps

    def plan(self) -> StepPlan:
        batch = collate([self.seqs[i] for i in self.data.indices(self.step)], pad_id=self.tokenizing.pad_id)
        return StepPlan(batch)

    def loss(self, logp: Tensor, plan: StepPlan, ref_logp: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        loss = _masked_mean_nll(logp, plan.batch.loss_mask)
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_seqs:
            return {}
        total, count = 0.0, 0
        bank = stack_adapters([self.params])
        for start in range(0, len(self.val_seqs), 16):
            batch = collate(self.val_seqs[start:start + 16], pad_id=self.tokenizing.pad_id)
            ids = batch.input_ids.to(self.model.device)
            logits = self.model(ids, batch.attention_mask.to(self.model.device),
                                lora=LoraBatch(bank, [0] * ids.shape[0]))
            logp = token_logprobs(logits, ids).cpu()
            total += float(-(logp * batch.loss_mask).sum())
            count += int(batch.loss_mask.sum())
        return {"valid_loss": total / max(1, count)}


class DpoRun(JobRun):
    method = "dpo"
    hp: DpoHyperparameters

    def __init__(self, job: JobSnapshot, *, model: CausalLM, tokenizing: Tokenizing,
                 rows: list[PreferenceRow], validation: list[PreferenceRow]) -> None:
        self.pairs = [tokenizing.preference(r, line=i + 1) for i, r in enumerate(rows)]
        hp = DpoHyperparameters.model_validate(job.hyperparameters)
        self.data = _EpochData(len(self.pairs), batch_size=hp.batch_size, epochs=hp.n_epochs, seed=job.seed)
        super().__init__(job, model=model, tokenizing=tokenizing, hp=hp)

    def _total_steps(self) -> int:
        return self.data.total_steps

    def plan(self) -> StepPlan:
        seqs: list[Sequence] = []
        for i in self.data.indices(self.step):
            seqs += list(self.pairs[i])  # chosen, rejected: rows 2k and 2k+1
        return StepPlan(collate(seqs, pad_id=self.tokenizing.pad_id), needs_reference=True)

    def loss(self, logp: Tensor, plan: StepPlan, ref_logp: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if ref_logp is None:
            raise InvalidRequest("DPO needs reference log-probabilities")
        mask = plan.batch.loss_mask
        seq = (logp * mask).sum(-1)  # [2n]
        ref = (ref_logp * mask).sum(-1)
        policy_margin = seq[0::2] - seq[1::2]
        ref_margin = ref[0::2] - ref[1::2]
        logits = self.hp.beta * (policy_margin - ref_margin)
        loss = -torch.nn.functional.logsigmoid(logits).mean()
        return loss, {"loss": loss.item(), "margin": policy_margin.mean().item(),
                      "reward_accuracy": (logits > 0).float().mean().item()}


class ReinforcementRun(JobRun):
    """GRPO: groups of samples per prompt, group-normalised advantages, a PPO-clip or truncated
    importance-sampling loss against the sampler's log-probabilities, optional KL to the base."""

    method = "reinforcement"
    hp: ReinforcementHyperparameters

    def __init__(self, job: JobSnapshot, *, model: CausalLM, tokenizing: Tokenizing, rows: list[RLRow],
                 grader: Grader) -> None:
        self.rows = rows
        self.prompts = [tokenizing.rl_prompt(r) for r in rows]
        self.grader = grader
        hp = ReinforcementHyperparameters.model_validate(
            {k: v for k, v in job.hyperparameters.items() if k != "grader"})
        super().__init__(job, model=model, tokenizing=tokenizing, hp=hp)
        self._pending: list[int] = []
        self._samples: list[Generation] = []
        self.failed_grades = 0

    def _total_steps(self) -> int:
        return self.hp.steps

    def _prompt_indices(self) -> list[int]:
        """``prompts_per_step`` prompts, walking epoch-shuffled orders (wrapping for small sets)."""
        n, per = len(self.rows), self.hp.prompts_per_step
        picked = []
        for j in range(self.step * per, (self.step + 1) * per):
            epoch, within = divmod(j, n)
            picked.append(_permutation(n, seed=self.job.seed, epoch=epoch)[within])
        return picked

    def sample_requests(self) -> list[SampleRequest]:
        self._pending = self._prompt_indices()
        params = SamplingParams(temperature=self.hp.temperature)
        return [SampleRequest(self.prompts[i], params, self.hp.max_new_tokens)
                for i in self._pending for _ in range(self.hp.group_size)]

    def take_samples(self, generations: list[Generation]) -> None:
        self._samples = generations

    def plan(self) -> StepPlan:
        g = self.hp.group_size
        eos = self.tokenizing.eos_id
        seqs, sampler_logp, rewards, valid = [], [], [], []
        for k, gen in enumerate(self._samples):
            row = self.rows[self._pending[k // g]]
            text = self.tokenizing.tok.decode([t for t in gen.tokens if t != eos], skip_special_tokens=True)
            try:
                reward, ok = self.grader.grade(row, text), True
            except GraderFailure:
                self.failed_grades += 1
                reward, ok = 0.0, False
            prompt = self.prompts[self._pending[k // g]]
            seqs.append(Sequence(prompt + gen.tokens, [False] * len(prompt) + [True] * len(gen.tokens)))
            sampler_logp.append([0.0] * len(prompt) + gen.logprobs)
            rewards.append(reward)
            valid.append(ok)
        if not any(valid):
            raise GraderFailure("every sample of this step failed to grade", code="grader_error")
        r = torch.tensor(rewards)
        ok_mask = torch.tensor(valid)
        adv = torch.zeros_like(r)
        for start in range(0, len(r), g):
            grp = slice(start, start + g)
            members = ok_mask[grp]
            if int(members.sum()) >= 2:
                vals = r[grp][members]
                normed = (r[grp] - vals.mean()) / (vals.std() + 1e-4)
                adv[grp] = torch.where(members, normed, torch.zeros_like(normed))
        batch = collate(seqs, pad_id=self.tokenizing.pad_id)
        old = torch.zeros(batch.input_ids.shape)
        for i, lp in enumerate(sampler_logp):
            old[i, : len(lp)] = torch.tensor(lp)
        batch.loss_mask &= ok_mask[:, None]
        return StepPlan(batch, needs_reference=self.hp.kl_coef > 0,
                        extra={"advantages": adv, "sampler_logp": old, "rewards": r[ok_mask]})

    def loss(self, logp: Tensor, plan: StepPlan, ref_logp: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        mask = plan.batch.loss_mask.float()
        adv = plan.extra["advantages"][:, None]  # [b, 1]
        log_ratio = logp - plan.extra["sampler_logp"]
        ratio = torch.exp(log_ratio.clamp(max=math.log(self.hp.ratio_cap)))
        if self.hp.loss == "ppo_clip":
            clipped = ratio.clamp(1 - self.hp.clip_epsilon, 1 + self.hp.clip_epsilon)
            per_token = -torch.minimum(ratio * adv, clipped * adv)
        else:
            per_token = -(ratio.detach() * logp * adv)
        if ref_logp is not None and self.hp.kl_coef > 0:
            d = ref_logp - logp
            per_token = per_token + self.hp.kl_coef * (torch.exp(d) - d - 1)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        rewards = plan.extra["rewards"]
        return loss, {"loss": loss.item(), "reward_mean": float(rewards.mean()),
                      "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
                      "failed_grades": float(self.failed_grades)}
