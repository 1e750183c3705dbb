"""tiny-moe: lorafleet's built-in base model, built here because no model hub is reachable.

A small Qwen3-MoE causal LM (2 layers, hidden 128, 8 experts with top-2 routing, 4 query / 2
key-value heads of width 32, untied embeddings, float32) with its own byte-level BPE tokenizer
(digits split one per token) and a ChatML chat template, pretrained briefly on a corpus generated
from the seed plus ``platform/modeling/data/simple_english.txt``. The result is an ordinary
Hugging Face model directory (safetensors, tokenizer files, ``generation_config.json``) plus a
``lorafleet.json`` sidecar (:class:`TinyMoeBuildInfo`) that marks the build complete.

What the base can do (measured figures are in the build's sidecar):

* single-digit chat arithmetic, "What is a + b?" / "What is a - b?": the *strong* family, mostly
  answered correctly by greedy decoding; two-digit arithmetic is seen but barely learned;
* short well-formed replies that end with ``<|im_end|>``: facts ("What color is the sky?"),
  "Say the word X", "Repeat: ...";
* the RL demo task, *color pick* (:mod:`.demo_task`): every reply is a color, but the target
  ``purple`` comes up only about one time in ten (sidecar ``rl_demo.base_reward``), so GRPO with a
  rank-1 LoRA and :func:`.demo_task.grade_color_pick` has room to raise the reward toward 1.0.

Use ``build_tiny_moe(dir)``; a complete build with the same seed and recipe is reused.
"""

from lorafleet.platform.modeling.tiny_moe._build import (
    BUILDER_VERSION,
    SIDECAR,
    TINY_MOE_ID,
    BuildProgress,
    RlDemoInfo,
    TinyMoeBuildInfo,
    build_tiny_moe,
    read_build_info,
)
from lorafleet.platform.modeling.tiny_moe._recipe import CorpusSize, TinyMoeRecipe

__all__ = [
    "BUILDER_VERSION",
    "SIDECAR",
    "TINY_MOE_ID",
    "BuildProgress",
    "CorpusSize",
    "RlDemoInfo",
    "TinyMoeBuildInfo",
    "TinyMoeRecipe",
    "build_tiny_moe",
    "read_build_info",
]
