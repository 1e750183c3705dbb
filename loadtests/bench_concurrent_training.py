"""Concurrent versus sequential training of several GRPO policies on one resident tiny-moe base.

Each mode runs in its own subprocess (so peak RSS is measured per mode, not mixed), with the
same policies, steps and seeds. Sequential: one policy after another, each alone in the
trainer's step. Concurrent: all policies step together; their rollouts are generated in one
batch and their rows share one forward and one backward pass, each row with its own adapter.

The base is the built-in tiny-moe that ``make test-model`` builds under ``.lorafleet/test-models``
(built there first if missing or stale; the build is cached by seed, recipe and builder version);
``--model-dir`` names any other local model directory instead. Both modes run on the same number
of torch threads (``--threads``, default 1: on a shared two-core machine a second thread mostly
waits at barriers). Peak memory is each subprocess's peak RSS, printed beside its RSS right after
loading the base, so the training overhead on top of the resident base is visible too.

    python loadtests/bench_concurrent_training.py [--policies 4] [--steps 10] [--threads 1]
        [--prompts-per-step 6] [--group-size 8] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc; 0.0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(mode: str, policies: int, steps: int, model_dir: str, threads: int, prompts: int, group: int) -> None:
    import torch

    torch.set_num_threads(threads)

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
    loaded_rss = _rss_mib()
    tokenizing = Tokenizing(tok, max_len=128, truncation="truncate")
    # The settings of the GRPO test, which reaches a sampled reward above 0.9 in about ten steps:
    # the benchmark times real learning, not a run whose rewards are all zero.
    hp = {"steps": steps, "prompts_per_step": prompts, "group_size": group, "learning_rate": 0.005,
          "lr_schedule": "constant", "max_new_tokens": 4}
    runs = []
    for i in range(policies):
        target = COLORS[i % len(COLORS)]  # each policy learns to answer its own color
        rows = [RLRow.model_validate({"prompt": p, "answer": rf"^\s*{target}\W*$"}) for p in COLOR_PICK_PROMPTS]
        job = JobSnapshot(id=f"bench-{i}", tenant_id="t", base_model_id="tiny-moe", method="reinforcement",
                          hyperparameters=hp, lora=LoraConfig().model_dump(mode="json"), policy_name=f"p{i}",
                          training_file_id="f", validation_file_id=None, seed=100 + i, attempts=1,
                          auto_rollout=False, policy_id=f"pol{i}", revision_id=f"r{i}")
        runs.append(ReinforcementRun(job, model=model, tokenizing=tokenizing, rows=rows,
                                     grader=make_grader(StringCheckGrader(type="string_check", operation="regex"))))
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
                      "loaded_rss_mib": loaded_rss,
                      "steps_per_policy": steps, "policies": policies,
                      "final_reward_mean": sum(rewards.values()) / len(rewards)}))


def _load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each mode's process")
    parser.add_argument("--prompts-per-step", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--models-dir", default=str(ROOT / ".lorafleet" / "test-models"),
                        help="where tiny-moe is built and cached (make test-model's directory)")
    parser.add_argument("--model-dir", default=None, help="an already built model directory to use instead")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--_worker", choices=["sequential", "concurrent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        _worker(args._worker, args.policies, args.steps, args.model_dir, args.threads, args.prompts_per_step,
                args.group_size)
        return
    model_dir = args.model_dir
    if model_dir is None:
        from lorafleet.platform.modeling.tiny_moe import build_tiny_moe, read_build_info

        model_dir = str(build_tiny_moe(Path(args.models_dir)))
        info = read_build_info(Path(model_dir))
        if info is None:
            sys.exit(f"{model_dir} is not a complete tiny-moe build")
        print(f"base: {model_dir} (tiny-moe builder v{info.builder_version}, {info.steps} pretraining steps, "
              f"vocab {info.vocab_size})")
    else:
        print(f"base: {model_dir}")
    print(f"cpus: {os.cpu_count()}, torch threads per mode: {args.threads}, load average before: {_load_average()}")
    results: dict[str, list[dict[str, float]]] = {"sequential": [], "concurrent": []}
    for _ in range(args.repeats):
        for mode in ("sequential", "concurrent"):
            out = subprocess.run([sys.executable, __file__, "--_worker", mode, "--policies", str(args.policies),
                                  "--steps", str(args.steps), "--model-dir", model_dir,
                                  "--threads", str(args.threads), "--prompts-per-step", str(args.prompts_per_step),
                                  "--group-size", str(args.group_size)],
                                 capture_output=True, text=True, check=True)
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    seq = min(r["wall_seconds"] for r in results["sequential"])
    con = min(r["wall_seconds"] for r in results["concurrent"])
    seq_mem = max(r["peak_rss_mib"] for r in results["sequential"])
    con_mem = max(r["peak_rss_mib"] for r in results["concurrent"])
    print(f"{args.policies} GRPO policies x {args.steps} steps on tiny-moe "
          f"({args.prompts_per_step} prompts x {args.group_size} samples per step, 4 new tokens); "
          f"best of {args.repeats}")
    print("  mode         wall (s)   peak RSS (MiB)   RSS after load (MiB)   final reward mean")
    for mode, wall, mem in (("sequential", seq, seq_mem), ("concurrent", con, con_mem)):
        last = results[mode][-1]
        print(f"  {mode:<11} {wall:9.2f} {mem:16.1f} {last['loaded_rss_mib']:22.1f} {last['final_reward_mean']:19.3f}")
    speedup, mem_ratio = seq / con, con_mem / seq_mem
    print(f"  speedup {speedup:.2f}x (target >= 1.8x: {'MET' if speedup >= 1.8 else 'NOT MET'}); "
          f"peak memory {100 * (mem_ratio - 1):+.1f}% (target <= +10%: {'MET' if mem_ratio <= 1.10 else 'NOT MET'})")
    print(f"  load average after: {_load_average()} (a shared machine: wall times vary with other load)")


if __name__ == "__main__":
    main()
