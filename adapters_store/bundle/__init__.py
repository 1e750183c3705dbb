"""The packed adapter bundle (FORMAT.md): manifest, pack/unpack, PEFT interchange, verification.

Manifest, errors and verification need no torch and are imported eagerly; writing, reading
and converting tensors live in modules that import torch, resolved on first use so that
importing this package (for example to verify or publish) does not pull torch in.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lorafleet.adapters_store.bundle.errors import BundleCorrupt, BundleInvalid, BundleRejected, RejectCode
from lorafleet.adapters_store.bundle.manifest import (
    FORMAT_VERSION,
    LAYOUT,
    MANIFEST_FILE,
    TENSOR_FILE,
    BundleManifest,
    FileEntry,
    TensorEntry,
)
from lorafleet.adapters_store.bundle.verify import ExpectedBase, read_manifest, verify_bundle

if TYPE_CHECKING:
    from lorafleet.adapters_store.bundle.pack import BundleMeta, load_tensors, write_bundle
    from lorafleet.adapters_store.bundle.peft import engine_to_peft, export_peft, import_peft, peft_to_engine
    from lorafleet.adapters_store.bundle.synthetic import random_adapter

_LAZY = {
    "BundleMeta": "pack",
    "load_tensors": "pack",
    "write_bundle": "pack",
    "engine_to_peft": "peft",
    "export_peft": "peft",
    "import_peft": "peft",
    "peft_to_engine": "peft",
    "random_adapter": "synthetic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_VERSION",
    "LAYOUT",
    "MANIFEST_FILE",
    "TENSOR_FILE",
    "BundleCorrupt",
    "BundleInvalid",
    "BundleManifest",
    "BundleMeta",
    "BundleRejected",
    "ExpectedBase",
    "FileEntry",
    "RejectCode",
    "TensorEntry",
    "engine_to_peft",
    "export_peft",
    "import_peft",
    "load_tensors",
    "peft_to_engine",
    "random_adapter",
    "read_manifest",
    "verify_bundle",
    "write_bundle",
]
