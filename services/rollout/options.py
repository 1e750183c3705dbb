"""The rollout controller's settings."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from lorafleet.platform.config import Settings


class ControllerOptions(BaseModel):
    """The controller's settings. Each is read from Settings when it has a field of that name,
    else from ``LORAFLEET_<NAME>`` in the environment, else the default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_controller_id: str | None = None
    """Lease owner name; default ``host-pid-random``."""
    rollout_admin_key: SecretStr | None = None
    """Platform admin key (tenant ``default``) for the replicas' internal endpoints; default:
    ``data_dir/admin.key``."""
    rollout_poll_seconds: float = Field(default=1.0, gt=0)
    rollout_lease_seconds: float = Field(default=15.0, gt=0)
    rollout_max_concurrent: int = Field(default=8, ge=1)
    """Rollouts one controller drives at once."""
    rollout_heartbeat_timeout_seconds: float = Field(default=15.0, gt=0)
    """A replica whose heartbeat is older is not live: not a target, and lost if it was one."""
    rollout_timeout_seconds: float = Field(default=600.0, gt=0)
    """From the start of warming to the flip; past it the rollout fails."""
    rollout_call_timeout_seconds: float = Field(default=120.0, gt=0)
    """One HTTP call to a replica (a warm of a large adapter included)."""
    rollout_keep_warm_seconds: float = Field(default=900.0, ge=0)
    """How long the new and the previous revision stay pinned after a pointer move."""
    rollout_reconcile_seconds: float = Field(default=10.0, gt=0)
    rollout_warm_tier: str = "device"
    """The tier targets warm into; ``host`` on replicas whose device slots cannot hold every pin."""

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ControllerOptions:
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            if hasattr(settings, name):
                values[name] = getattr(settings, name)
            elif (env := os.environ.get(f"LORAFLEET_{name.upper()}")) is not None:
                values[name] = env
        return cls.model_validate(values | overrides)
