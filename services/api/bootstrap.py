"""First start of a deployment: migrate, create tenant ``default`` and its admin key."""

from __future__ import annotations

import os
from pathlib import Path

from lorafleet.platform.auth import ensure_default_tenant
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, transaction, upgrade


def write_secret(path: Path, secret: str) -> None:
    """Written with mode 600 from the start, never readable by others even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)


def bootstrap(settings: Settings) -> str | None:
    """Idempotent. Returns the admin key when it was created now (the only time it can be shown)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            _, secret = ensure_default_tenant(session)
    finally:
        engine.dispose()
    if secret is not None:
        write_secret(settings.admin_key_path, secret)
    return secret
