"""The refine benchmark's paired comparison: which held-out prompts a cell gains and loses against refine off,
and the exact sign test over those flips, against hand-computed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from refine_quality import paired


def test_flips_are_counted_each_way_and_ties_are_not_flips():
    off = {"a": False, "b": True, "c": True, "d": False, "e": True}
    cell = {"a": True, "b": False, "c": True, "d": False, "e": False}
    gained, lost, p = paired(cell, off)
    assert (gained, lost) == (1, 2)
    assert p == pytest.approx(1.0)  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8, capped at 1


def test_the_sign_test_is_exact_and_two_sided():
    off = {str(i): False for i in range(10)}
    cell = {str(i): i < 8 for i in range(10)}  # 8 gained, 0 lost, 2 unchanged
    assert paired(cell, off) == (8, 0, pytest.approx(2 / 2**8))
    cell = {str(i): i < 6 for i in range(10)} | {"x": True, "y": True}
    off |= {"x": False, "y": False}
    off["0"] = off["1"] = True  # gained: 2..5, x, y; 0 and 1 right in both, 6..9 wrong in both
    gained, lost, p = paired(cell, off)
    assert (gained, lost) == (6, 0) and p == pytest.approx(2 / 2**6)
    with pytest.raises(AssertionError, match="same held-out prompts"):
        paired({"a": True}, {"b": True})
