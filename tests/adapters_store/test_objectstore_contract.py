"""One contract, every ObjectStore: the local directory store and S3 on a real SeaweedFS."""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lorafleet.adapters_store.objectstore import (
    LocalObjectStore,
    ObjectInfo,
    ObjectStore,
    S3ObjectStore,
    make_object_store,
)
from lorafleet.platform.config.settings import Settings
from lorafleet.platform.domain.errors import (
    Conflict,
    IntegrityFailure,
    InvalidRequest,
    LorafleetError,
    NotFound,
    Unavailable,
)
from tests.harness_s3 import S3Server, make_s3_store

MiB = 1024 * 1024
SMALL_PART = 5 * MiB
"""S3 stores in these tests switch to multipart above this, so mid-sized objects test it cheaply."""


@dataclass
class Case:
    store: ObjectStore
    tamper: Callable[[str, bytes], None]
    """Replace an object's stored bytes behind the store's back, keeping its recorded checksum."""
    raw_etag: Callable[[str], str] | None = None
    """S3 only: the ETag the server reports (multipart ETags end in -<parts>)."""


def _local_case(root: Path) -> Case:
    store = LocalObjectStore(root)

    def tamper(key: str, data: bytes) -> None:
        *dirs, leaf = key.split("/")
        directory = root.joinpath(*dirs)
        sidecar = json.loads((directory / f"{leaf}~meta.json").read_text())
        (directory / sidecar["data"]).write_bytes(data)

    return Case(store=store, tamper=tamper)


def _s3_case(server: S3Server, bucket: str) -> Case:
    client = server.client()

    def tamper(key: str, data: bytes) -> None:
        metadata = client.head_object(Bucket=bucket, Key=key)["Metadata"]
        client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)

    def raw_etag(key: str) -> str:
        return str(client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')

    # Pages of 2 keys, so every listing below also walks the pagination.
    store = make_s3_store(server, bucket, multipart_threshold_bytes=SMALL_PART, list_page_size=2)
    return Case(store=store, tamper=tamper, raw_etag=raw_etag)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    if request.param == "local":
        return _local_case(tmp_path / "objects")
    return _s3_case(request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_implements_the_protocol(case: Case) -> None:
    assert isinstance(case.store, ObjectStore)
    case.store.ping()


def test_put_get_head_list_delete(case: Case) -> None:
    store = case.store
    objects = {"a/b/one": b"1" * 10, "a/b/two": b"22", "a/c": b"", "b": b"bee", "a/b": b"parent-too"}
    for key, data in objects.items():
        assert store.put_bytes(key, data) == ObjectInfo(key=key, size=len(data), sha256=_sha(data))

    for key, data in objects.items():
        assert store.get_bytes(key) == data
        assert store.head(key) == ObjectInfo(key=key, size=len(data), sha256=_sha(data))
        assert store.exists(key)
    assert [i.key for i in store.list()] == ["a/b", "a/b/one", "a/b/two", "a/c", "b"]
    assert [i.key for i in store.list("a/")] == ["a/b", "a/b/one", "a/b/two", "a/c"]
    assert [i.key for i in store.list("a/b/")] == ["a/b/one", "a/b/two"]
    assert [i.key for i in store.list("a/b/t")] == ["a/b/two"]
    assert list(store.list("zzz/")) == []
    assert next(iter(store.list("a/b/one"))).sha256 == _sha(objects["a/b/one"])

    store.put_bytes("b", b"overwritten")
    assert store.get_bytes("b") == b"overwritten"

    store.delete("a/b/one")
    store.delete("a/b/one")  # a missing key is not an error
    assert not store.exists("a/b/one")
    with pytest.raises(NotFound):
        store.get_bytes("a/b/one")
    assert [i.key for i in store.list("a/")] == ["a/b", "a/b/two", "a/c"]


def test_empty_object_round_trips(case: Case, tmp_path: Path) -> None:
    assert case.store.put_bytes("e", b"").size == 0
    assert case.store.get_bytes("e") == b""
    assert case.store.download("e", tmp_path / "e.bin") == ObjectInfo(key="e", size=0, sha256=_sha(b""))
    assert (tmp_path / "e.bin").read_bytes() == b""


def test_put_stream_and_put_file(case: Case, tmp_path: Path) -> None:
    data = os.urandom(SMALL_PART + 123)  # above the S3 multipart threshold
    assert case.store.put_stream("s/stream", io.BytesIO(data)).sha256 == _sha(data)
    source = tmp_path / "source.bin"
    source.write_bytes(data[:1000])
    assert case.store.put_file("s/file", source).size == 1000
    assert case.store.get_bytes("s/stream") == data
    assert case.store.get_bytes("s/file") == data[:1000]


def test_missing_key_is_not_found(case: Case, tmp_path: Path) -> None:
    store = case.store
    assert not store.exists("no/such")
    for call in (lambda: store.get_bytes("no/such"), lambda: store.head("no/such"),
                 lambda: store.get_range("no/such", 0, 1), lambda: store.get_range("no/such", 0, 0),
                 lambda: store.download("no/such", tmp_path / "out")):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.code == "object_not_found"
    assert not (tmp_path / "out").exists()


INVALID_KEYS = [
    "", "/abs/key", "a//b", "a/", "a/../b", "..", "a/./b", "a b", "a~b", "a\\b", "ünï", "x" * 1025,
    "s/s/" + "y" * 201,
]


def test_invalid_keys_are_refused(case: Case, tmp_path: Path) -> None:
    store = case.store
    for key in INVALID_KEYS:
        calls: list[Callable[[], object]] = [
            partial(store.put_bytes, key, b"x"), partial(store.get_bytes, key), partial(store.head, key),
            partial(store.delete, key), partial(store.exists, key),
            partial(store.download, key, tmp_path / "out"), partial(store.get_range, key, 0, 1),
        ]
        for call in calls:
            with pytest.raises(InvalidRequest) as info:
                call()
            assert info.value.code == "invalid_object_key", key
    with pytest.raises(InvalidRequest):
        list(store.list("../"))
    assert list(store.list()) == []


def test_if_absent_refuses_a_second_write(case: Case) -> None:
    case.store.put_bytes("k", b"first", if_absent=True)
    with pytest.raises(Conflict) as info:
        case.store.put_bytes("k", b"second", if_absent=True)
    assert info.value.code == "object_exists"
    assert case.store.get_bytes("k") == b"first"
    # Large (multipart on S3) conditional writes are refused the same way.
    big = os.urandom(SMALL_PART + 1)
    case.store.put_stream("big", io.BytesIO(big), if_absent=True)
    with pytest.raises(Conflict):
        case.store.put_stream("big", io.BytesIO(b"y" * (SMALL_PART + 1)), if_absent=True)
    assert _sha(case.store.get_bytes("big")) == _sha(big)


def test_if_absent_race_has_exactly_one_winner(case: Case) -> None:
    for round_ in range(5):
        key = f"race/{round_}"
        barrier = threading.Barrier(2)
        outcomes: dict[int, Any] = {}

        def write(writer: int, key: str = key, barrier: threading.Barrier = barrier,
                  outcomes: dict[int, Any] = outcomes) -> None:
            barrier.wait()
            try:
                case.store.put_bytes(key, f"writer-{writer}".encode() * 1000, if_absent=True)
                outcomes[writer] = "won"
            except Conflict as exc:
                outcomes[writer] = exc

        threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [w for w, outcome in outcomes.items() if outcome == "won"]
        assert len(winners) == 1, outcomes
        assert case.store.get_bytes(key) == f"writer-{winners[0]}".encode() * 1000


def test_64mib_object_round_trips_with_its_checksum(case: Case, tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    info = case.store.put_file("models/big.bin", source)
    assert info == ObjectInfo(key="models/big.bin", size=64 * MiB, sha256=_sha(data))
    if case.raw_etag is not None:
        assert case.raw_etag("models/big.bin").endswith("-13")  # 64 MiB in 5 MiB parts
    target = tmp_path / "out" / "big.bin"
    assert case.store.download("models/big.bin", target) == info
    assert _sha(target.read_bytes()) == _sha(data)
    assert [p.name for p in target.parent.iterdir()] == ["big.bin"]  # no temp file left


def test_ranged_reads(case: Case) -> None:
    data = bytes(range(256)) * 40
    case.store.put_bytes("r", data)
    assert case.store.get_range("r", 0, 10) == data[:10]
    assert case.store.get_range("r", 1000, 300) == data[1000:1300]
    assert case.store.get_range("r", len(data) - 5, 100) == data[-5:]  # clipped at the end
    assert case.store.get_range("r", 7, 0) == b""
    with pytest.raises(InvalidRequest) as info:
        case.store.get_range("r", len(data), 1)
    assert info.value.code == "invalid_range"
    with pytest.raises(InvalidRequest):
        case.store.get_range("r", -1, 1)


def test_corrupted_object_is_detected(case: Case, tmp_path: Path) -> None:
    data = os.urandom(SMALL_PART + 4096)
    case.store.put_bytes("c/obj", data)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    case.tamper("c/obj", bytes(flipped))

    with pytest.raises(IntegrityFailure) as info:
        case.store.get_bytes("c/obj")
    assert info.value.code == "checksum_mismatch"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with pytest.raises(IntegrityFailure) as info:
        case.store.download("c/obj", downloads / "c.bin")
    assert info.value.code == "checksum_mismatch"
    assert list(downloads.iterdir()) == []  # neither the target nor a temp file
    assert case.store.get_bytes("c/obj", verify=False) == bytes(flipped)


def test_truncated_object_is_detected(case: Case, tmp_path: Path) -> None:
    data = os.urandom(SMALL_PART + 4096)
    case.store.put_bytes("t/obj", data)
    case.tamper("t/obj", data[: len(data) - 100])
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for call in (lambda: case.store.get_bytes("t/obj"),
                 lambda: case.store.download("t/obj", downloads / "t")):
        with pytest.raises(IntegrityFailure) as info:
            call()
        assert info.value.code == "truncated_object"
    assert list(downloads.iterdir()) == []


def test_readers_see_whole_versions_during_overwrites(case: Case) -> None:
    versions = [b"a" * 3000, b"b" * 7000]
    case.store.put_bytes("v", versions[0])
    stop = threading.Event()
    seen: list[bytes | Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(case.store.get_bytes("v"))
            except LorafleetError as exc:
                seen.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):
        case.store.put_bytes("v", versions[i % 2])
    stop.set()
    reader.join()
    assert seen and all(s in versions for s in seen), {type(s) for s in seen if s not in versions}


def test_local_crash_leftovers_are_never_visible(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    store.put_bytes("d/kept", b"kept")
    # What a writer that died before publishing its sidecar leaves behind:
    (root / "d" / "lost~01j0000000000000000000000.data").write_bytes(b"orphan")
    (root / "d" / "lost~tmp-01j0000000000000000000000").write_bytes(b"{")
    assert not store.exists("d/lost")
    assert [i.key for i in store.list()] == ["d/kept"]
    with pytest.raises(NotFound):
        store.get_bytes("d/lost")
    store.put_bytes("d/lost", b"now real", if_absent=True)
    assert store.get_bytes("d/lost") == b"now real"


@pytest.mark.integration
def test_s3_checks_signatures_and_buckets(s3_server: S3Server, s3_bucket: str) -> None:
    wrong_secret = make_s3_store(s3_server, s3_bucket, secret_key="not-the-secret")
    with pytest.raises(Unavailable):
        wrong_secret.ping()
    with pytest.raises(LorafleetError) as info:
        wrong_secret.put_bytes("x", b"x")
    assert info.value.code == "object_store_access_denied"

    no_bucket = make_s3_store(s3_server, "lf-no-such-bucket")
    with pytest.raises(Unavailable):
        no_bucket.ping()
    with pytest.raises(Unavailable):
        no_bucket.put_bytes("x", b"x")

    unreachable = make_s3_store(s3_server, s3_bucket, endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(Unavailable):
        unreachable.ping()
    with pytest.raises(Unavailable) as unavailable:
        unreachable.get_bytes("x")
    assert unavailable.value.code == "object_store_unavailable"


def test_factory_builds_the_configured_store(tmp_path: Path) -> None:
    store = make_object_store(Settings(object_store="local", data_dir=tmp_path))
    assert isinstance(store, LocalObjectStore)
    store.put_bytes("f", b"1")
    assert (tmp_path / "objects" / "f~meta.json").is_file()


@pytest.mark.integration
def test_factory_builds_an_s3_store(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    settings = Settings(object_store="s3", data_dir=tmp_path, s3_endpoint_url=s3_server.endpoint_url,
                        s3_bucket=s3_bucket, s3_access_key=s3_server.access_key,
                        s3_secret_key=s3_server.secret_key)  # type: ignore[arg-type]
    store = make_object_store(settings)
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("f", b"1")
    assert store.get_bytes("f") == b"1"
