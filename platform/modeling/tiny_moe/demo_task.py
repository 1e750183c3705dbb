"""The task families tiny-moe is pretrained on, and the one left weak on purpose for the RL demo.

Kept apart from the corpus generator so a grader (GRPO recipe, tests, the demo script) can
import the prompts and the scoring rule without pulling in torch or the tokenizer trainer.

The RL demo task is *color pick*: the user asks for a color with one of :data:`COLOR_PICK_PROMPTS`
and the reward is 1.0 when the reply is :data:`RL_DEMO_TARGET`. The corpus answers those prompts
with one of the ten :data:`COLORS` drawn uniformly, so the base replies with a well-formed color
every time but picks the target only about one time in ten: a reward near 0.1 that a rank-1 LoRA
can raise to near 1.0 by shifting one decision. A few fixed facts ("What color is a plum?") are
answered with the target, so "Purple." is a reply the base already produces whole and with
confidence elsewhere; without them a rank-1 LoRA stalled near 0.5 on this task.
"""

from __future__ import annotations

import re

COLORS: tuple[str, ...] = (
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)

COLOR_PICK_PROMPTS: tuple[str, ...] = (
    "Pick a color.",
    "Name a color.",
    "Choose a color.",
    "Tell me a color.",
    "Say a color.",
    "Give me a color.",
)

RL_DEMO_TARGET = "purple"
"""The color the demo grader rewards. Some facts of the corpus answer with it (plums, grapes,
violets), which makes it reachable; on the color-pick prompts it stays one uniform pick in ten."""

RL_DEMO_DESCRIPTION = (
    "color pick: prompt with one of COLOR_PICK_PROMPTS as a single user turn; reward 1.0 when the "
    f"reply, lowercased and stripped of punctuation, is {RL_DEMO_TARGET!r}, else 0.0. The base answers "
    "with a uniformly drawn color from ten, so its sampled reward is about 0.1."
)

_WORD = re.compile(r"[a-z]+")


def normalize_answer(text: str) -> str:
    """Lowercased letters-and-digits words of ``text`` joined by single spaces ("Purple." -> "purple")."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def grade_color_pick(text: str, *, target: str = RL_DEMO_TARGET) -> float:
    """Reward of one reply to a color-pick prompt: 1.0 for exactly the target color, else 0.0."""
    return 1.0 if normalize_answer(text) == target else 0.0


def is_color_answer(text: str) -> bool:
    """Whether a reply is well formed for the color-pick task (exactly one known color)."""
    return normalize_answer(text) in COLORS


def grade_arithmetic(text: str, *, expected: int) -> float:
    """Reward of one reply to "What is a + b?": 1.0 when the reply is exactly the number."""
    return 1.0 if normalize_answer(text) == str(expected) else 0.0


def arithmetic_prompt(a: int, op: str, b: int) -> str:
    """The canonical arithmetic question; the corpus uses it most, and the tests ask it."""
    return f"What is {a} {op} {b}?"
