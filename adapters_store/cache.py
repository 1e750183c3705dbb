"""A local, byte-bounded disk cache of verified bundles, keyed by revision id, shared by processes.

Layout under ``root``::

    index.json              what is resident (or being fetched), its bytes, when it was last used
    index.lock              guards index.json and every admission / eviction decision
    bundles/<revision>/     verified bundles (manifest.json + adapter.safetensors), never modified
    staging/<revision>.<pid>.<nonce>/   downloads in progress
    locks/<revision>.lock   one fetch of a revision at a time, across threads and processes
    pins/<revision>.pin     shared flock(2) held by every user of the bundle

Rules: a download reserves its bytes in the index *before* it starts, so downloads in flight
count against ``max_bytes`` and the bound holds at every instant. Bundles are verified (checksums,
header, shapes against the base) in staging and only then renamed into ``bundles/``: a failing
bundle never becomes visible. Eviction is least-recently-used among bundles nobody pins;
a pin is a shared ``flock`` that the kernel releases when its process dies, so a crashed
user never pins a bundle forever. ``max_bytes`` counts file bytes (not file-system blocks).
One cache directory serves the processes of one host; it is not meant for a network share.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.adapters_store.bundle.errors import BundleRejected, RejectCode, reject
from lorafleet.adapters_store.bundle.manifest import MANIFEST_FILE, BundleManifest
from lorafleet.adapters_store.bundle.verify import ExpectedBase, read_manifest, verify_bundle
from lorafleet.adapters_store.objectstore.base import ObjectStore
from lorafleet.adapters_store.revisions import RevisionRef, fetch_manifest
from lorafleet.platform.domain.errors import InvalidRequest, LorafleetError, Unavailable


class _Entry(BaseModel):
    # Observed state shared by processes of possibly different versions: tolerant of extra fields.
    model_config = ConfigDict(extra="ignore")

    state: Literal["ready", "fetching"]
    bytes: int = Field(ge=0)
    last_used: float
    """Wall-clock seconds (comparable across processes)."""
    owner_pid: int | None = None
    """The fetching process, so a reservation left by a crashed fetcher can be reclaimed."""


class _Index(BaseModel):
    model_config = ConfigDict(extra="ignore")

    entries: dict[str, _Entry] = {}


@dataclass(frozen=True)
class CachedBundle:
    """A verified bundle on local disk, pinned while the ``open`` block runs."""

    revision_id: str
    path: Path
    manifest: BundleManifest


@dataclass(frozen=True)
class CacheUsage:
    bytes: int
    """Bytes of resident bundles plus reservations of downloads in flight."""
    ready: int
    fetching: int


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _valid_revision_id(revision_id: str) -> str:
    if not revision_id or "/" in revision_id or revision_id.startswith(".") or len(revision_id) > 100:
        raise InvalidRequest(f"{revision_id!r} is not a revision id", code="invalid_revision_id")
    return revision_id


class BundleCache:
    def __init__(self, root: Path, *, max_bytes: int, store: ObjectStore, base: ExpectedBase) -> None:
        """``base``: the one base model whose bundles this cache admits (verified against it)."""
        if max_bytes <= 0:
            raise InvalidRequest("max_bytes must be positive", param="max_bytes")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.store = store
        self.base = base
        for sub in ("bundles", "staging", "locks", "pins"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._manifests: dict[str, BundleManifest] = {}
        self._index_lock = FileLock(self.root / "index.lock")
        self._known: tuple[tuple[int, int, int], bytes, _Index] | None = None
        """The index as this process last read or wrote it, by the file's (inode, mtime, size):
        reused while the file is unchanged, so a lookup costs a stat, not a parse."""
        with self._index() as index:
            self._reconcile(index)

    # -- public --------------------------------------------------------------------------

    @contextlib.contextmanager
    def open(self, ref: RevisionRef) -> Iterator[CachedBundle]:
        """Pin the revision, fetching and verifying it first when it is not resident.

        Raises a :class:`BundleRejected` for a bundle that fails verification (nothing is
        cached), ``Unavailable`` (code ``cache_full``) when pinned bundles leave no room.
        """
        rid = _valid_revision_id(ref.revision_id)
        with self._pinned(rid):
            yield self._ensure(ref)

    def contains(self, revision_id: str) -> bool:
        with self._index() as index:
            entry = index.entries.get(_valid_revision_id(revision_id))
            return entry is not None and entry.state == "ready"

    def usage(self) -> CacheUsage:
        with self._index() as index:
            entries = index.entries.values()
            return CacheUsage(
                bytes=sum(e.bytes for e in entries),
                ready=sum(e.state == "ready" for e in entries),
                fetching=sum(e.state == "fetching" for e in entries),
            )

    # -- admission -----------------------------------------------------------------------

    def _ensure(self, ref: RevisionRef) -> CachedBundle:
        rid = ref.revision_id
        if (hit := self._hit(rid)) is not None:
            return hit
        with FileLock(self.root / "locks" / f"{rid}.lock"):
            # Another thread or process may have fetched it while we waited: one download per revision.
            if (hit := self._hit(rid)) is not None:
                return hit
            manifest, manifest_bytes = fetch_manifest(self.store, ref)
            if manifest.base_fingerprint != self.base.fingerprint:  # refuse before downloading
                raise reject(
                    RejectCode.BASE_FINGERPRINT_MISMATCH, f"revision {rid} belongs to another base model"
                )
            need = manifest.total_bytes + len(manifest_bytes)
            with self._index() as index:
                self._make_room(index, need)
                index.entries[rid] = _Entry(
                    state="fetching", bytes=need, last_used=time.time(), owner_pid=os.getpid()
                )
            staging = self.root / "staging" / f"{rid}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                staging.mkdir()
                (staging / MANIFEST_FILE).write_bytes(manifest_bytes)
                for name in manifest.files:
                    self.store.download(ref.uri + name, staging / name, verify=True)
                verify_bundle(staging, base=self.base, manifest_sha256=ref.manifest_sha256)
                final = self.root / "bundles" / rid
                shutil.rmtree(final, ignore_errors=True)  # leftover of a crash between rename and index write
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                with self._index() as index:
                    index.entries.pop(rid, None)
                raise
            with self._index() as index:
                index.entries[rid] = _Entry(state="ready", bytes=need, last_used=time.time())
            self._manifests[rid] = manifest
            return CachedBundle(revision_id=rid, path=final, manifest=manifest)

    def _hit(self, rid: str) -> CachedBundle | None:
        with self._index() as index:
            entry = index.entries.get(rid)
            if entry is None or entry.state != "ready":
                return None
            index.entries[rid] = entry.model_copy(update={"last_used": time.time()})
        path = self.root / "bundles" / rid
        manifest = self._manifests.get(rid)
        if manifest is None:
            manifest = read_manifest(path)
            self._manifests[rid] = manifest
        if manifest.base_fingerprint != self.base.fingerprint:
            raise reject(
                RejectCode.BASE_FINGERPRINT_MISMATCH, f"cached revision {rid} belongs to another base model"
            )
        return CachedBundle(revision_id=rid, path=path, manifest=manifest)

    def _make_room(self, index: _Index, need: int) -> None:
        """Evict unpinned bundles, least recently used first, until ``need`` more bytes fit."""
        if need > self.max_bytes:
            raise LorafleetError(
                f"a bundle of {need} bytes can never fit a cache of {self.max_bytes} bytes",
                code="bundle_exceeds_cache",
            )
        self._drop_dead_reservations(index)
        used = sum(e.bytes for e in index.entries.values())
        ready = sorted((e.last_used, rid) for rid, e in index.entries.items() if e.state == "ready")
        for _, rid in ready:
            if used + need <= self.max_bytes:
                break
            if self._evict_if_unpinned(rid):
                used -= index.entries.pop(rid).bytes
        if used + need > self.max_bytes:
            raise Unavailable(
                f"adapter cache is full: {used} of {self.max_bytes} bytes pinned or in flight, {need} needed",
                code="cache_full",
                retry_after=1.0,
            )

    def _evict_if_unpinned(self, rid: str) -> bool:
        pin_path = self.root / "pins" / f"{rid}.pin"
        fd = os.open(pin_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return False
                raise
            shutil.rmtree(self.root / "bundles" / rid, ignore_errors=True)
            self._manifests.pop(rid, None)
            # Unlinking under the exclusive lock: a pinner that opened this inode re-checks and retries.
            pin_path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _pinned(self, rid: str) -> Iterator[None]:
        pin_path = self.root / "pins" / f"{rid}.pin"
        while True:
            fd = os.open(pin_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                current = os.stat(pin_path).st_ino
            except FileNotFoundError:
                current = -1
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # an evictor unlinked the file we locked; lock the new one
        try:
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the shared lock

    def _drop_dead_reservations(self, index: _Index) -> None:
        """Reservations of fetchers that died: their staging bytes go first, then the entry."""
        for rid, entry in list(index.entries.items()):
            if entry.state == "fetching" and entry.owner_pid is not None and not _pid_alive(entry.owner_pid):
                for leftover in (self.root / "staging").glob(f"{rid}.{entry.owner_pid}.*"):
                    shutil.rmtree(leftover, ignore_errors=True)
                del index.entries[rid]

    # -- index ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _index(self) -> Iterator[_Index]:
        """The index under its lock; written back (atomically) when the block changed it."""
        with self._index_lock:
            path = self.root / "index.json"
            known, self._known = self._known, None  # dropped unless the block ends well
            signature = _signature(path)
            if known is not None and signature is not None and known[0] == signature:
                raw, index = known[1], known[2]
            else:
                try:
                    raw = path.read_bytes()
                    index = _Index.model_validate_json(raw)
                except FileNotFoundError:
                    raw, index = b"", _Index()
                except ValidationError:
                    raw, index = b"", self._rebuilt_index()  # never trust a damaged index; rebuild from disk
            yield index
            new = index.model_dump_json().encode()
            if new != raw:
                tmp = path.with_name(f"index.json.{os.getpid()}.{uuid.uuid4().hex[:8]}")
                tmp.write_bytes(new)
                os.replace(tmp, path)
                signature = _signature(path)
            if signature is not None:
                self._known = (signature, new, index)

    def _rebuilt_index(self) -> _Index:
        index = _Index()
        for path in (self.root / "bundles").iterdir():
            try:
                manifest = read_manifest(path)
            except BundleRejected:
                continue
            size = manifest.total_bytes + (path / MANIFEST_FILE).stat().st_size
            index.entries[path.name] = _Entry(state="ready", bytes=size, last_used=path.stat().st_mtime)
        return index

    def _reconcile(self, index: _Index) -> None:
        """Make the index and the disk agree after crashes (runs under the index lock)."""
        self._drop_dead_reservations(index)
        bundles = {p.name for p in (self.root / "bundles").iterdir()}
        for rid, entry in list(index.entries.items()):
            if entry.state == "ready" and rid not in bundles:
                del index.entries[rid]
        for rid in bundles - set(index.entries):
            # Only verified bundles are ever renamed into bundles/: one without an index entry
            # is a crash between rename and index write. Adopt it when it still fits, else drop it.
            path = self.root / "bundles" / rid
            try:
                manifest = read_manifest(path)
                size = manifest.total_bytes + (path / MANIFEST_FILE).stat().st_size
            except BundleRejected:
                size = self.max_bytes + 1
            if sum(e.bytes for e in index.entries.values()) + size <= self.max_bytes:
                index.entries[rid] = _Entry(state="ready", bytes=size, last_used=path.stat().st_mtime)
            else:
                shutil.rmtree(path, ignore_errors=True)
        for path in (self.root / "staging").iterdir():
            pid = path.name.split(".")[1] if path.name.count(".") >= 2 else ""
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
