from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet.platform.domain.errors import InvalidRequest

PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "secret", "admin", "password"}


class Settings(BaseSettings):
    """Everything a lorafleet process is configured by. Defaults give the embedded mode."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_", env_file=None, extra="forbid", validate_default=True
    )

    environment: Literal["development", "production"] = "development"
    """production refuses placeholder secrets and the embedded SQLite default."""
    data_dir: Path = Path(".lorafleet")
    """Root of everything the embedded mode keeps on disk."""
    database_url: str = ""
    """SQLAlchemy URL; empty means a SQLite file under data_dir."""
    queue_backend: Literal["database", "redis"] = "database"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "lorafleet"
    """Namespace of every Redis key this deployment writes."""
    object_store: Literal["local", "s3"] = "local"
    object_store_dir: Path | None = None
    """Root of the local object store; empty means data_dir/objects."""
    s3_endpoint_url: str | None = None
    s3_bucket: str = "lorafleet"
    s3_region: str = "us-east-1"
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_multipart_threshold_bytes: int = 8 * 1024 * 1024
    s3_max_concurrency: int = 8
    model_dir: Path | None = None
    """Where base models live; empty means data_dir/models."""
    cache_dir: Path | None = None
    """Local bundle cache; empty means data_dir/cache."""
    max_cache_bytes: int = 2 * 1024**3
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    """Largest dataset upload accepted; larger ones answer 413."""
    max_queued_jobs_per_tenant: int = Field(default=20, ge=1)
    """Queued plus running jobs a tenant may hold before new ones answer 429."""
    job_lease_seconds: float = 60.0
    """How long a trainer holds a job between heartbeats before another may take it over."""
    trainer_device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    """Where the trainer keeps its resident bases and trains: cpu, cuda or cuda:N."""
    trainer_max_tokens_per_pass: int | None = Field(default=None, ge=1)
    """Padded tokens one forward/backward pass over concurrent jobs may hold (activation memory).
    None: the largest job's batch, so jobs trained together need no more than the largest alone."""
    prometheus_url: str | None = None
    """When set, the ops page reads its charts from this Prometheus instead of in-process history."""
    metrics_history_interval_seconds: float = 15.0
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _production_guards(self) -> Settings:
        if self.environment == "production":
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise InvalidRequest("production needs LORAFLEET_DATABASE_URL for a real database",
                                     code="invalid_settings", param="database_url")
            if self.object_store == "s3" and (
                self.s3_secret_key.get_secret_value().lower() in PLACEHOLDER_SECRETS
                or self.s3_access_key.lower() in PLACEHOLDER_SECRETS
            ):
                raise InvalidRequest("production refuses placeholder S3 credentials",
                                     code="invalid_settings", param="s3_secret_key")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'lorafleet.db').resolve()}"

    @property
    def resolved_object_store_dir(self) -> Path:
        return self.object_store_dir or self.data_dir / "objects"

    @property
    def resolved_model_dir(self) -> Path:
        return self.model_dir or self.data_dir / "models"

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.data_dir / "cache"

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin.key"


def load_settings(**overrides: object) -> Settings:
    """Build the process's settings from the environment, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
