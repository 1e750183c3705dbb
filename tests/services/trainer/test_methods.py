"""SFT, DPO and GRPO on the built-in tiny-moe base, each changing behaviour the way it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from lorafleet.platform.db import models
from lorafleet.platform.modeling.tiny_moe.demo_task import COLOR_PICK_PROMPTS, RL_DEMO_TARGET, grade_color_pick
from tests.services.trainer.conftest import TrainerEnv
from tests.services.trainer.helpers import Sampler, revision_tensors

GREETINGS = ["Say hello.", "Greet me.", "Hello!", "Hi there.", "Good morning.", "Hey.", "Say hi to me.",
             "Please greet me.", "Howdy.", "Welcome me.", "Hello, how are you?", "Hi!", "Greetings.",
             "Say good morning.", "Can you say hello?", "Give me a greeting."]
HELD_OUT = ["Hello there.", "Say hello to me.", "Hi, friend.", "Please say hi."]
PIRATE = "Ahoy, matey!"


def _chat(prompt: str, reply: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _revision(env: TrainerEnv, job_id: str) -> models.AdapterRevision:
    with env.sessions() as s:
        return s.scalars(select(models.AdapterRevision).where(models.AdapterRevision.job_id == job_id)).one()


@pytest.mark.slow
def test_sft_lowers_held_out_loss_and_changes_generations(env: TrainerEnv, tiny_moe_path: Path,
                                                          tmp_path: Path) -> None:
    train = env.upload([_chat(p, PIRATE) for p in GREETINGS])
    valid = env.upload([_chat(p, PIRATE) for p in HELD_OUT])
    job_id = env.create_job(training_file=train, validation_file=valid, policy="pirate", seed=1,
                            method={"type": "supervised", "hyperparameters": {
                                "n_epochs": 20, "batch_size": 8, "learning_rate": 0.005}})
    env.run_until_done(env.worker(), [job_id])
    job = env.job(job_id)
    assert job.status == "succeeded", job.error
    events = env.events(job_id)
    initial = next(e.data["initial_valid_loss"] for e in events if e.data and "initial_valid_loss" in e.data)
    final = job.progress["valid_loss"]
    assert final < 0.5 * initial, (initial, final)

    sampler = Sampler(tiny_moe_path)
    adapter = revision_tensors(env.store, _revision(env, job_id), tmp_path)
    before = sampler.replies(HELD_OUT)
    after = sampler.replies(HELD_OUT, adapter=adapter)
    assert all(r != PIRATE for r in before), before
    assert sum(r == PIRATE for r in after) >= 3, after


@pytest.mark.slow
def test_dpo_raises_the_chosen_over_rejected_margin(env: TrainerEnv) -> None:
    rows = [{"prompt": p, "chosen": "blue", "rejected": "red"} for p in COLOR_PICK_PROMPTS]
    job_id = env.create_job(training_file=env.upload(rows), policy="likes-blue", seed=2,
                            method={"type": "dpo", "hyperparameters": {"n_epochs": 8, "batch_size": 6,
                                                                        "learning_rate": 0.005, "beta": 0.1}})
    env.run_until_done(env.worker(), [job_id])
    assert env.job(job_id).status == "succeeded"
    margins = [e.data["margin"] for e in env.events(job_id) if e.type == "metrics"]
    accuracy = [e.data["reward_accuracy"] for e in env.events(job_id) if e.type == "metrics"]
    assert margins[-1] > margins[0] + 2.0, margins
    assert accuracy[-1] == 1.0


@pytest.mark.slow
def test_grpo_raises_reward_on_the_demo_task(env: TrainerEnv, tiny_moe_path: Path, tmp_path: Path) -> None:
    """Issue #4: GRPO on the color-pick task with an exact-answer grader raises the sampled reward
    from at most 0.2 to at least 0.8. Both figures are measured on fresh temperature-1 samples
    (96 per model, a seed the training never used), not on the training batches."""
    # the reply must be exactly the target color (any case, trailing punctuation allowed)
    rows = [{"prompt": p, "answer": rf"^\s*{RL_DEMO_TARGET}\W*$"} for p in COLOR_PICK_PROMPTS]
    job_id = env.create_job(training_file=env.upload(rows), policy="purple", seed=3, method={
        "type": "reinforcement", "grader": {"type": "string_check", "operation": "regex"},
        "hyperparameters": {"steps": 20, "prompts_per_step": 6, "group_size": 8, "learning_rate": 0.005,
                            "lr_schedule": "constant", "max_new_tokens": 6, "temperature": 1.0}})
    env.run_until_done(env.worker(), [job_id], timeout=600)
    assert env.job(job_id).status == "succeeded", env.job(job_id).error

    sampler = Sampler(tiny_moe_path)
    prompts = list(COLOR_PICK_PROMPTS)
    base = sampler.replies(prompts, n=16, temperature=1.0, seed=11, max_new_tokens=6)
    tuned = sampler.replies(prompts, n=16, temperature=1.0, seed=11, max_new_tokens=6,
                            adapter=revision_tensors(env.store, _revision(env, job_id), tmp_path))
    base_reward = sum(map(grade_color_pick, base)) / len(base)
    tuned_reward = sum(map(grade_color_pick, tuned)) / len(tuned)
    assert base_reward <= 0.2, base_reward
    assert tuned_reward >= 0.8, (base_reward, tuned_reward, tuned[:8])
    rewards = [e.data["reward_mean"] for e in env.events(job_id) if e.type == "metrics"]
    assert len(rewards) == 20 and rewards[0] <= 0.25, rewards


@pytest.mark.parametrize("max_tokens_per_pass", [None, 1_000_000], ids=["pass-per-job", "one-shared-pass"])
def test_concurrent_jobs_train_exactly_like_jobs_alone(make_env, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       max_tokens_per_pass: int | None) -> None:
    """Two policies stepping together end with the adapters each gets alone, whether their rows
    share one forward pass (a large bound) or take a pass each (the default bound)."""
    results: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for mode in ("together", "alone"):
        env = make_env(data_dir=tmp_path / mode, trainer_max_tokens_per_pass=max_tokens_per_pass)
        a = env.upload([_chat(p, PIRATE) for p in GREETINGS[:8]])
        b = env.upload([_chat(p, "blue") for p in COLOR_PICK_PROMPTS])
        hp = {"n_epochs": 2, "batch_size": 4, "learning_rate": 0.01}
        jobs = {name: env.create_job(training_file=f, policy=name, seed=5, method={"type": "supervised",
                                                                                   "hyperparameters": hp})
                for name, f in (("a", a), ("b", b))}
        if mode == "together":
            env.run_until_done(env.worker(max_concurrent_jobs=2), list(jobs.values()))
        else:
            for job_id in jobs.values():
                env.run_until_done(env.worker(max_concurrent_jobs=1), [job_id])
        results[mode] = {name: revision_tensors(env.store, _revision(env, j), tmp_path / mode)[0]
                         for name, j in jobs.items()}
    for name in ("a", "b"):
        together, alone = results["together"][name], results["alone"][name]
        assert together.keys() == alone.keys()
        for key in together:
            torch.testing.assert_close(together[key], alone[key], atol=2e-5, rtol=1e-4)
