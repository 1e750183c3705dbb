"""Model config, deterministic init and the short pretraining loop of tiny-moe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tokenizers import Tokenizer
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from lorafleet.platform.domain.errors import IntegrityFailure
from lorafleet.platform.modeling.tiny_moe._corpus import ENDOFTEXT, prompt_spans
from lorafleet.platform.modeling.tiny_moe._recipe import TinyMoeRecipe


def make_config(recipe: TinyMoeRecipe, *, vocab_size: int, eos_ids: list[int], pad_id: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(  # type: ignore[call-arg]  # head_dim is a keyword the stubs lack
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        # Only read for dense (mlp_only) layers; tiny-moe has none, but keep it meaningful.
        intermediate_size=recipe.moe_intermediate_size * recipe.experts_per_token,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_position_embeddings,
        num_experts=recipe.num_experts,
        num_experts_per_tok=recipe.experts_per_token,
        moe_intermediate_size=recipe.moe_intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        # Untied: LoRA and adapter tooling never have to special-case a shared embedding/head.
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=recipe.router_aux_loss_coef,
        output_router_logits=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=None,
        dtype="float32",
    )


def pack_corpus(tok: Tokenizer, docs: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of all documents, each followed by ``<|endoftext|>``, and which of them are trained.

    Returns ``(ids [num_tokens] int64, trained [num_tokens] bool)``.
    """
    eot = tok.token_to_id(ENDOFTEXT)
    if eot is None:
        raise IntegrityFailure(f"the tokenizer has no {ENDOFTEXT} token", code="tokenizer_incomplete")
    ids: list[int] = []
    trained: list[bool] = []
    for doc, enc in zip(docs, tok.encode_batch(docs), strict=True):
        spans = prompt_spans(doc)
        ids.extend(enc.ids)
        trained.extend(not any(lo <= start < hi for lo, hi in spans) for start, _ in enc.offsets)
        ids.append(eot)
        trained.append(True)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(trained, dtype=torch.bool)


def _lr_at(step: int, recipe: TinyMoeRecipe) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def pretrain(
    *,
    recipe: TinyMoeRecipe,
    config: Qwen3MoeConfig,
    stream: torch.Tensor,
    trained: torch.Tensor,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Qwen3MoeForCausalLM, float]:
    """Initialise from ``seed`` and train on ``stream`` (``[num_tokens]`` int64, documents packed),
    counting the loss only where ``trained`` (``[num_tokens]`` bool) is set.

    Returns the model (eval mode) and the mean loss over the last tenth of the steps. Global RNG
    state is forked so a build inside a long-lived process leaves the caller's generators alone.
    """
    seq = recipe.seq_len
    usable = (stream.numel() // seq) * seq
    blocks = stream[:usable].view(-1, seq)  # [num_blocks, seq_len]
    labels = torch.where(trained[:usable], stream[:usable], -100).view(-1, seq)  # [num_blocks, seq_len]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        order_gen = torch.Generator().manual_seed(seed + 1)
        model.train()
        # No decay on norms and the router: decaying the router pulls it toward uniform routing.
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("gate.weight")]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or n.endswith("gate.weight")]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.95),
        )
        order = torch.randperm(blocks.shape[0], generator=order_gen)
        cursor = 0
        tail: list[float] = []
        for step in range(recipe.steps):
            if cursor + recipe.batch_size > order.numel():
                order, cursor = torch.randperm(blocks.shape[0], generator=order_gen), 0
            rows = order[cursor : cursor + recipe.batch_size]
            cursor += recipe.batch_size
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, recipe)
            out = model(
                input_ids=blocks[rows], labels=labels[rows], output_router_logits=recipe.router_aux_loss_coef > 0
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            # Report the language-model loss alone; out.loss also holds the weighted balancing term.
            lm_loss = out.loss.detach()
            if out.aux_loss is not None:
                lm_loss = lm_loss - recipe.router_aux_loss_coef * out.aux_loss.detach()
            loss = float(lm_loss)
            if step >= recipe.steps - max(1, recipe.steps // 10):
                tail.append(loss)
            if on_step is not None:
                on_step(step + 1, loss)
    model.eval()
    return model, sum(tail) / len(tail)
