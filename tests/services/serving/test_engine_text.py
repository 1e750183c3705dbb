"""Streaming text pieces of the torch engine: stop strings across arbitrary chunk boundaries, and
incremental detokenization that never splits a character or drops a space."""

from __future__ import annotations

import pytest

from lorafleet.services.serving.engine._text import IncrementalDetokenizer, StopStringFilter
from tests.services.serving.conftest import ServingBase

# (stop strings, pushed deltas, released pieces (one per push, then the final flush), stopped)
STOP_CASES = [
    ((), ["ab", "cd"], ["ab", "cd", ""], False),
    (("x",), ["ab", "cd"], ["ab", "cd", ""], False),
    (("cd",), ["ab", "cd", "ef"], ["ab", "", "", ""], True),
    # the stop string straddles two deltas; its first half is held, then dropped
    (("cd",), ["abc", "de"], ["ab", "", ""], True),
    # a held prefix that does not complete is released as soon as it cannot
    (("cd",), ["abc", "xe"], ["ab", "cxe", ""], False),
    # held to the end of generation, then released by the flush
    (("cde",), ["abcd"], ["ab", "cd"], False),
    # the match that starts first wins, whichever stop string it is
    (("zz", "bz"), ["a", "bzz"], ["a", "", ""], True),
    (("<end>",), ["hi <e", "n", "d> bye"], ["hi ", "", "", ""], True),
    # a stop string made of one repeated character: only the longest real prefix is held
    (("!!!",), ["a!", "!b", "!!!"], ["a", "!!b", "", ""], True),
]


@pytest.mark.parametrize(("stop", "deltas", "released", "stopped"), STOP_CASES)
def test_stop_string_filter(stop: tuple[str, ...], deltas: list[str], released: list[str], stopped: bool) -> None:
    f = StopStringFilter(stop)
    got = [f.push(d) for d in deltas] + [f.flush()]
    assert got == released
    assert f.stopped is stopped
    text = "".join(got)
    assert not any(s in text for s in stop)


def test_incremental_detokenizer_matches_full_decode(serving_base: ServingBase) -> None:
    tok = serving_base.tokenizer
    text = "What is 12 + 7? The sky is blue, naïve café — 19!"
    ids = tok.encode(text)
    for step in (1, 2, 3):
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)] + [detok.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        # no piece ends inside a multi-byte character
        assert not any(p.endswith("\ufffd") for p in pieces)
