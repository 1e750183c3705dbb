"""Base-model execution shared by the trainer and the serving engine (imports torch).

- :class:`CausalLM` — the decoder-only model built from an ``ArchitectureSpec``;
  ``forward`` for training/scoring, ``step`` for continuous-batching decode over a :class:`KVCache`.
- LoRA: :class:`AdapterBank` + :class:`LoraBatch` (per-row adapter index, -1 = base);
  :class:`DeviceAdapterBank` (serving slots), :class:`AdapterParams` + :func:`stack_adapters`
  (several policies trained in one forward), :func:`new_adapter_params`, :func:`export_adapter`.
- :func:`load_base_model`, :func:`fingerprint` for local Hugging Face model directories.
"""

from lorafleet.platform.modeling.kv_cache import KVCache
from lorafleet.platform.modeling.loading import fingerprint, load_base_model, read_spec
from lorafleet.platform.modeling.lora import (
    AdapterBank,
    AdapterParams,
    DeviceAdapterBank,
    LoraBatch,
    export_adapter,
    new_adapter_params,
    stack_adapters,
)
from lorafleet.platform.modeling.model import CausalLM

__all__ = [
    "AdapterBank",
    "AdapterParams",
    "CausalLM",
    "DeviceAdapterBank",
    "KVCache",
    "LoraBatch",
    "export_adapter",
    "fingerprint",
    "load_base_model",
    "new_adapter_params",
    "read_spec",
    "stack_adapters",
]
