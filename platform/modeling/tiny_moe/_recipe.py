"""Every knob of a tiny-moe build, in one frozen value recorded in the build's sidecar."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class CorpusSize(BaseModel):
    """How many generated documents of each family the corpus holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prose: int = 1500
    arithmetic_text: int = 2000
    chat_arith_single: int = 30000
    chat_arith_double: int = 6000
    chat_say: int = 3000
    chat_facts: int = 2500
    chat_color_pick: int = 2500


class TinyMoeRecipe(BaseModel):
    """The default is the shipped build; tests pass a smaller one (fewer steps, a smaller corpus)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    corpus: CorpusSize = CorpusSize()
    vocab_size: int = 2048
    """Target BPE vocabulary; the model's vocabulary is what the trainer reached (at most this)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 256
    max_position_embeddings: int = 512
    steps: int = 1200
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 4e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    router_aux_loss_coef: float = 0.01
    """Load balancing keeps all experts trained, so every expert's LoRA factors see gradient."""
