"""How the multi-policy step groups runs into forward/backward passes under a token bound."""

from __future__ import annotations

import pytest
import torch

from lorafleet.services.trainer.data import Batch
from lorafleet.services.trainer.recipes import StepPlan
from lorafleet.services.trainer.scheduler import _passes


def _plan(rows: int, width: int) -> StepPlan:
    ones = torch.ones(rows, width, dtype=torch.bool)
    return StepPlan(Batch(torch.zeros(rows, width, dtype=torch.long), ones, ones))


@pytest.mark.parametrize(
    ("shapes", "max_tokens", "expected"),
    [
        # equal runs, a bound of one run each: one pass per run (the default for equal runs)
        ([(48, 20)] * 4, 960, [[0], [1], [2], [3]]),
        # a bound of two runs: pairs, in order
        ([(48, 20)] * 4, 1920, [[0, 1], [2, 3]]),
        # no effective bound: everything in one pass
        ([(48, 20)] * 4, 10**9, [[0, 1, 2, 3]]),
        # padding counts: a wide run makes the pass wider for every row in it
        ([(4, 10), (4, 30)], 200, [[0], [1]]),
        ([(4, 10), (4, 30)], 240, [[0, 1]]),
        # a run larger than the bound is never split, it gets a pass alone
        ([(2, 10), (100, 50), (2, 10)], 100, [[0], [1], [2]]),
    ],
)
def test_runs_are_packed_into_passes_under_the_token_bound(
    shapes: list[tuple[int, int]], max_tokens: int, expected: list[list[int]]
) -> None:
    assert _passes([_plan(*s) for s in shapes], max_tokens) == expected
