"""Adapter residency across tiers (device slots, host memory, local disk, object store).

:mod:`.policy` decides (pure bookkeeping: LRU, pins, in-flight protection, byte and slot
budgets); :mod:`.manager` moves the bytes (disk cache → mmap'd host tensors → device bank).
"""

from lorafleet.services.serving.tiers.manager import Acquired, AdapterTiers
from lorafleet.services.serving.tiers.policy import CachePolicy, Residency, TierHooks

__all__ = ["Acquired", "AdapterTiers", "CachePolicy", "Residency", "TierHooks"]
