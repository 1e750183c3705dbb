"""What lorafleet needs to know of a base model's shape, read from its Hugging Face config.json.

Pure data (no torch): the trainer and engine build modules from it, and bundle verification
checks every adapter tensor's shape against :meth:`ArchitectureSpec.lora_shapes`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.lora import ATTENTION_TARGETS, LoraConfig, adapter_key

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3", "llama", "mixtral", "olmoe", "qwen2_moe")


class ArchitectureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    """FFN width of dense MLP layers (and of every layer of a dense model)."""
    moe_intermediate_size: int = 0
    """FFN width of one routed expert."""
    num_experts: int = 0
    experts_per_token: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    """Indices of layers whose MLP is a routed mixture of experts."""
    norm_topk_prob: bool = True
    qk_norm: Literal["none", "per_head", "full"] = "none"
    """Qwen3 normalises q and k per head; OLMoE over the whole projection; Llama/Mixtral not at all."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ArchitectureSpec:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidRequest(
                f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
                code="unsupported_architecture",
            )
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        rope = cfg.get("rope_parameters") or {}
        rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
        moe_ffn = int(cfg.get("moe_intermediate_size") or 0)
        dense_ffn = int(cfg["intermediate_size"])
        if model_type in ("mixtral", "olmoe"):
            moe_ffn = dense_ffn  # these name the expert width intermediate_size
        moe_layers: tuple[int, ...] = ()
        if num_experts:
            step = int(cfg.get("decoder_sparse_step") or 1)
            dense_only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
        qk_norm: Literal["none", "per_head", "full"] = "none"
        if model_type in ("qwen3", "qwen3_moe"):
            qk_norm = "per_head"
        elif model_type == "olmoe":
            qk_norm = "full"
        return cls(
            model_type=model_type,
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab_size=int(cfg["vocab_size"]),
            intermediate_size=dense_ffn,
            moe_intermediate_size=moe_ffn,
            num_experts=num_experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or 0),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            moe_layers=moe_layers,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", model_type == "mixtral")),
            qk_norm=qk_norm,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            attention_bias=bool(cfg.get("attention_bias", False)),
        )

    def module_dims(self, layer: int, site: str, target: str) -> tuple[int, int]:
        """(in_features, out_features) of one LoRA target."""
        h = self.hidden_size
        if site == "attn":
            q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}[target]
        ffn = {
            "mlp": self.intermediate_size,
            "experts": self.moe_intermediate_size,
            "shared_expert": self.shared_expert_intermediate_size,
        }[site]
        return (ffn, h) if target == "down_proj" else (h, ffn)

    def lora_shapes(self, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor of an adapter in the engine form, with its exact shape."""
        r = lora.rank
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.num_layers):
            sites: list[str] = ["attn"]
            if layer in self.moe_layers:
                sites.append("experts")
                if self.shared_expert_intermediate_size:
                    sites.append("shared_expert")
            else:
                sites.append("mlp")
            for site in sites:
                for target in lora.targets:
                    if (site == "attn") != (target in ATTENTION_TARGETS):
                        continue
                    fan_in, fan_out = self.module_dims(layer, site, target)
                    a, b = adapter_key(layer, site, target, "lora_A"), adapter_key(layer, site, target, "lora_B")  # type: ignore[arg-type]
                    if site == "experts":
                        shapes[a] = (self.num_experts, r, fan_in)
                        shapes[b] = (self.num_experts, fan_out, r)
                    else:
                        shapes[a] = (r, fan_in)
                        shapes[b] = (fan_out, r)
        return shapes
