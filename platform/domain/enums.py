"""Lifecycles and closed vocabularies, each with its transition table in one place."""

from __future__ import annotations

from enum import StrEnum

from lorafleet.platform.domain.errors import InvalidTransition


class Scope(StrEnum):
    ADMIN = "admin"
    TRAIN = "train"
    INFER = "infer"
    READ = "read"


class FileStatus(StrEnum):
    VALIDATED = "validated"
    ERROR = "error"
    DELETED = "deleted"
    """The bytes are gone; the row stays only because finished jobs refer to it."""


class FileKind(StrEnum):
    """What a validated JSONL dataset holds; decided by its first valid row."""

    SFT_CHAT = "sft_chat"
    SFT_PROMPT = "sft_prompt"
    DPO = "dpo"
    RL = "rl"


class JobMethod(StrEnum):
    SUPERVISED = "supervised"
    DPO = "dpo"
    REINFORCEMENT = "reinforcement"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL_JOB

    def check_transition(self, to: JobStatus) -> None:
        if to not in JOB_TRANSITIONS[self]:
            raise InvalidTransition(f"job cannot go from {self} to {to}")


_TERMINAL_JOB = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}

JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    # running -> queued: the trainer holding the lease died; another resumes from a checkpoint
    JobStatus.RUNNING: frozenset(
        {JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class RolloutState(StrEnum):
    PENDING = "pending"
    WARMING = "warming"
    READY = "ready"
    SERVING = "serving"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"

    @property
    def active(self) -> bool:
        return self in (RolloutState.PENDING, RolloutState.WARMING, RolloutState.READY)

    def check_transition(self, to: RolloutState) -> None:
        if to not in ROLLOUT_TRANSITIONS[self]:
            raise InvalidTransition(f"rollout cannot go from {self} to {to}")


ROLLOUT_TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PENDING: frozenset({RolloutState.WARMING, RolloutState.FAILED, RolloutState.CANCELLED}),
    RolloutState.WARMING: frozenset({RolloutState.READY, RolloutState.FAILED, RolloutState.CANCELLED}),
    RolloutState.READY: frozenset({RolloutState.SERVING, RolloutState.FAILED, RolloutState.CANCELLED}),
    RolloutState.SERVING: frozenset({RolloutState.ROLLED_BACK}),
    RolloutState.FAILED: frozenset(),
    RolloutState.CANCELLED: frozenset(),
    RolloutState.ROLLED_BACK: frozenset(),
}


class ReplicaState(StrEnum):
    """What a replica's row says of it. A replica stopped on purpose writes DOWN; one that died
    leaves UP behind and goes silent, which is what the heartbeat-age gauge and alert look for."""

    UP = "up"
    DOWN = "down"


class ReplicaRole(StrEnum):
    TRAINER = "trainer"
    SERVING = "serving"
