"""The embedded object store: a directory tree on the local disk.

Layout under ``root``, for key ``a/b/name``::

    a/b/name~meta.json        the sidecar: size, sha256 and the name of the data file
    a/b/name~<ulid>.data      the bytes of one write, never modified after the sidecar names it

The sidecar is the object's visibility switch. Data is written and fsynced under a fresh,
unique name first; only then is the sidecar renamed (or hard-linked, for ``if_absent``) into
place. A crash at any point therefore leaves either the old complete object or the new one,
never an object without its checksum; what it can leave is an unreferenced data file.
Keys cannot contain ``~`` (see ``_keys``), so these names never collide with a key's own
directories (key ``a`` and key ``a/b`` can both exist, as on S3).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lorafleet.adapters_store.objectstore import _integrity
from lorafleet.adapters_store.objectstore._keys import validate_key, validate_prefix
from lorafleet.adapters_store.objectstore._metrics import counts_failures
from lorafleet.adapters_store.objectstore.base import ObjectInfo
from lorafleet.platform.domain.errors import (
    Conflict,
    IntegrityFailure,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from lorafleet.platform.domain.ids import new_ulid

_META_SUFFIX = "~meta.json"
_DATA_SUFFIX = ".data"
_READ_RETRIES = 3
"""How often a read re-resolves the sidecar when a concurrent overwrite removed the data it named."""


class _Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    key: str
    size: int
    """Bytes in the data file, recorded at write time."""
    sha256: str
    """Hex sha256 of the data file, recorded at write time."""
    data: str
    """File name of the data file, in the sidecar's own directory."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writes --------------------------------------------------------------------------

    @counts_failures("put")
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        return self.put_stream(key, io.BytesIO(data), if_absent=if_absent)

    @counts_failures("put")
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        with Path(path).open("rb") as fh:
            return self.put_stream(key, fh, if_absent=if_absent)

    @counts_failures("put")
    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        directory, leaf = self._locate(key)
        directory.mkdir(parents=True, exist_ok=True)
        data_path = directory / f"{leaf}~{new_ulid()}{_DATA_SUFFIX}"
        tmp_meta = directory / f"{leaf}~tmp-{new_ulid()}"
        meta_path = directory / f"{leaf}{_META_SUFFIX}"
        published = False
        try:
            sha256, size = self._write_data(stream, data_path)
            sidecar = _Sidecar(key=key, size=size, sha256=sha256, data=data_path.name)
            with tmp_meta.open("xb") as fh:
                fh.write(sidecar.model_dump_json().encode())
                fh.flush()
                os.fsync(fh.fileno())
            if if_absent:
                # link() refuses an existing target atomically, across threads and processes:
                # of two writers racing for one key exactly one publishes its sidecar.
                try:
                    os.link(tmp_meta, meta_path)
                except FileExistsError:
                    raise Conflict(f"object {key!r} already exists", code="object_exists",
                                   param="key") from None
                published = True
                tmp_meta.unlink()
            else:
                previous = self._read_sidecar(meta_path)
                os.replace(tmp_meta, meta_path)
                published = True
                # A writer racing us may have replaced `previous` already; then its data file
                # is left unreferenced (a leak a sweep can collect), never a dangling sidecar.
                if previous is not None and previous.data != data_path.name:
                    (directory / previous.data).unlink(missing_ok=True)
            _fsync_dir(directory)
        finally:
            tmp_meta.unlink(missing_ok=True)
            if not published:
                data_path.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, sha256=sha256)

    @staticmethod
    def _write_data(stream: BinaryIO, data_path: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        with data_path.open("xb") as out:
            while chunk := stream.read(_integrity.CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        return digest.hexdigest(), size

    @counts_failures("delete")
    def delete(self, key: str) -> None:
        directory, leaf = self._locate(key)
        meta_path = directory / f"{leaf}{_META_SUFFIX}"
        # Renaming the sidecar away is the atomic "it is gone"; we then own exactly the data
        # file that sidecar named, whatever writers do to the key meanwhile.
        tomb = directory / f"{leaf}~del-{new_ulid()}"
        try:
            os.rename(meta_path, tomb)
        except FileNotFoundError:
            return
        try:
            sidecar = self._read_sidecar(tomb)
            if sidecar is not None:
                (directory / sidecar.data).unlink(missing_ok=True)
        finally:
            tomb.unlink(missing_ok=True)
        _fsync_dir(directory)

    # -- reads ---------------------------------------------------------------------------

    @counts_failures("get")
    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        sidecar, fh = self._open(key)
        with fh:
            data = fh.read()
        if verify:
            _integrity.check(key, recorded_size=sidecar.size, recorded_sha256=sidecar.sha256,
                             actual_size=len(data), actual_sha256=hashlib.sha256(data).hexdigest())
        return data

    @counts_failures("get")
    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise InvalidRequest("a range needs start >= 0 and length >= 0", code="invalid_range")
        _, fh = self._open(key)
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if length == 0:
                return b""
            if start >= size:
                raise InvalidRequest(f"range starts at {start}, past the end of {key!r} ({size} bytes)",
                                     code="invalid_range")
            fh.seek(start)
            return fh.read(length)

    @counts_failures("get")
    def download(self, key: str, path: Path, *, verify: bool = True) -> ObjectInfo:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sidecar, fh = self._open(key)
        tmp = path.parent / f".{path.name}.{new_ulid()}.part"
        try:
            with fh, tmp.open("xb") as out:
                digest = hashlib.sha256()
                size = 0
                while chunk := fh.read(_integrity.CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if verify:
                _integrity.check(key, recorded_size=sidecar.size, recorded_sha256=sidecar.sha256,
                                 actual_size=size, actual_sha256=digest.hexdigest())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=sidecar.size, sha256=sidecar.sha256)

    @counts_failures("head")
    def head(self, key: str) -> ObjectInfo:
        directory, leaf = self._locate(key)
        sidecar = self._read_sidecar(directory / f"{leaf}{_META_SUFFIX}")
        if sidecar is None:
            raise NotFound(f"object {key!r} does not exist", code="object_not_found", param="key")
        return ObjectInfo(key=key, size=sidecar.size, sha256=sidecar.sha256)

    @counts_failures("head")
    def exists(self, key: str) -> bool:
        directory, leaf = self._locate(key)
        return (directory / f"{leaf}{_META_SUFFIX}").is_file()

    @counts_failures("list")
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        head_dir, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*head_dir.split("/")) if head_dir else self.root
        if not start.is_dir():
            return
        found: list[tuple[str, Path]] = []
        for dirpath, _dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not name.endswith(_META_SUFFIX):
                    continue
                leaf = name.removesuffix(_META_SUFFIX)
                key = leaf if rel == "." else f"{rel}/{leaf}"
                if key.startswith(prefix):
                    found.append((key, Path(dirpath) / name))
        for key, meta_path in sorted(found):
            sidecar = self._read_sidecar(meta_path)
            if sidecar is not None:  # deleted while we listed
                yield ObjectInfo(key=key, size=sidecar.size, sha256=sidecar.sha256)

    @counts_failures("ping")
    def ping(self) -> None:
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise Unavailable(f"local object store {self.root} is not a writable directory",
                              code="object_store_unavailable")
        if shutil.disk_usage(self.root).free == 0:
            raise Unavailable(f"local object store {self.root} has no free space",
                              code="object_store_unavailable")

    # -- internals -----------------------------------------------------------------------

    def _locate(self, key: str) -> tuple[Path, str]:
        *dirs, leaf = validate_key(key).split("/")
        return self.root.joinpath(*dirs), leaf

    @staticmethod
    def _read_sidecar(meta_path: Path) -> _Sidecar | None:
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _Sidecar.model_validate_json(raw)
        except ValidationError as exc:
            raise IntegrityFailure(f"unreadable sidecar {meta_path}", code="checksum_mismatch") from exc

    def _open(self, key: str) -> tuple[_Sidecar, BinaryIO]:
        """The sidecar and an open handle on the data it names (a consistent pair: an open
        file stays readable on POSIX even when an overwrite unlinks it)."""
        directory, leaf = self._locate(key)
        meta_path = directory / f"{leaf}{_META_SUFFIX}"
        for _ in range(_READ_RETRIES):
            sidecar = self._read_sidecar(meta_path)
            if sidecar is None:
                raise NotFound(f"object {key!r} does not exist", code="object_not_found", param="key")
            with contextlib.suppress(FileNotFoundError):
                return sidecar, (directory / sidecar.data).open("rb")
            if self._read_sidecar(meta_path) == sidecar:
                raise IntegrityFailure(f"object {key!r} lost its data file {sidecar.data}",
                                       code="truncated_object")
        raise Unavailable(f"object {key!r} kept changing while being read", code="object_busy")
