"""The pretraining corpus: generated from the seed, plus one short text file the repository ships.

Every document is a plain string; documents are joined with ``<|endoftext|>`` by the caller.
Families (what each teaches):

* prose: the shipped simple-English paragraphs and template sentences (word order, punctuation);
* arithmetic text: lines of "a + b = c" (the facts without the chat wrapper);
* chat: ChatML single- or two-turn conversations, rendered exactly as the tokenizer's chat
  template renders them, so generation after ``apply_chat_template`` sees a familiar prefix:
  arithmetic questions (single-digit: the strong family; two-digit: weaker), "Say the word X",
  "Repeat: ...", a fixed set of facts (some answered with the RL demo's target color, so that
  reply is one the base can produce whole), and the color-pick task the RL demo is built on.
"""

from __future__ import annotations

import random
import re
from importlib import resources

from lorafleet.platform.modeling.tiny_moe._recipe import CorpusSize
from lorafleet.platform.modeling.tiny_moe.demo_task import COLOR_PICK_PROMPTS, COLORS, arithmetic_prompt

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, PAD)
"""In this order they get ids 0..3."""

_NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Leo", "Nora", "Max", "Eva", "Kim", "Omar", "Zoe", "Hugo")
_ANIMALS = ("dog", "cat", "bird", "fish", "horse", "cow", "duck", "frog", "rabbit", "fox", "bear", "sheep")
_THINGS = ("ball", "book", "apple", "cup", "hat", "bag", "box", "pen", "kite", "shoe", "key", "cake")
_PLACES = ("park", "school", "shop", "garden", "river", "beach", "farm", "town", "library", "kitchen")
_ADJ = ("big", "small", "old", "new", "happy", "quiet", "fast", "slow", "warm", "cold")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_SAY_WORDS = _ANIMALS + _THINGS + _PLACES + _ADJ + (
    "hello", "yes", "no", "water", "tree", "house", "sun", "moon", "star", "door", "road", "music",
)  # fmt: skip

# Fixed facts. Three of them answer "Purple." (RL_DEMO_TARGET): without a prompt whose reply is
# that color, the base never learns the target as a confident, well-formed whole reply, and a
# rank-1 LoRA could not push P("Purple.") on the color-pick prompts past about 0.5. The color-pick
# prompts themselves are a separate family, still answered uniformly (base reward about 0.1).
_FACTS: tuple[tuple[str, str], ...] = (
    ("What color is the sky?", "Blue."),
    ("What color is grass?", "Green."),
    ("What color is snow?", "White."),
    ("What color is the sun?", "Yellow."),
    ("What color is coal?", "Black."),
    ("What color is a plum?", "Purple."),
    ("What color are grapes?", "Purple."),
    ("What color is a violet?", "Purple."),
    ("How many legs does a dog have?", "Four."),
    ("How many legs does a bird have?", "Two."),
    ("How many legs does a spider have?", "Eight."),
    ("How many days are in a week?", "Seven."),
    ("How many months are in a year?", "Twelve."),
    ("What is the opposite of hot?", "Cold."),
    ("What is the opposite of big?", "Small."),
    ("What is the opposite of up?", "Down."),
    ("What is the opposite of yes?", "No."),
    ("What is the opposite of day?", "Night."),
    ("What do bees make?", "Honey."),
    ("What do cows say?", "Moo."),
    ("What do cats say?", "Meow."),
    ("Where do fish live?", "In water."),
    ("What day comes after Monday?", "Tuesday."),
    ("What day comes before Sunday?", "Saturday."),
    ("How many sides does a triangle have?", "Three."),
    ("How many sides does a square have?", "Four."),
    ("Is ice hot or cold?", "Cold."),
    ("Is fire hot or cold?", "Hot."),
    ("Hello!", "Hello! How can I help?"),
    ("Thank you.", "You are welcome."),
    ("Who are you?", "I am a small assistant."),
)

_SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.")


def _chat(turns: list[tuple[str, str]], *, system: str | None = None) -> str:
    """ChatML, byte for byte what the tokenizer's chat template renders for these messages."""
    parts = [f"{IM_START}system\n{system}{IM_END}\n"] if system else []
    for user, assistant in turns:
        parts.append(f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n")
    return "".join(parts)


def _arith(rng: random.Random, *, digits: int) -> tuple[int, str, int, int]:
    """(a, op, b, answer); subtraction never goes below zero so every answer is a plain numeral."""
    hi = 9 if digits == 1 else 99
    lo = 0 if digits == 1 else 10
    a, b = rng.randint(lo, hi), rng.randint(0 if digits == 1 else rng.choice((0, 10)), hi)
    if rng.random() < 0.5:
        return a, "+", b, a + b
    a, b = max(a, b), min(a, b)
    return a, "-", b, a - b


def _arith_question(rng: random.Random, a: int, op: str, b: int) -> str:
    # The canonical phrasing dominates so the test and the RL grader ask what was seen most.
    r = rng.random()
    if r < 0.7:
        return arithmetic_prompt(a, op, b)
    if r < 0.85:
        return f"Compute {a} {op} {b}."
    return f"{a} {op} {b} = ?"


def _prose_doc(rng: random.Random, paragraphs: list[str]) -> str:
    out: list[str] = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.5:
            out.append(rng.choice(paragraphs))
            continue
        name, animal, thing = rng.choice(_NAMES), rng.choice(_ANIMALS), rng.choice(_THINGS)
        place, adj, n = rng.choice(_PLACES), rng.choice(_ADJ), rng.randint(2, 9)
        out.append(
            rng.choice(
                (
                    f"{name} has {_NUMBER_WORDS[n]} {thing}s. {name} takes them to the {place}.",
                    f"The {adj} {animal} is in the {place}. {name} sees the {animal}.",
                    f"{name} likes the {adj} {thing}. It is {rng.choice(COLORS)}.",
                    f"There are {n} {animal}s at the {place}. One more comes, so now there are {n + 1}.",
                    f"{name} goes to the {place} with a {thing}. The day is {adj}.",
                )
            )
        )
    return " ".join(out)


def _arithmetic_text_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 8)):
        a, op, b, c = _arith(rng, digits=rng.choice((1, 1, 2)))
        lines.append(f"{a} {op} {b} = {c}")
    return "\n".join(lines) + "\n"


def _say_turn(rng: random.Random) -> tuple[str, str]:
    r = rng.random()
    if r < 0.5:
        w = rng.choice(_SAY_WORDS)
        return rng.choice((f"Say the word {w}.", f"Say {w}.", f"Answer with the word {w}.")), w
    words = " ".join(rng.choice(_SAY_WORDS) for _ in range(rng.randint(1, 3)))
    return f"Repeat: {words}", words


_PROMPT_TURN = re.compile(r"<\|im_start\|>(?:user|system)\n.*?<\|im_end\|>", re.DOTALL)


def prompt_spans(doc: str) -> list[tuple[int, int]]:
    """Character spans of a document's user and system turns, from the role name through ``<|im_end|>``.

    Pretraining leaves these out of the loss: the operands of a question are random draws nothing
    can predict, and their gradient would only drown the replies' (the part a chat model is for).
    The ``<|im_start|>`` before each turn stays in, so the model learns where turns begin.
    """
    return [(m.start() + len(IM_START), m.end()) for m in _PROMPT_TURN.finditer(doc)]


def load_paragraphs() -> list[str]:
    text = (resources.files("lorafleet.platform.modeling") / "data" / "simple_english.txt").read_text("utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def generate_corpus(*, seed: int, mix: CorpusSize) -> list[str]:
    """Every document of one corpus, shuffled; the same seed and mix give the same list."""
    rng = random.Random(seed)
    paragraphs = load_paragraphs()
    docs: list[str] = list(paragraphs)  # each shipped paragraph at least once
    docs += [_prose_doc(rng, paragraphs) for _ in range(mix.prose)]
    docs += [_arithmetic_text_doc(rng) for _ in range(mix.arithmetic_text)]

    def system() -> str | None:
        return rng.choice(_SYSTEM_PROMPTS) if rng.random() < 0.15 else None

    for _ in range(mix.chat_arith_single):
        a, op, b, c = _arith(rng, digits=1)
        docs.append(_chat([(_arith_question(rng, a, op, b), str(c))], system=system()))
    for _ in range(mix.chat_arith_double):
        a, op, b, c = _arith(rng, digits=2)
        docs.append(_chat([(_arith_question(rng, a, op, b), str(c))], system=system()))
    for _ in range(mix.chat_say):
        docs.append(_chat([_say_turn(rng) for _ in range(rng.randint(1, 2))], system=system()))
    for _ in range(mix.chat_facts):
        docs.append(_chat([rng.choice(_FACTS) for _ in range(rng.randint(1, 2))], system=system()))
    for _ in range(mix.chat_color_pick):
        color = rng.choice(COLORS)
        docs.append(_chat([(rng.choice(COLOR_PICK_PROMPTS), color.capitalize() + ".")], system=system()))
    rng.shuffle(docs)
    return docs
