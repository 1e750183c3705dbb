"""The local bundle cache: byte bound, LRU, pins, one download per revision, verification before
admission — with threads, with two processes, and fetching from a real S3 server."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters_store.bundle import TENSOR_FILE, BundleRejected, load_tensors
from lorafleet.adapters_store.cache import BundleCache
from lorafleet.adapters_store.objectstore import LocalObjectStore, ObjectInfo
from lorafleet.adapters_store.revisions import PublishedRevision, RevisionRef, publish_revision
from lorafleet.platform.domain.errors import LorafleetError, Unavailable
from tests.adapters_store._bundle_support import OTHER_FINGERPRINT, base_of, bits, make_bundle

# Big enough (~1.2 MB per bundle) that a download takes real time and races overlap.
MID_MOE_HF: dict[str, Any] = {
    "model_type": "qwen3_moe", "num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_experts": 32, "num_experts_per_tok": 2, "vocab_size": 128,
}  # fmt: skip
BASE = base_of(MID_MOE_HF, max_rank=16)


class CountingStore(LocalObjectStore):
    """The real local store, appending one line per download to a log (readable across processes)."""

    def __init__(self, root: Path, log: Path) -> None:
        super().__init__(root)
        self.log = log

    def download(self, key: str, path: Path, *, verify: bool = True) -> ObjectInfo:
        with self.log.open("a") as f:
            f.write(key + "\n")
        return super().download(key, path, verify=verify)


def downloads(log: Path) -> Counter[str]:
    if not log.exists():
        return Counter()
    return Counter(line.split("/")[3] for line in log.read_text().splitlines() if line.endswith(TENSOR_FILE))


def disk_bytes(root: Path) -> int:
    total = 0
    for sub in ("bundles", "staging"):
        for dirpath, _, files in os.walk(root / sub):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass  # removed while we walked
    return total


class DiskMonitor:
    """Samples the cache's bytes on disk (bundles + staging) in the background; keeps the peak."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_bytes(self.root))
            time.sleep(0.001)

    def __enter__(self) -> DiskMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "objects", tmp_path / "downloads.log")


def publish(store: LocalObjectStore, tmp_path: Path, n: int, **meta: Any) -> list[PublishedRevision]:
    out = []
    for i in range(n):
        d = tmp_path / f"src{len(list(tmp_path.glob('src*')))}"
        make_bundle(d, MID_MOE_HF, rank=4, seed=i, **meta)
        out.append(publish_revision(store, d))
    return out


def cache_of(tmp_path: Path, store: LocalObjectStore, *, bundles: float, size: int) -> BundleCache:
    return BundleCache(tmp_path / "cache", max_bytes=int(bundles * size), store=store, base=BASE)


def size_of(rev: PublishedRevision) -> int:
    """What the cache accounts for one revision: its manifest plus its files (not the upload marker)."""
    return (
        len(json.dumps(rev.manifest, sort_keys=True, indent=1))
        + 1
        + sum(f["bytes"] for f in rev.manifest["files"].values())
    )


def test_miss_downloads_verifies_and_hit_does_not(tmp_path: Path, store: CountingStore) -> None:
    (rev,) = publish(store, tmp_path, 1)
    cache = cache_of(tmp_path, store, bundles=3, size=size_of(rev))
    with cache.open(rev.ref) as bundle:
        tensors = load_tensors(bundle.path, bundle.manifest)
        assert bundle.manifest.revision_id == rev.revision_id
    with cache.open(rev.ref) as again:
        assert again.path == bundle.path
    assert downloads(store.log) == {rev.revision_id: 1}
    assert cache.usage().bytes == size_of(rev) and cache.contains(rev.revision_id)
    src = load_tensors(tmp_path / "src0", bundle.manifest)
    assert all(bits(tensors[k]) == bits(src[k]) for k in src)


def test_lru_eviction_keeps_the_recently_used(tmp_path: Path, store: CountingStore) -> None:
    a, b, c = publish(store, tmp_path, 3)
    cache = cache_of(tmp_path, store, bundles=2.5, size=size_of(a))
    for rev in (a, b, a, c):  # a touched after b: b is least recently used when c arrives
        with cache.open(rev.ref):
            pass
    assert [cache.contains(r.revision_id) for r in (a, b, c)] == [True, False, True]
    assert cache.usage().bytes <= cache.max_bytes
    assert sorted(p.name for p in (tmp_path / "cache" / "bundles").iterdir()) == sorted(
        [a.revision_id, c.revision_id]
    )


def test_a_pinned_bundle_is_never_evicted(tmp_path: Path, store: CountingStore) -> None:
    a, b, c, d = publish(store, tmp_path, 4)
    cache = cache_of(tmp_path, store, bundles=2.5, size=size_of(a))
    with cache.open(a.ref) as pinned:
        tensors = load_tensors(pinned.path, pinned.manifest)
        for rev in (b, c):  # a is least recently used all along, but pinned
            with cache.open(rev.ref):
                pass
        assert cache.contains(a.revision_id) and not cache.contains(b.revision_id)
        with cache.open(c.ref):
            with pytest.raises(Unavailable) as caught:  # a and c pinned, d does not fit
                with cache.open(d.ref):
                    pass
            assert caught.value.code == "cache_full" and caught.value.retry_after > 0
        assert (pinned.path / TENSOR_FILE).exists()
        assert not list((tmp_path / "cache" / "staging").iterdir())
    with cache.open(d.ref):  # unpinned now: a (least recent) makes room
        pass
    assert not cache.contains(a.revision_id) and cache.contains(d.revision_id)
    assert tensors  # views loaded while pinned stay valid after eviction
    assert downloads(store.log)[d.revision_id] == 1


def test_a_bundle_larger_than_the_cache_is_refused(tmp_path: Path, store: CountingStore) -> None:
    (rev,) = publish(store, tmp_path, 1)
    cache = cache_of(tmp_path, store, bundles=0.5, size=size_of(rev))
    with pytest.raises(LorafleetError) as caught:
        with cache.open(rev.ref):
            pass
    assert caught.value.code == "bundle_exceeds_cache"


def _assert_nothing_cached(tmp_path: Path, cache: BundleCache, rid: str) -> None:
    assert not cache.contains(rid) and cache.usage().bytes == 0
    for sub in ("bundles", "staging"):
        assert not list((tmp_path / "cache" / sub).iterdir())


def test_a_bundle_for_another_base_is_never_admitted(tmp_path: Path, store: CountingStore) -> None:
    (rev,) = publish(store, tmp_path, 1, base_fingerprint=OTHER_FINGERPRINT)
    cache = cache_of(tmp_path, store, bundles=3, size=size_of(rev))
    with pytest.raises(BundleRejected) as caught:
        with cache.open(rev.ref):
            pass
    assert caught.value.code == "base_fingerprint_mismatch"
    assert downloads(store.log) == {}  # refused from the manifest alone
    _assert_nothing_cached(tmp_path, cache, rev.revision_id)


def test_a_bundle_that_fails_verification_is_never_admitted(tmp_path: Path, store: CountingStore) -> None:
    (good,) = publish(store, tmp_path, 1)
    # Replace the stored tensors with same-length bytes one bit off. The store's own checksum
    # is rewritten consistently, so only the manifest's sha256 can catch it.
    data = bytearray(store.get_bytes(good.uri + TENSOR_FILE))
    data[-7] ^= 0x10
    store.put_bytes(good.uri + TENSOR_FILE, bytes(data))
    cache = cache_of(tmp_path, store, bundles=3, size=size_of(good))
    with pytest.raises(BundleRejected) as caught:
        with cache.open(good.ref):
            pass
    assert caught.value.code == "checksum_mismatch"
    _assert_nothing_cached(tmp_path, cache, good.revision_id)
    # A row whose recorded manifest sha256 is wrong is refused too.
    wrong = RevisionRef(revision_id=good.revision_id, uri=good.uri, manifest_sha256="f" * 64)
    with pytest.raises(BundleRejected):
        with cache.open(wrong):
            pass
    _assert_nothing_cached(tmp_path, cache, good.revision_id)


def test_wrong_shapes_for_the_base_are_never_admitted(tmp_path: Path, store: CountingStore) -> None:
    make_bundle(tmp_path / "src", dict(MID_MOE_HF, num_experts=16), rank=4)
    rev = publish_revision(store, tmp_path / "src")
    cache = cache_of(tmp_path, store, bundles=3, size=size_of(rev))
    with pytest.raises(BundleRejected) as caught:
        with cache.open(rev.ref):
            pass
    assert caught.value.code == "shape_mismatch"
    _assert_nothing_cached(tmp_path, cache, rev.revision_id)


def test_threads_fetching_one_revision_download_it_once(tmp_path: Path, store: CountingStore) -> None:
    (rev,) = publish(store, tmp_path, 1)
    cache = cache_of(tmp_path, store, bundles=2, size=size_of(rev))
    barrier, paths, errors = threading.Barrier(8), [], []

    def use() -> None:
        barrier.wait()
        try:
            with cache.open(rev.ref) as bundle:
                paths.append(bundle.path)
        except LorafleetError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(paths) == 8
    assert downloads(store.log) == {rev.revision_id: 1}


def test_byte_bound_holds_under_concurrent_threads(tmp_path: Path, store: CountingStore) -> None:
    revs = publish(store, tmp_path, 6)
    cache = cache_of(tmp_path, store, bundles=3.5, size=max(size_of(r) for r in revs))
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(12):
            rev = rng.choice(revs)
            try:
                with cache.open(rev.ref) as bundle:
                    tensors = load_tensors(bundle.path, bundle.manifest)
                    assert len(tensors) == len(rev.manifest["tensors"])
                    time.sleep(rng.random() * 0.005)
                result = "ok"
            except Unavailable as exc:
                result = exc.code
            with lock:
                outcomes[result] += 1

    with DiskMonitor(tmp_path / "cache") as monitor:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert outcomes["ok"] >= 40 and set(outcomes) <= {"ok", "cache_full"}
    assert 0 < monitor.peak <= cache.max_bytes
    assert cache.usage().bytes <= cache.max_bytes
    resident = {p.name for p in (tmp_path / "cache" / "bundles").iterdir()}
    assert resident == {r.revision_id for r in revs if cache.contains(r.revision_id)}


def _process_worker(
    root: str, objects: str, log: str, refs: list[dict[str, str]], max_bytes: int, seed: int, barrier: Any
) -> None:
    """One serving process: first all processes open the same revision at once, then random ones."""
    store = CountingStore(Path(objects), Path(log))
    cache = BundleCache(Path(root), max_bytes=max_bytes, store=store, base=BASE)
    parsed = [RevisionRef(**r) for r in refs]
    barrier.wait()
    with cache.open(parsed[0]) as bundle:
        load_tensors(bundle.path, bundle.manifest)
    barrier.wait()
    with open(log, "a") as f:
        f.write(f"random phase {os.getpid()}\n")
    rng = random.Random(seed)
    for _ in range(15):
        try:
            with cache.open(rng.choice(parsed)) as bundle:
                load_tensors(bundle.path, bundle.manifest)
        except Unavailable as exc:
            if exc.code != "cache_full":
                raise


@pytest.mark.slow
def test_two_processes_share_one_cache_within_its_bound(tmp_path: Path, store: CountingStore) -> None:
    revs = publish(store, tmp_path, 5)
    max_bytes = int(2.5 * max(size_of(r) for r in revs))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    refs = [r.ref.model_dump() for r in revs]
    args = [str(tmp_path / "cache"), str(store.root), str(store.log), refs, max_bytes]
    with DiskMonitor(tmp_path / "cache") as monitor:
        procs = [ctx.Process(target=_process_worker, args=(*args, seed, barrier)) for seed in (1, 2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    # The simultaneous first open of one revision: exactly one download between the two processes.
    lines = store.log.read_text().splitlines()
    phase_one = lines[: next(i for i, line in enumerate(lines) if line.startswith("random phase"))]
    assert [k for k in phase_one if k.endswith(TENSOR_FILE)] == [revs[0].uri + TENSOR_FILE]
    assert sum(downloads(store.log).values()) > len(revs)  # the random phase evicted and re-fetched
    assert 0 < monitor.peak <= max_bytes
    cache = BundleCache(tmp_path / "cache", max_bytes=max_bytes, store=store, base=BASE)
    assert cache.usage().bytes <= max_bytes and cache.usage().fetching == 0
    resident = {p.name for p in (tmp_path / "cache" / "bundles").iterdir()}
    assert resident == {r.revision_id for r in revs if cache.contains(r.revision_id)}


def test_restart_cleans_up_after_a_crashed_fetcher(tmp_path: Path, store: CountingStore) -> None:
    (rev,) = publish(store, tmp_path, 1)
    cache = cache_of(tmp_path, store, bundles=2, size=size_of(rev))
    # A fetcher that died mid-download: its reservation and staging bytes stay behind.
    dead_pid = _dead_pid()
    staging = tmp_path / "cache" / "staging" / f"{rev.revision_id}.{dead_pid}.abcd1234"
    staging.mkdir()
    (staging / TENSOR_FILE).write_bytes(b"\0" * 1000)
    index = (
        json.loads((tmp_path / "cache" / "index.json").read_text() or "{}")
        if (tmp_path / "cache" / "index.json").exists()
        else {"entries": {}}
    )
    index["entries"][rev.revision_id] = {
        "state": "fetching",
        "bytes": size_of(rev),
        "last_used": 0,
        "owner_pid": dead_pid,
    }
    (tmp_path / "cache" / "index.json").write_text(json.dumps(index))
    assert cache.usage().fetching == 1
    with cache.open(rev.ref):  # the dead reservation is reclaimed, the revision fetched afresh
        pass
    assert not staging.exists() and cache.usage().fetching == 0 and cache.contains(rev.revision_id)
    # A damaged index is rebuilt from the verified bundles on disk.
    (tmp_path / "cache" / "index.json").write_text("{broken")
    assert cache.contains(rev.revision_id) and cache.usage().bytes == size_of(rev)


def _dead_pid() -> int:
    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    proc.start()
    proc.join()
    return int(proc.pid or 0)


@pytest.mark.integration
def test_fetches_from_s3(tmp_path: Path, s3_store: Any) -> None:
    (rev,) = publish(s3_store, tmp_path, 1)
    cache = BundleCache(tmp_path / "cache", max_bytes=3 * size_of(rev), store=s3_store, base=BASE)
    with cache.open(rev.ref) as bundle:
        tensors = load_tensors(bundle.path, bundle.manifest)
    src = load_tensors(tmp_path / "src0", bundle.manifest)
    assert all(bits(tensors[k]) == bits(src[k]) for k in src)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before + 1


def test_each_instance_sees_what_another_wrote(tmp_path: Path, store: CountingStore) -> None:
    """Instances keep the index they last read while its file is unchanged; a change made through
    another instance (another process, in production) must still be seen by the next lookup,
    evictions included."""
    a, b, c = publish(store, tmp_path, 3)
    first = cache_of(tmp_path, store, bundles=2.5, size=size_of(a))
    second = cache_of(tmp_path, store, bundles=2.5, size=size_of(a))
    assert not first.contains(a.revision_id)  # first has read (and kept) the empty index
    with second.open(a.ref):
        pass
    assert first.contains(a.revision_id)
    with first.open(a.ref):  # a hit through first: second's download is used
        pass
    assert downloads(store.log) == Counter({a.revision_id: 1})  # fetched once, by second
    with first.open(b.ref):
        pass
    with second.open(c.ref):  # evicts a, the least recently used, through second
        pass
    assert [first.contains(r.revision_id) for r in (a, b, c)] == [False, True, True]
    assert first.usage() == second.usage()
