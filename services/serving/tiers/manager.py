"""The adapter tier mechanism: moves revisions remote → disk → host → device as the policy allows.

- remote → disk: :class:`BundleCache` (download, verification against the base, byte budget);
- disk → host: :func:`load_tensors` (one populated private mmap, zero-copy views) kept in a dict;
- host → device: :meth:`DeviceAdapterBank.load` into the slot :class:`CachePolicy` assigned, run
  by the engine between two steps (``installer``), so a step never reads a slot being written.

Every caller that needs a revision holds a *use* on it (:meth:`AdapterTiers.acquire` /
:meth:`release`) from before its load starts until its last step ran; the policy never evicts a
revision in use. Concurrent requests for one missing revision share one load (one future per
stage). When every device slot (or the whole host budget) is held by revisions in use, a new
revision waits, up to ``wait_seconds``, for a use to end, and is then refused with
``Unavailable`` (``adapter_slots_busy`` / ``adapter_host_busy``): nothing in use is ever evicted.

Thread model: state is guarded by one lock; blocking I/O runs on a small worker pool; the async
methods work from any event loop (they await ``concurrent.futures`` futures), so one engine can
serve an HTTP server's loop and a test's loop alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafleet.adapters_store import BundleCache
from lorafleet.adapters_store.bundle import load_tensors
from lorafleet.platform import metrics
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.platform.modeling import DeviceAdapterBank
from lorafleet.services.serving.engine.base import AdapterHandle, LoadReport, ResidentAdapter, Tier
from lorafleet.services.serving.tiers.policy import CachePolicy

Installer = Callable[[Callable[[], None]], "concurrent.futures.Future[None]"]
"""Runs a function on the engine's step thread between two steps; the future completes after it."""


@dataclass
class _HostAdapter:
    tensors: dict[str, torch.Tensor]
    """Engine-form views of the bundle's mmap (zero-copy; dtype as stored)."""
    scaling: float
    nbytes: int


@dataclass(frozen=True)
class Acquired:
    """A revision made usable by the next step, and held in use until :meth:`AdapterTiers.release`."""

    slot: int
    waited_seconds: float
    """Time this caller waited for the revision to reach its device slot (0 when it was there)."""
    stages: dict[str, float] = field(default_factory=dict)
    """Stages this caller ran itself (fetch, read, install); empty when it shared another's load."""


class AdapterTiers:
    def __init__(
        self,
        *,
        bank: DeviceAdapterBank,
        bundle_cache: BundleCache,
        max_device_adapters: int,
        max_host_adapter_bytes: int,
        installer: Installer,
        wait_seconds: float = 30.0,
        load_workers: int = 2,
        replica_id: str = "local",
    ) -> None:
        if max_device_adapters > bank.capacity:
            raise InvalidRequest(
                f"max_device_adapters {max_device_adapters} exceeds the bank's {bank.capacity} slots",
                param="max_device_adapters",
            )
        self.bank = bank
        self.bundle_cache = bundle_cache
        self.wait_seconds = wait_seconds
        self.replica_id = replica_id
        self._installer = installer
        self._lock = threading.Lock()
        self._policy = CachePolicy(
            max_device_slots=max_device_adapters, max_host_bytes=max_host_adapter_bytes, hooks=self
        )
        self._host: dict[str, _HostAdapter] = {}
        self._device_ready: set[str] = set()
        self._host_loads: dict[str, concurrent.futures.Future[dict[str, float]]] = {}
        self._installs: dict[str, concurrent.futures.Future[None]] = {}
        self._waiters: list[concurrent.futures.Future[None]] = []
        self._on_disk: dict[str, int] = {}
        """Revisions this replica brought to the disk cache, with their bytes (for :meth:`resident`)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="adapter-load")

    # -- requests -----------------------------------------------------------------------------

    async def acquire(self, adapter: AdapterHandle) -> Acquired:
        """Bring the revision to a device slot and hold one use on it; the caller must
        :meth:`release` it once its request left the batch (also when this raises, it holds nothing)."""
        rid = adapter.revision_id
        start = time.perf_counter()
        with self._lock:
            self._policy.begin_use(rid)
            if rid in self._device_ready:  # the common case: no wait at all
                slot = self._policy.assign_device(rid)  # refreshes recency; a resident revision keeps its slot
                if slot is not None:
                    return Acquired(slot=slot, waited_seconds=0.0)
        try:
            stages = await self._ensure_host(adapter, deadline=start + self.wait_seconds)
            slot, install = await self._ensure_device(rid, deadline=start + self.wait_seconds)
        except BaseException:
            self.release(rid)
            raise
        if install is not None:
            stages["install"] = install
        return Acquired(slot=slot, waited_seconds=time.perf_counter() - start, stages=stages)

    def release(self, revision_id: str) -> None:
        """End one use (thread-safe; the engine calls it when a request's row left the batch)."""
        with self._lock:
            self._policy.end_use(revision_id)
            if not self._policy.protected(revision_id):
                self._wake_waiters()

    # -- operator / agent ---------------------------------------------------------------------

    async def load(self, adapter: AdapterHandle, *, tier: Tier, pin: bool) -> LoadReport:
        rid = adapter.revision_id
        if tier == Tier.REMOTE:
            raise InvalidRequest("an adapter cannot be loaded into the remote tier", param="tier")
        start = time.perf_counter()
        deadline = start + self.wait_seconds
        seconds: dict[str, float] = {}
        with self._lock:
            self._policy.begin_use(rid)
        try:
            if tier == Tier.DISK:
                seconds = await asyncio.to_thread(self._fetch_only, adapter)
            else:
                seconds = await self._ensure_host(adapter, deadline=deadline)
                if tier == Tier.DEVICE:
                    _, install = await self._ensure_device(rid, deadline=deadline)
                    if install is not None:
                        seconds["install"] = install
            if pin:
                with self._lock:
                    self._policy.pin(rid)
        finally:
            self.release(rid)
        return LoadReport(revision_id=rid, tier=tier, seconds=seconds, already_resident=not seconds)

    def holds(self, revision_id: str, tier: Tier) -> bool:
        """Whether the revision is resident in ``tier`` or a faster one now (a load of it there
        would do nothing). A snapshot: eviction may change it the next moment."""
        with self._lock:
            if revision_id in self._device_ready:
                return True
            if tier == Tier.DEVICE:
                return False
            if revision_id in self._host:
                return True
        return tier == Tier.DISK and self.bundle_cache.contains(revision_id)

    def unpin(self, revision_id: str) -> None:
        with self._lock:
            self._policy.unpin(revision_id)
            self._wake_waiters()

    def evict(self, revision_id: str) -> None:
        """Drop the revision from host and device (Conflict while requests use it)."""
        with self._lock:
            self._policy.evict(revision_id)
            self._wake_waiters()
            self._update_gauges()

    def resident(self) -> list[ResidentAdapter]:
        with self._lock:
            rows = [
                ResidentAdapter(
                    revision_id=e.revision_id,
                    tier=Tier.DEVICE if e.revision_id in self._device_ready else Tier.HOST,
                    bytes=e.nbytes,
                    pinned=e.pinned,
                    in_flight=e.in_flight,
                )
                for e in self._policy.entries()
                if e.revision_id in self._host
            ]
            disk_only = {rid: n for rid, n in self._on_disk.items() if rid not in self._host}
        for rid, nbytes in disk_only.items():
            if self.bundle_cache.contains(rid):
                rows.append(ResidentAdapter(revision_id=rid, tier=Tier.DISK, bytes=nbytes, pinned=False, in_flight=0))
            else:
                with self._lock:
                    self._on_disk.pop(rid, None)
        self._update_disk_gauges()
        return rows

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- TierHooks (called by the policy with the lock held) ----------------------------------

    def on_evict_device(self, revision_id: str, slot: int) -> None:
        # Nothing to clear: a slot is overwritten whole by the next install, and no row uses it.
        self._device_ready.discard(revision_id)

    def on_evict_host(self, revision_id: str) -> None:
        self._host.pop(revision_id, None)

    # -- host tier ----------------------------------------------------------------------------

    async def _ensure_host(self, adapter: AdapterHandle, *, deadline: float) -> dict[str, float]:
        rid = adapter.revision_id
        with self._lock:
            if rid in self._host:
                self._policy.admit_host(rid, self._host[rid].nbytes)  # a hit: refreshes recency
                return {}
            load = self._host_loads.get(rid)
            leader = load is None
            if load is None:
                load = self._pool.submit(self._load_host, adapter, deadline)
                self._host_loads[rid] = load
        # shield: one waiter's cancellation must not cancel the load the others share.
        seconds = await asyncio.shield(asyncio.wrap_future(load))
        return dict(seconds) if leader else {}

    def _fetch_only(self, adapter: AdapterHandle) -> dict[str, float]:
        source = self._disk_or_remote(adapter.revision_id)
        start = time.perf_counter()
        with self.bundle_cache.open(adapter.ref) as bundle:
            nbytes = bundle.manifest.total_bytes
        fetch = time.perf_counter() - start
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="fetch", tier=source).observe(fetch)
        with self._lock:
            self._on_disk[adapter.revision_id] = nbytes
        self._update_disk_gauges()
        return {"fetch": fetch} if source == Tier.REMOTE else {}

    def _load_host(self, adapter: AdapterHandle, deadline: float) -> dict[str, float]:
        """Worker thread: disk cache (fetching when needed) → host tensors. Returns stage seconds."""
        rid = adapter.revision_id
        try:
            source = self._disk_or_remote(rid)
            start = time.perf_counter()
            with self.bundle_cache.open(adapter.ref) as bundle:
                fetched = time.perf_counter()
                manifest = bundle.manifest
                if manifest.rank > self.bank.max_rank:
                    raise InvalidRequest(
                        f"revision {rid} has rank {manifest.rank}; this engine serves ranks up to {self.bank.max_rank}",
                        code="adapter_rank_too_large",
                    )
                self._reserve_host(rid, manifest.total_bytes, deadline)
                try:
                    tensors = load_tensors(bundle.path, manifest)
                except BaseException:
                    with self._lock:
                        self._policy.forget(rid)
                        self._wake_waiters()
                    raise
            read = time.perf_counter()
            with self._lock:
                self._host[rid] = _HostAdapter(tensors=tensors, scaling=manifest.scaling, nbytes=manifest.total_bytes)
                self._on_disk[rid] = manifest.total_bytes
                self._update_gauges()
        finally:
            with self._lock:
                self._host_loads.pop(rid, None)
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="fetch", tier=source).observe(fetched - start)
        metrics.ADAPTER_LOAD_SECONDS.labels(stage="read", tier=Tier.DISK).observe(read - fetched)
        self._update_disk_gauges()
        return {"fetch": fetched - start, "read": read - fetched}

    def _reserve_host(self, rid: str, nbytes: int, deadline: float) -> None:
        while True:
            with self._lock:
                if self._policy.admit_host(rid, nbytes):
                    self._update_gauges()
                    return
                waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
                self._waiters.append(waiter)
            try:
                waiter.result(timeout=max(0.0, deadline - time.perf_counter()))
            except concurrent.futures.TimeoutError:
                raise Unavailable(
                    f"host memory for adapters ({self._policy.max_host_bytes} bytes) is held by adapters "
                    f"in use; revision {rid} ({nbytes} bytes) cannot load now",
                    code="adapter_host_busy",
                    retry_after=1.0,
                ) from None

    # -- device tier --------------------------------------------------------------------------

    async def _ensure_device(self, rid: str, *, deadline: float) -> tuple[int, float | None]:
        """(slot, install seconds when this caller installed it)."""
        while True:
            with self._lock:
                if rid not in self._host:
                    raise InvalidRequest(f"revision {rid} is not in host memory", code="adapter_not_in_host")
                slot = self._policy.assign_device(rid)
                if slot is not None and rid in self._device_ready:
                    return slot, None
                if slot is not None:
                    running = self._installs.get(rid)
                    leader = running is None
                    install = self._start_install(rid, slot) if running is None else running
                else:
                    waiter: concurrent.futures.Future[None] = concurrent.futures.Future()
                    self._waiters.append(waiter)
            if slot is not None:
                start = time.perf_counter()
                await asyncio.shield(asyncio.wrap_future(install))
                return slot, (time.perf_counter() - start if leader else None)
            try:
                timeout = max(0.0, deadline - time.perf_counter())
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(waiter)), timeout=timeout)
            except TimeoutError:
                raise Unavailable(
                    f"all {self._policy.max_device_slots} device adapter slots are held by adapters in use; "
                    f"revision {rid} cannot load now",
                    code="adapter_slots_busy",
                    retry_after=1.0,
                ) from None

    def _start_install(self, rid: str, slot: int) -> concurrent.futures.Future[None]:
        host = self._host[rid]

        def install() -> None:
            start = time.perf_counter()
            try:
                self.bank.load(slot, host.tensors, scaling=host.scaling)
            except BaseException:
                with self._lock:
                    self._installs.pop(rid, None)
                    self._policy.forget(rid)
                    self._host.pop(rid, None)
                    self._wake_waiters()
                    self._update_gauges()
                raise
            with self._lock:
                self._installs.pop(rid, None)
                if self._policy.slot_of(rid) == slot:
                    self._device_ready.add(rid)
                self._update_gauges()
            metrics.ADAPTER_LOAD_SECONDS.labels(stage="install", tier=Tier.HOST).observe(time.perf_counter() - start)

        future = self._installer(install)
        self._installs[rid] = future
        return future

    # -- helpers ------------------------------------------------------------------------------

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _disk_or_remote(self, rid: str) -> Tier:
        return Tier.DISK if self.bundle_cache.contains(rid) else Tier.REMOTE

    def _update_gauges(self) -> None:
        device = len(self._device_ready)
        metrics.RESIDENT_ADAPTERS.labels(replica=self.replica_id, tier=Tier.DEVICE).set(device)
        metrics.RESIDENT_BYTES.labels(replica=self.replica_id, tier=Tier.DEVICE).set(
            device * self.bank.nbytes_per_slot()
        )
        metrics.RESIDENT_ADAPTERS.labels(replica=self.replica_id, tier=Tier.HOST).set(len(self._host))
        metrics.RESIDENT_BYTES.labels(replica=self.replica_id, tier=Tier.HOST).set(
            sum(h.nbytes for h in self._host.values())
        )

    def _update_disk_gauges(self) -> None:
        usage = self.bundle_cache.usage()
        metrics.RESIDENT_ADAPTERS.labels(replica=self.replica_id, tier=Tier.DISK).set(usage.ready)
        metrics.RESIDENT_BYTES.labels(replica=self.replica_id, tier=Tier.DISK).set(usage.bytes)
