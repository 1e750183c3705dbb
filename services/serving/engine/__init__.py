"""Inference engines behind one protocol (see :mod:`.base`).

``TorchEngine`` is imported on first use: it pulls in torch, which the HTTP layer's schemas do not need.
"""

from typing import TYPE_CHECKING, Any

from lorafleet.services.serving.engine.base import (
    AdapterHandle,
    Engine,
    GenerationChunk,
    GenerationRequest,
    LoadReport,
    ResidentAdapter,
    SamplingOptions,
    Tier,
)

if TYPE_CHECKING:
    from lorafleet.services.serving.engine.torch_engine import TorchEngine


def __getattr__(name: str) -> Any:
    if name == "TorchEngine":
        from lorafleet.services.serving.engine.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterHandle",
    "Engine",
    "GenerationChunk",
    "GenerationRequest",
    "LoadReport",
    "ResidentAdapter",
    "SamplingOptions",
    "Tier",
    "TorchEngine",
]
