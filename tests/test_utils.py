"""The shared statistics helpers behind every benchmark report (forgetting benchmark, continual learning)."""

from __future__ import annotations

import math

import pytest

from peft_hft.utils import mean_interval, mean_std, t95


def test_t95_is_students_quantile_with_the_next_smaller_tabulated_df():
    assert t95(2) == 4.303 and t95(12) == t95(10) == 2.228 and t95(100) == 1.96
    assert math.isnan(t95(0))


def test_mean_interval_is_the_t_interval_of_the_mean():
    stat = mean_interval([1.0, 2.0, 6.0])
    assert stat["mean"] == pytest.approx(3.0) and stat["n"] == 3 and stat["values"] == [1.0, 2.0, 6.0]
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2)
    assert stat["std"] == pytest.approx(std)
    half = 4.303 * std / math.sqrt(3)
    assert stat["ci95"] == pytest.approx([3.0 - half, 3.0 + half])


def test_a_single_value_has_no_interval_and_no_values_no_mean():
    assert mean_interval([2.5]) == {"mean": 2.5, "std": 0.0, "n": 1, "values": [2.5], "ci95": None}
    assert mean_std([]) == {"mean": None, "std": None, "n": 0, "values": []}
