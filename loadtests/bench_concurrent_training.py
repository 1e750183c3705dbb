"""Concurrent versus sequential training of several GRPO policies on one resident tiny-moe base.

Each mode runs in its own subprocess (so peak RSS is measured per mode, not mixed), with the
same policies, steps and seeds. Sequential: one policy after another, each alone in the
trainer's step. Concurrent: all policies step together; their rollouts are generated in one
batch and their rows share one forward and one backward pass, each row with its own adapter.

    python loadtests/bench_concurrent_training.py [--policies 4] [--steps 10] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _worker(mode: str, policies: int, steps: int, model_dir: str) -> None:
    import torch

    from lorafleet.platform.domain.datasets import RLRow
    from lorafleet.platform.domain.jobs import StringCheckGrader
    from lorafleet.platform.domain.lora import LoraConfig
    from lorafleet.platform.modeling import load_base_model
    from lorafleet.platform.modeling.tiny_moe.demo_task import COLOR_PICK_PROMPTS, COLORS
    from lorafleet.services.trainer.data import Tokenizing
    from lorafleet.services.trainer.graders import make_grader
    from lorafleet.services.trainer.ledger import JobSnapshot
    from lorafleet.services.trainer.recipes import ReinforcementRun
    from lorafleet.services.trainer.scheduler import MultiPolicyStep

    torch.manual_seed(0)
    model, _, tok = load_base_model(model_dir)
    tokenizing = Tokenizing(tok, max_len=128, truncation="truncate")
    hp = {"steps": steps, "prompts_per_step": 6, "group_size": 8, "learning_rate": 0.03, "max_new_tokens": 4}
    runs = []
    for i in range(policies):
        target = COLORS[i % len(COLORS)]
        rows = [RLRow.model_validate({"prompt": p, "answer": target}) for p in COLOR_PICK_PROMPTS]
        job = JobSnapshot(id=f"bench-{i}", tenant_id="t", base_model_id="tiny-moe", method="reinforcement",
                          hyperparameters=hp, lora=LoraConfig().model_dump(mode="json"), policy_name=f"p{i}",
                          training_file_id="f", validation_file_id=None, seed=100 + i, attempts=1,
                          auto_rollout=False, policy_id=f"pol{i}", revision_id=f"r{i}")
        runs.append(ReinforcementRun(job, model=model, tokenizing=tokenizing, rows=rows,
                                     grader=make_grader(StringCheckGrader(type="string_check"))))
    stepper = MultiPolicyStep(model, pad_id=tokenizing.pad_id, stop_ids=[tokenizing.eos_id])
    rewards: dict[str, float] = {}
    start = time.perf_counter()
    if mode == "concurrent":
        while active := [r for r in runs if not r.done]:
            for r, res in zip(active, stepper.step(active), strict=True):
                rewards[r.job.id] = res.metrics["reward_mean"]
    else:
        for run in runs:
            while not run.done:
                rewards[run.job.id] = stepper.step([run])[0].metrics["reward_mean"]
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "wall_seconds": wall, "peak_rss_mib": peak_kib / 1024,
                      "steps_per_policy": steps, "policies": policies,
                      "final_reward_mean": sum(rewards.values()) / len(rewards)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model-dir", default=str(ROOT / ".lorafleet" / "models" / "tiny-moe"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--_worker", choices=["sequential", "concurrent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        _worker(args._worker, args.policies, args.steps, args.model_dir)
        return
    if not (Path(args.model_dir) / "config.json").exists():
        from lorafleet.platform.modeling.tiny_moe import build_tiny_moe

        build_tiny_moe(Path(args.model_dir).parent)
    results: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    for _ in range(args.repeats):
        for mode in ("sequential", "concurrent"):
            out = subprocess.run([sys.executable, __file__, "--_worker", mode, "--policies", str(args.policies),
                                  "--steps", str(args.steps), "--model-dir", args.model_dir],
                                 capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    seq = min(r["wall_seconds"] for r in results["sequential"])
    con = min(r["wall_seconds"] for r in results["concurrent"])
    seq_mem = max(r["peak_rss_mib"] for r in results["sequential"])
    con_mem = max(r["peak_rss_mib"] for r in results["concurrent"])
    print(f"{args.policies} GRPO policies x {args.steps} steps on tiny-moe "
          f"(6 prompts x 8 samples per step, 4 new tokens); best of {args.repeats}")
    print(f"  mode         wall (s)   peak RSS (MiB)   final reward mean")
    for mode, wall, mem in (("sequential", seq, seq_mem), ("concurrent", con, con_mem)):
        reward = results[mode][-1]["final_reward_mean"]
        print(f"  {mode:<11} {wall:9.2f} {mem:16.1f} {reward:19.3f}")
    speedup, mem_ratio = seq / con, con_mem / seq_mem
    print(f"  speedup {speedup:.2f}x (target >= 1.8x: {'MET' if speedup >= 1.8 else 'NOT MET'}); "
          f"peak memory {100 * (mem_ratio - 1):+.1f}% (target <= +10%: {'MET' if mem_ratio <= 1.10 else 'NOT MET'})")


if __name__ == "__main__":
    main()
