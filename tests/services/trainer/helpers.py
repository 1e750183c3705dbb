"""Loading an exported revision back and sampling from it, for assertions about trained behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorafleet.adapters_store import RevisionRef, download_revision, verify_bundle
from lorafleet.adapters_store.bundle.pack import load_tensors
from lorafleet.adapters_store.objectstore import ObjectStore
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.modeling import AdapterParams, load_base_model, stack_adapters
from lorafleet.platform.modeling.sampling import SamplingParams, generate


def revision_tensors(store: ObjectStore, revision: Any, tmp: Path) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    ref = RevisionRef(revision_id=revision.id, uri=revision.uri, manifest_sha256=revision.sha256)
    dest = tmp / revision.id
    download_revision(store, ref, dest)
    manifest = verify_bundle(dest, base=None)
    lora = LoraConfig(rank=manifest.rank, alpha=manifest.alpha, targets=tuple(manifest.targets))
    return load_tensors(dest, manifest), lora


class Sampler:
    def __init__(self, model_dir: Path) -> None:
        self.model, self.spec, self.tok = load_base_model(model_dir)

    def replies(self, prompts: list[str], *, adapter: tuple[dict[str, torch.Tensor], LoraConfig] | None = None,
                temperature: float = 0.0, n: int = 1, seed: int = 0, max_new_tokens: int = 12) -> list[str]:
        ids = [self.tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            tokenize=False) for p in prompts]
        encoded = [self.tok(t, add_special_tokens=False)["input_ids"] for t in ids for _ in range(n)]
        bank = None
        if adapter is not None:
            with torch.no_grad():
                bank = stack_adapters([AdapterParams(adapter[1], adapter[0])])
        gens = generate(self.model, encoded, max_new_tokens=max_new_tokens, stop_ids=[self.tok.eos_token_id],
                        params=SamplingParams(temperature=temperature), bank=bank,
                        adapter_ids=[0 if bank is not None else -1] * len(encoded),
                        generator=torch.Generator().manual_seed(seed))
        return [self.tok.decode([t for t in g.tokens if t != self.tok.eos_token_id], skip_special_tokens=True).strip()
                for g in gens]
