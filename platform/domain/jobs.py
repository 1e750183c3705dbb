"""Training-method settings: what a job asks for, validated once at the API and read by the trainer.

Every field has a concrete default so a started job can echo back exactly what it runs with.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

_STRICT = ConfigDict(extra="forbid", frozen=True)


class _Common(BaseModel):
    model_config = _STRICT

    learning_rate: float = Field(default=2e-3, gt=0, le=1.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_seq_len: int = Field(default=256, ge=8, le=32768)
    """Rows longer than this are rejected or truncated, as ``truncation`` says."""
    truncation: Literal["reject", "truncate"] = "truncate"
    checkpoint_every: int = Field(default=20, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)


class SupervisedHyperparameters(_Common):
    n_epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=8, ge=1, le=1024)


class DpoHyperparameters(_Common):
    n_epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=8, ge=1, le=1024)
    beta: float = Field(default=0.1, gt=0, le=10)


class StringCheckGrader(BaseModel):
    model_config = _STRICT
    type: Literal["string_check"]
    operation: Literal["eq", "contains", "regex"] = "eq"
    reference_field: str = "answer"
    """Row field compared with the sampled text (for regex: the pattern)."""
    case_sensitive: bool = False


class JsonSchemaGrader(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: dict[str, Any]
    """The sampled text must parse as JSON and validate against this schema."""


class NumericGrader(BaseModel):
    model_config = _STRICT
    type: Literal["numeric"]
    reference_field: str = "answer"
    tolerance: float = Field(default=0.0, ge=0)


class HttpGrader(BaseModel):
    model_config = _STRICT
    type: Literal["http"]
    url: HttpUrl
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    max_retries: int = Field(default=3, ge=0, le=10)


Grader = Annotated[StringCheckGrader | JsonSchemaGrader | NumericGrader | HttpGrader, Field(discriminator="type")]


class ReinforcementHyperparameters(_Common):
    learning_rate: float = Field(default=5e-3, gt=0, le=1.0)
    steps: int = Field(default=40, ge=1, le=100000)
    prompts_per_step: int = Field(default=8, ge=1, le=1024)
    group_size: int = Field(default=8, ge=2, le=256)
    temperature: float = Field(default=1.0, gt=0, le=5)
    max_new_tokens: int = Field(default=16, ge=1, le=4096)
    loss: Literal["importance_sampling", "ppo_clip"] = "ppo_clip"
    clip_epsilon: float = Field(default=0.2, gt=0, le=1)
    ratio_cap: float = Field(default=5.0, gt=1)
    """Truncation cap on importance ratios."""
    kl_coef: float = Field(default=0.0, ge=0)


class SupervisedMethod(BaseModel):
    model_config = _STRICT
    type: Literal["supervised"]
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()


class DpoMethod(BaseModel):
    model_config = _STRICT
    type: Literal["dpo"]
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class ReinforcementMethod(BaseModel):
    model_config = _STRICT
    type: Literal["reinforcement"]
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()
    grader: Grader



Method = Annotated[SupervisedMethod | DpoMethod | ReinforcementMethod, Field(discriminator="type")]

FILE_KINDS_FOR_METHOD: dict[str, tuple[str, ...]] = {
    "supervised": ("sft_chat", "sft_prompt"),
    "dpo": ("dpo",),
    "reinforcement": ("rl",),
}
