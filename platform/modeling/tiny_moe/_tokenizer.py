"""tiny-moe's tokenizer: byte-level BPE trained on the corpus, with a ChatML chat template."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorafleet.platform.modeling.tiny_moe._corpus import ENDOFTEXT, IM_END, IM_START, PAD, SPECIAL_TOKENS

# Renders exactly what _corpus._chat writes. No default system turn: a short prompt is what a
# tiny model with a 512-token window can afford.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def train_tokenizer(docs: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Byte-level BPE over ``docs``; digits are split one per token so numbers share digit embeddings
    (a multi-digit token would make arithmetic a lookup table the tiny model cannot fill)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def to_transformers(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap for ``save_pretrained``: eos is ``<|im_end|>`` (a chat turn ends generation), no bos."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[ENDOFTEXT, IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> PreTrainedTokenizerFast:
    fast = to_transformers(tok)
    fast.save_pretrained(str(out_dir))
    return fast
