"""The paired bootstrap of the quality benchmark (benchmarks/quality/stats.py) against hand-computed cases."""

import itertools

import pytest
import torch

from benchmarks.quality.stats import pack, paired_bootstrap, unpack


def test_identical_merges_differ_by_exactly_zero():
    a = {"t": torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool)}
    d = paired_bootstrap(a, a, {"t": 0.8})
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0) and not d.significant


def test_one_task_three_items_matches_the_exact_bootstrap_distribution():
    """A right on items 0, 1; B right on item 1 only: per-item differences (1, 0, 0). Over the 27 equally likely
    resamples the mean difference is k/3 with k ~ Binomial(3, 1/3): P(0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27,
    P(1) = 1/27. Normalized by the own adapter's accuracy 0.5 (values 2k/3), the 2.5% point is 0 (P(0) > 2.5%)
    and the 97.5% point is 2 (P(k = 3) = 3.7% > 2.5%)."""
    a = {"t": torch.tensor([True, True, False])}
    b = {"t": torch.tensor([False, True, False])}
    exact = sorted(sum(x) / 3 / 0.5 for x in itertools.product([1, 0, 0], repeat=3))
    assert exact[0] == 0 and exact[-1] == pytest.approx(2) and exact.count(exact[-1]) == 1
    d = paired_bootstrap(a, b, {"t": 0.5}, resamples=20000)
    assert d.value == pytest.approx((1 / 3) / 0.5)
    assert d.low == 0.0 and d.high == pytest.approx(2)
    assert not d.significant  # 8/27 of the resamples show no difference


def test_a_large_consistent_gain_is_significant_and_averaged_over_tasks():
    n = 300
    a = {"x": torch.ones(n, dtype=torch.bool), "y": torch.arange(n) % 2 == 0}
    b = {"x": torch.arange(n) % 2 == 0, "y": torch.arange(n) % 2 == 0}
    d = paired_bootstrap(a, b, {"x": 1.0, "y": 0.5})
    assert d.value == pytest.approx((0.5 / 1.0 + 0.0) / 2)  # task y: no difference; x: +0.5
    assert d.significant and d.low > 0.2 and d.high < 0.3


def test_different_items_are_refused():
    with pytest.raises(ValueError, match="different items"):
        paired_bootstrap({"t": torch.ones(3, dtype=torch.bool)}, {"t": torch.ones(4, dtype=torch.bool)}, {"t": 1.0})


def test_pack_round_trip():
    c = torch.tensor([True, False, False, True])
    assert pack(c) == "1001" and torch.equal(unpack(pack(c)), c)
