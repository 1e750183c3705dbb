"""Adapter load benchmark: per-expert PEFT layout vs the packed bundle vs a raw read of the bytes.

For each shape, builds one synthetic rank-1 bf16 LoRA over attention (q, k, v, o) and every
expert's gate, up and down projection, writes it with lorafleet's own code as a packed bundle
and as a PEFT directory (per-expert keys), and times, cold and warm:

  per-expert   adapter_model.safetensors (one tensor per expert) → engine form: safetensors
               ``load_file`` and ``torch.stack`` of each layer's experts into [E, r, in] / [E, out, r]
  packed       adapter.safetensors → engine form: ``load_tensors`` (one populated private mmap,
               one zero-copy view per tensor)
  raw read     one ``readinto`` of the packed file's bytes into a preallocated buffer: the
               floor for getting those bytes into memory on this machine by reading them
  mmap fault-in  the packed file mapped and faulted in (``MADV_POPULATE_READ``), no tensors: the
               floor of the zero-copy mechanism ``load_tensors`` uses (so its own overhead shows)

"Engine form" means every byte resident in this process, in the dict the engine installs;
all three end with the bytes in memory, none defers reading to first use. Checksums are not
in the timed path: the cache verifies a bundle once, when it is admitted (see FORMAT.md).

Cold: the page cache of the files is dropped before each repetition. Usage:
    python loadtests/bench_bundle_load.py [--shapes qwen3,kimi] [--reps 5] [--cold-method fadvise]
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import load_file

from lorafleet.adapters_store.bundle import (
    TENSOR_FILE,
    BundleMeta,
    export_peft,
    load_tensors,
    peft_to_engine,
    random_adapter,
    verify_bundle,
    write_bundle,
)
from lorafleet.adapters_store.bundle.peft import PEFT_WEIGHTS_FILE
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 48,
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "vocab_size": 151936,
}
# Kimi-K2 uses MLA attention; here its q/o projections are modelled as 64 heads x 128 and k/v as
# 8 KV heads x 128 (a simplification: the expert tensors, which dominate, have the exact shapes).
# Every one of the 61 layers is modelled as MoE (the real model's first layer is dense) and the
# shared expert is left out, as in the shape.
KIMI_K2_LIKE = {
    "model_type": "qwen3_moe",
    "num_hidden_layers": 61,
    "hidden_size": 7168,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts": 384,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2048,
    "intermediate_size": 18432,
    "vocab_size": 163840,
}
SHAPES = {"qwen3": ("Qwen3-30B-A3B", QWEN3_30B_A3B), "kimi": ("Kimi-K2-like", KIMI_K2_LIKE)}
LORA = LoraConfig(rank=1, alpha=32.0)
FINGERPRINT = "0" * 64


@dataclass
class Timings:
    cold: list[float]
    warm: list[float]


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_caches_permitted() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


class ColdCache:
    """Evicts files from the page cache before a cold repetition."""

    def __init__(self, method: str, files: list[Path]) -> None:
        self.method, self.files = method, files

    def __call__(self) -> None:
        for path in self.files:  # dirty pages cannot be dropped; the files are written already
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                if self.method == "fadvise":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if self.method == "drop_caches":
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")

    def resident(self) -> str:
        """Resident pages of the files right after a drop, from util-linux fincore (when installed)."""
        if shutil.which("fincore") is None:
            return "fincore not installed"
        self()
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES,FILE", *map(str, self.files)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return "; ".join(
            f"{Path(p).name}: {r} bytes resident" for r, p in (ln.split() for ln in out.splitlines())
        )


def raw_read(path: Path) -> torch.Tensor:
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8)  # [file_bytes]
    with path.open("rb", buffering=0) as f:
        view = buf.numpy().data  # writable memoryview of the buffer
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise OSError(f"{path} ended after {got} of {size} bytes")
            got += n
    return buf


def mmap_fault_in(path: Path) -> mmap.mmap:
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapped.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
    return mapped


def measure(cases: dict[str, Callable[[], Any]], *, cold: ColdCache, reps: int) -> dict[str, Timings]:
    """Cold and warm repetitions, interleaving cases within a repetition so drift hits all alike."""
    out = {name: Timings(cold=[], warm=[]) for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            cold()
            t0 = time.perf_counter()
            result = fn()
            out[name].cold.append(time.perf_counter() - t0)
            del result
    for fn in cases.values():
        fn()  # warm-up: pages in cache, allocator primed
    for _ in range(reps):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            result = fn()
            out[name].warm.append(time.perf_counter() - t0)
            del result
    return out


def bench_shape(key: str, *, reps: int, cold_method: str, tmp_root: Path) -> bool:
    title, hf = SHAPES[key]
    spec = ArchitectureSpec.from_hf_config(hf)
    shapes = spec.lora_shapes(LORA)
    packed_bytes = sum(math.prod(s) for s in shapes.values()) * 2  # bf16
    per_expert_tensors = sum(s[0] if len(s) == 3 else 1 for s in shapes.values())
    print(
        f"\n== {title}: {spec.num_layers} layers, {spec.num_experts} experts, hidden {spec.hidden_size}, "
        f"expert FFN {spec.moe_intermediate_size}, q {spec.num_heads}x{spec.head_dim}, "
        f"kv {spec.num_kv_heads}x{spec.head_dim}; rank {LORA.rank}, bf16"
    )
    if key == "kimi":
        print(
            "   (attention modelled as 64 q heads / 8 kv heads x 128, a simplification of MLA; "
            "all 61 layers MoE, no shared expert)"
        )
    # Peak: generated tensors + one loaded copy per layout in flight; disk: both layouts.
    need_ram, need_disk = 4 * packed_bytes, 2 * packed_bytes + (1 << 30)
    free_disk, avail_ram = shutil.disk_usage(tmp_root).free, mem_available()
    print(
        f"   planned tensor bytes {packed_bytes:,}; needs ~{need_ram / 2**30:.1f} GiB RAM "
        f"(available {avail_ram / 2**30:.1f}), ~{need_disk / 2**30:.1f} GiB disk "
        f"(free {free_disk / 2**30:.1f})"
    )
    if need_ram > avail_ram or need_disk > free_disk:
        print("   SKIPPED: not enough memory or disk for this shape on this machine")
        return True
    work = Path(tempfile.mkdtemp(prefix=f"lf-bench-{key}-", dir=tmp_root))
    try:
        t0 = time.perf_counter()
        tensors = random_adapter(spec, LORA, dtype=torch.bfloat16, seed=1)
        meta = BundleMeta(tenant_id="bench", policy_id=key, base_model_id=key, base_fingerprint=FINGERPRINT)
        manifest = write_bundle(work / "packed", tensors, meta=meta, lora=LORA)
        del tensors
        export_peft(work / "packed", work / "peft")
        print(f"   built both layouts in {time.perf_counter() - t0:.1f} s under {work}")
        packed_file, peft_file = work / "packed" / TENSOR_FILE, work / "peft" / PEFT_WEIGHTS_FILE
        verify_bundle(work / "packed", base=None)

        def per_expert() -> dict[str, torch.Tensor]:
            return peft_to_engine(load_file(peft_file))

        def packed() -> dict[str, torch.Tensor]:
            return load_tensors(work / "packed", manifest)

        def raw() -> torch.Tensor:
            return raw_read(packed_file)

        def fault_in() -> mmap.mmap:
            return mmap_fault_in(packed_file)

        a, b = per_expert(), packed()
        same = a.keys() == b.keys() and all(
            torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a
        )
        del a, b
        print(f"   per-expert and packed loads give bit-identical engine tensors: {'yes' if same else 'NO'}")
        print(f"   {'layout':<12}{'tensors':>10}{'bytes':>16}")
        print(f"   {'per-expert':<12}{per_expert_tensors:>10,}{peft_file.stat().st_size:>16,}")
        print(f"   {'packed':<12}{len(manifest.tensors):>10,}{packed_file.stat().st_size:>16,}")
        print(
            f"   tensor-count ratio {per_expert_tensors / len(manifest.tensors):.1f}x, byte ratio "
            f"{peft_file.stat().st_size / packed_file.stat().st_size:.3f}x"
        )

        cold = ColdCache(cold_method, [packed_file, peft_file])
        load_before = os.getloadavg()[0]
        print(f"   cold cache by {cold_method}; right after a drop: {cold.resident()}")
        cases = {"per-expert": per_expert, "packed": packed, "raw read": raw, "mmap": fault_in}
        t = measure(cases, cold=cold, reps=reps)
        print(
            f"   {'path → engine form':<24}{'cold p50':>10}{'cold p95':>10}{'warm p50':>10}{'warm p95':>10}"
            f"  (ms, {reps} reps)"
        )
        for name, label in (
            ("per-expert", "per-expert PEFT"),
            ("packed", "packed bundle"),
            ("raw read", "raw read (floor)"),
            ("mmap", "mmap fault-in (floor)"),
        ):
            row = t[name]
            cells = [
                statistics.median(row.cold),
                percentile(row.cold, 0.95),
                statistics.median(row.warm),
                percentile(row.warm, 0.95),
            ]
            print(f"   {label:<24}" + "".join(f"{c * 1000:>10.1f}" for c in cells))
        med = {n: (statistics.median(v.cold), statistics.median(v.warm)) for n, v in t.items()}
        speed_cold = med["per-expert"][0] / med["packed"][0]
        speed_warm = med["per-expert"][1] / med["packed"][1]
        vs_raw_cold = med["packed"][0] / med["raw read"][0]
        vs_raw_warm = med["packed"][1] / med["raw read"][1]
        print(f"   packed speed-up over per-expert (p50): cold {speed_cold:.1f}x, warm {speed_warm:.1f}x")
        print(f"   packed time / raw read time (p50):     cold {vs_raw_cold:.2f}x, warm {vs_raw_warm:.2f}x")
        vs_map = (med["packed"][0] / med["mmap"][0], med["packed"][1] / med["mmap"][1])
        print(f"   packed time / mmap fault-in (p50):     cold {vs_map[0]:.2f}x, warm {vs_map[1]:.2f}x")
        print(f"   load average (1 min) before / after timing: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
        ok = same
        if key == "qwen3":
            hit = min(speed_cold, speed_warm) >= 10
            print(f"   target packed >= 10x faster than per-expert: {'MET' if hit else 'MISSED'}")
            ok &= hit
        within = max(vs_raw_cold, vs_raw_warm) <= 1.5
        print(f"   target packed within 1.5x of raw read:      {'MET' if within else 'MISSED'}")
        return ok and within
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="qwen3,kimi", help="comma-separated: qwen3, kimi")
    parser.add_argument(
        "--reps", type=int, default=5, help="cold and warm repetitions each (>= 5 for the issue)"
    )
    parser.add_argument(
        "--cold-method",
        choices=["fadvise", "drop_caches"],
        default="fadvise",
        help="fadvise: POSIX_FADV_DONTNEED on the two files (default, touches nothing else); "
        "drop_caches: echo 1 > /proc/sys/vm/drop_caches (root only, whole machine)",
    )
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where temp files go")
    args = parser.parse_args()
    keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in SHAPES]:
        parser.error(f"unknown shapes {unknown}; known: {list(SHAPES)}")
    can_drop = drop_caches_permitted()
    if args.cold_method == "drop_caches" and not can_drop:
        parser.error("/proc/sys/vm/drop_caches is not writable here; use --cold-method fadvise")
    print(
        f"bench_bundle_load: python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, {os.cpu_count()} CPUs, "
        f"{mem_available() / 2**30:.1f} GiB RAM available, kernel {platform.release()}"
    )
    print(
        f"cold-cache method: {args.cold_method} (drop_caches writable here: {'yes' if can_drop else 'no'}); "
        "on a VM the host may still cache the disk, so 'cold' is cold for this kernel's page cache"
    )
    ok = all([bench_shape(k, reps=args.reps, cold_method=args.cold_method, tmp_root=args.tmp) for k in keys])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
