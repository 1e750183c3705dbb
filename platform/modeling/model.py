"""lorafleet's decoder-only causal LM in plain torch, built from an :class:`ArchitectureSpec`.

One implementation for Qwen3-MoE, Qwen3, Llama, Mixtral, OLMoE and Qwen2-MoE:
embedding → N × [RMSNorm → GQA attention with RoPE (optional q/k norm) → residual →
RMSNorm → SwiGLU MLP or routed MoE → residual] → RMSNorm → lm_head.

Base weights are buffers, never parameters: nothing can hand them to an optimiser and the model
never changes them. Trainable state lives only in LoRA factors, passed in per forward as a
:class:`~lorafleet.platform.modeling.lora.LoraBatch` (one adapter slot per row, -1 = base).

Two entry points share every layer:

- :meth:`CausalLM.forward` — training and scoring: ``input_ids [B, T]`` with an optional
  right-padded ``attention_mask [B, T]``, returns ``logits [B, T, V]``;
- :meth:`CausalLM.step` — serving: one continuous-batching step over a
  :class:`~lorafleet.platform.modeling.kv_cache.KVCache` (mixed prefill and decode rows).

Parameter names (``state_dict`` keys) follow the adapter naming: the projection at
``layers.{i}.self_attn.q_proj`` is adapted by ``layers.{i}.self_attn.q_proj.lora_A/B``; routed
experts are stacked buffers ``layers.{i}.mlp.experts.{gate,up}_proj [E, ffn, hidden]`` and
``down_proj [E, hidden, ffn]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.modeling.kv_cache import CacheStep, KVCache
from lorafleet.platform.modeling.lora import (
    LoraBatch,
    apply_expert_lora,
    apply_module_lora,
    pad_expert_inputs,
    plan_expert_lora,
)


@dataclass(frozen=True)
class _Context:
    """What every layer of one forward needs besides its input."""

    cos: Tensor  # [B, 1, T, head_dim]
    sin: Tensor  # [B, 1, T, head_dim]
    mask: Tensor | None  # [B, 1, T, L] bool, or None for plain causal attention
    lora: LoraBatch | None
    cache: KVCache | None = None
    cache_step: CacheStep | None = None


class RMSNorm(nn.Module):
    weight: Tensor  # [dim]

    def __init__(self, dim: int, *, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, scale in the model dtype: the Hugging Face reference order.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Projection(nn.Module):
    """A frozen linear layer that applies each row's LoRA (module name = its adapter prefix)."""

    weight: Tensor  # [out, in]

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        *,
        module: str,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("weight", torch.zeros(fan_out, fan_in, dtype=dtype, device=device))
        self.bias: Tensor | None
        if bias:
            self.register_buffer("bias", torch.zeros(fan_out, dtype=dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: Tensor, lora: LoraBatch | None) -> Tensor:
        """x ``[B, T, in]`` -> ``[B, T, out]``."""
        return apply_module_lora(F.linear(x, self.weight, self.bias), x, module=self.module, lora=lora)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(
        self,
        spec: ArchitectureSpec,
        layer: int,
        *,
        qkv_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q_dim, kv_dim = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        prefix = f"layers.{layer}.self_attn"
        h = spec.hidden_size
        self.q_proj = Projection(h, q_dim, module=f"{prefix}.q_proj", bias=qkv_bias, **kw)
        self.k_proj = Projection(h, kv_dim, module=f"{prefix}.k_proj", bias=qkv_bias, **kw)
        self.v_proj = Projection(h, kv_dim, module=f"{prefix}.v_proj", bias=qkv_bias, **kw)
        self.o_proj = Projection(q_dim, h, module=f"{prefix}.o_proj", bias=spec.attention_bias, **kw)
        self.qk_norm = spec.qk_norm
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if spec.qk_norm == "per_head":
            self.q_norm = RMSNorm(spec.head_dim, eps=spec.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(spec.head_dim, eps=spec.rms_norm_eps, **kw)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, eps=spec.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(kv_dim, eps=spec.rms_norm_eps, **kw)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]``."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x, ctx.lora), self.k_proj(x, ctx.lora), self.v_proj(x, ctx.lora)
        if self.qk_norm == "full" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head" and self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, head_dim]
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * ctx.cos + _rotate_half(q) * ctx.sin
        k = k * ctx.cos + _rotate_half(k) * ctx.sin
        if ctx.cache is not None and ctx.cache_step is not None:
            k, v = ctx.cache.update(self.layer, ctx.cache_step, k, v)  # [B, kv_heads, L, head_dim]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=ctx.mask,
            is_causal=ctx.mask is None,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1), ctx.lora)


class DenseMLP(nn.Module):
    def __init__(
        self, hidden: int, ffn: int, *, prefix: str, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = Projection(hidden, ffn, module=f"{prefix}.gate_proj", **kw)
        self.up_proj = Projection(hidden, ffn, module=f"{prefix}.up_proj", **kw)
        self.down_proj = Projection(ffn, hidden, module=f"{prefix}.down_proj", **kw)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        h = F.silu(self.gate_proj(x, ctx.lora)) * self.up_proj(x, ctx.lora)
        return self.down_proj(h, ctx.lora)


class Experts(nn.Module):
    """Routed SwiGLU experts, weights stacked: gate/up ``[E, ffn, hidden]``, down ``[E, hidden, ffn]``."""

    gate_proj: Tensor
    up_proj: Tensor
    down_proj: Tensor

    def __init__(
        self, spec: ArchitectureSpec, layer: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        e, f, h = spec.num_experts, spec.moe_intermediate_size, spec.hidden_size
        self.prefix = f"layers.{layer}.mlp.experts"
        self.register_buffer("gate_proj", torch.zeros(e, f, h, dtype=dtype, device=device))
        self.register_buffer("up_proj", torch.zeros(e, f, h, dtype=dtype, device=device))
        self.register_buffer("down_proj", torch.zeros(e, h, f, dtype=dtype, device=device))

    def forward(
        self, x: Tensor, experts: Tensor, rows: Tensor, counts: list[int], lora: LoraBatch | None
    ) -> Tensor:
        """x ``[P, hidden]``: the inputs of P (token, expert) pairs sorted by expert; experts
        ``[P]`` and rows ``[P]`` (batch row of the token); counts[e] pairs per expert.
        Returns ``[P, hidden]``, each pair's expert output before the routing weight."""
        plan = plan_expert_lora(
            lora, pair_rows=rows, pair_experts=experts, num_experts=self.gate_proj.shape[0]
        )
        kw: dict[str, Any] = {"lora": lora, "plan": plan}
        padded = pad_expert_inputs(x, plan)  # gate and up read the same input: lay it out once
        gate = apply_expert_lora(
            _grouped(x, self.gate_proj, counts), x, module=f"{self.prefix}.gate_proj", padded=padded, **kw
        )
        up = apply_expert_lora(
            _grouped(x, self.up_proj, counts), x, module=f"{self.prefix}.up_proj", padded=padded, **kw
        )
        h = F.silu(gate) * up  # [P, ffn]
        return apply_expert_lora(
            _grouped(h, self.down_proj, counts), h, module=f"{self.prefix}.down_proj", **kw
        )


def _grouped(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    """Per-expert linear over pairs sorted by expert: x ``[P, in]``, weight ``[E, out, in]``.

    A loop over the experts that were hit, one matmul per contiguous group. At tiny sizes on CPU
    this measured faster than gathering a weight per pair for one bmm, and it never
    materialises ``[P, out, in]``.
    """
    parts = [F.linear(seg, weight[e]) for e, seg in enumerate(x.split(counts)) if seg.shape[0]]
    if not parts:
        return x.new_zeros(0, weight.shape[1])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Weight(nn.Module):
    """A bare frozen weight (router, shared-expert gate): keeps the reference parameter names."""

    weight: Tensor

    def __init__(self, *shape: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(*shape, dtype=dtype, device=device))


class SparseMoE(nn.Module):
    def __init__(
        self, spec: ArchitectureSpec, layer: int, *, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = (
            spec.num_experts,
            spec.experts_per_token,
            spec.norm_topk_prob,
        )
        self.router = _Weight(spec.num_experts, spec.hidden_size, dtype=dtype, device=device)
        self.experts = Experts(spec, layer, dtype=dtype, device=device)
        self.shared_expert: DenseMLP | None = None
        if spec.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(
                spec.hidden_size,
                spec.shared_expert_intermediate_size,
                prefix=f"layers.{layer}.mlp.shared_expert",
                dtype=dtype,
                device=device,
            )
            self.shared_expert_gate = _Weight(1, spec.hidden_size, dtype=dtype, device=device)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        """x ``[B, T, hidden]`` -> ``[B, T, hidden]``."""
        b, t, hidden = x.shape
        flat = x.reshape(b * t, hidden)  # [N, hidden]
        logits = F.linear(flat, self.router.weight)  # [N, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        # Group the N*k (token, expert) pairs by expert; stable so each token's experts
        # accumulate in ascending expert order, like the reference implementation.
        pair_experts = chosen.reshape(-1)  # [P]
        order = torch.argsort(pair_experts, stable=True)
        tokens = order // self.top_k  # [P] token of each sorted pair
        counts = torch.bincount(pair_experts, minlength=self.num_experts).tolist()
        out = self.experts(flat[tokens], pair_experts[order], tokens // t, counts, ctx.lora)  # [P, hidden]
        out = out * weights.reshape(-1)[order, None]
        y = torch.zeros_like(flat).index_add(0, tokens, out).view(b, t, hidden)
        if self.shared_expert is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight))  # [B, T, 1]
            y = y + gate * self.shared_expert(x, ctx)
        return y


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: ArchitectureSpec,
        layer: int,
        *,
        qkv_bias: bool,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.input_norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, **kw)
        self.self_attn = Attention(spec, layer, qkv_bias=qkv_bias, **kw)
        self.post_attn_norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, **kw)
        self.mlp: SparseMoE | DenseMLP
        if layer in spec.moe_layers:
            self.mlp = SparseMoE(spec, layer, **kw)
        else:
            self.mlp = DenseMLP(spec.hidden_size, spec.intermediate_size, prefix=f"layers.{layer}.mlp", **kw)

    def forward(self, x: Tensor, ctx: _Context) -> Tensor:
        x = x + self.self_attn(self.input_norm(x), ctx)
        return x + self.mlp(self.post_attn_norm(x), ctx)


class CausalLM(nn.Module):
    """The base model. Build it, then fill its buffers (see :mod:`.loading`)."""

    embed_tokens: Tensor  # [V, hidden]
    lm_head: Tensor | None  # [V, hidden]; None when tied to embed_tokens
    inv_freq: Tensor  # [head_dim / 2]

    def __init__(
        self,
        spec: ArchitectureSpec,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        qkv_bias: bool | None = None,
    ) -> None:
        """``qkv_bias``: whether q/k/v projections have a bias; default ``spec.attention_bias``,
        except Qwen2-MoE, whose config says it apart (``qkv_bias``, default true) and never
        biases o_proj."""
        super().__init__()
        self.spec = spec
        if qkv_bias is None:
            qkv_bias = spec.attention_bias or spec.model_type == "qwen2_moe"
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.register_buffer("embed_tokens", torch.zeros(spec.vocab_size, spec.hidden_size, **kw))
        self.layers = nn.ModuleList(
            DecoderLayer(spec, i, qkv_bias=qkv_bias, **kw) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps, **kw)
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.register_buffer("lm_head", torch.zeros(spec.vocab_size, spec.hidden_size, **kw))
        inv_freq = 1.0 / (
            spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
        )
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # [head_dim / 2]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions ``[B, T]`` -> cos, sin ``[B, 1, T, head_dim]`` (the "rotate_half" layout)."""
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def _layers(self, input_ids: Tensor, ctx: _Context) -> Tensor:
        h = F.embedding(input_ids, self.embed_tokens)
        for layer in self.layers:
            h = layer(h, ctx)
        return self.norm(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final hidden states ``[..., hidden]`` -> logits ``[..., V]``."""
        return F.linear(hidden, self.embed_tokens if self.lm_head is None else self.lm_head)

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, lora: LoraBatch | None = None
    ) -> Tensor:
        """Final normed hidden states ``[B, T, hidden]`` (call :meth:`logits` on the positions you need)."""
        b, t = input_ids.shape
        if lora is not None and lora.adapter_ids.shape[0] != b:
            raise InvalidRequest(f"lora names {lora.adapter_ids.shape[0]} rows for a batch of {b}")
        positions = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        cos, sin = self._rope(positions, self.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            keys = attention_mask.bool()[:, None, :] | torch.eye(t, dtype=torch.bool, device=input_ids.device)
            # A padding query may see only itself, so its softmax is never over an empty set.
            mask = (causal[None] & keys)[:, None]  # [B, 1, T, T]
        return self._layers(input_ids, _Context(cos=cos, sin=sin, mask=mask, lora=lora))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, lora: LoraBatch | None = None
    ) -> Tensor:
        """Training and scoring. input_ids ``[B, T]``, attention_mask ``[B, T]`` (1 = token,
        right padding) -> logits ``[B, T, V]``; padded positions' logits are meaningless."""
        return self.logits(self.hidden_states(input_ids, attention_mask, lora=lora))

    def step(
        self,
        input_ids: Tensor,
        *,
        cache: KVCache,
        slots: Sequence[int],
        num_tokens: Sequence[int] | None = None,
        lora: LoraBatch | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """One continuous-batching step.

        input_ids ``[B, T]``: row b holds ``num_tokens[b]`` new tokens of the request in
        ``slots[b]`` (right-padded to T; default all T). A prefill row carries its prompt, a
        decode row its last sampled token; both kinds may share one step. The new K/V is
        appended to each slot. Returns logits ``[B, T, V]``, or ``[B, V]`` at each row's last
        real token when ``last_only`` (what sampling needs, without the full-vocab cost for
        every prompt position).
        """
        b, t = input_ids.shape
        counts = list(num_tokens) if num_tokens is not None else [t] * b
        if len(slots) != b or (lora is not None and lora.adapter_ids.shape[0] != b):
            raise InvalidRequest("slots and lora rows must match the batch")
        plan = cache.plan(list(slots), counts, width=t)
        cos, sin = self._rope(plan.positions, self.dtype)
        ctx = _Context(cos=cos, sin=sin, mask=plan.mask, lora=lora, cache=cache, cache_step=plan)
        hidden = self._layers(input_ids, ctx)  # [B, T, hidden]
        cache.commit(plan)
        if last_only:
            last = torch.tensor(counts, device=hidden.device) - 1
            hidden = hidden[torch.arange(b, device=hidden.device), last]  # [B, hidden]
        return self.logits(hidden)

    def base_weight(self, *, layer: int, site: str, target: str) -> Tensor:
        """The frozen weight a LoRA target adapts: ``[out, in]``, or ``[E, out, in]`` for experts."""
        block = self.layers[layer]
        if site == "attn":
            proj = getattr(block.self_attn, target)
            return proj.weight
        mlp = block.mlp
        if site == "experts" and isinstance(mlp, SparseMoE):
            return getattr(mlp.experts, target)
        if site == "shared_expert" and isinstance(mlp, SparseMoE) and mlp.shared_expert is not None:
            return getattr(mlp.shared_expert, target).weight
        if site == "mlp" and isinstance(mlp, DenseMLP):
            return getattr(mlp, target).weight
        raise InvalidRequest(f"layer {layer} has no {site} {target}", code="lora_target_missing")
