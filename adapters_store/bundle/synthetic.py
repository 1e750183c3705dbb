"""Random engine-form adapters of an exact architecture, for tests and the load benchmark."""

from __future__ import annotations

import torch

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig


def random_adapter(
    spec: ArchitectureSpec, lora: LoraConfig, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Every tensor ``spec.lora_shapes(lora)`` names, filled from a seeded normal distribution.

    B is random too (a freshly initialised adapter has B = 0, which would hide layout bugs
    in tests: a transposed or misplaced zero factor still gives identical outputs).
    """
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=dtype).mul_(0.02)
        for name, shape in spec.lora_shapes(lora).items()
    }
