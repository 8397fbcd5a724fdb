"""Paired bootstrap and McNemar's exact test against scipy's exact distributions."""

import numpy as np
import pytest
from scipy import stats as st

from specialkit import stats


def test_bootstrap_interval_of_one_accuracy_matches_clopper_pearson():
    rng = np.random.default_rng(1)
    correct = np.zeros(2000, dtype=bool)
    correct[:1800] = True
    rng.shuffle(correct)
    lo, hi = stats.paired_bootstrap({"m": correct}, resamples=4000, seed=0).top1_ci("m")
    cp = st.binomtest(1800, 2000).proportion_ci(confidence_level=0.95, method="exact")
    assert lo < 0.9 < hi
    assert abs(lo - cp.low) < 0.004 and abs(hi - cp.high) < 0.004


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(2)
    a = rng.random(500) < 0.8
    b = a.copy()
    b[:10] = True  # b fixes some of a's errors, never breaks one
    b1 = stats.paired_bootstrap({"a": a, "b": b}, resamples=1000, seed=5)
    b2 = stats.paired_bootstrap({"a": a, "b": b}, resamples=1000, seed=5)
    assert b1.gain_ci("b", "a") == b2.gain_ci("b", "a")
    assert np.all(b1.accuracy("b") - b1.accuracy("a") >= 0)  # paired: the same resamples for both
    assert b1.gain_ci("a", "a") == (0.0, 0.0)


def test_mcnemar_equals_scipy_binomtest_on_discordant_pairs():
    a = np.array([True] * 50 + [False] * 30 + [True] * 5 + [False] * 15)
    b = np.array([True] * 50 + [False] * 30 + [False] * 5 + [True] * 15)
    res = stats.mcnemar(a, b)
    assert (res.fixed, res.broken) == (15, 5)
    assert res.p_value == pytest.approx(st.binomtest(15, 20, 0.5).pvalue, rel=1e-12)
    assert stats.mcnemar(a, a).p_value == 1.0


def test_verdict_reads_intervals():
    assert stats.verdict((0.01, 0.03), 0.001) == "better"
    assert stats.verdict((-0.03, -0.01), 0.001) == "worse"
    assert stats.verdict((-0.01, 0.03), 0.4) == "indistinguishable"
    assert stats.verdict((0.001, 0.03), 0.2) == "indistinguishable"  # interval and test disagree: not claimed


def test_share_and_relative_gain_intervals():
    rng = np.random.default_rng(3)
    gen = rng.random(3000) < 0.7
    ens = gen.copy()
    ens[np.flatnonzero(~gen)[:200]] = True
    student = gen.copy()
    student[np.flatnonzero(~gen)[:100]] = True
    b = stats.paired_bootstrap({"gen": gen, "ens": ens, "student": student}, resamples=1000, seed=0)
    lo, hi = b.share_ci("student", "gen", "ens")
    assert lo < 0.5 < hi and hi <= 1.0
    rlo, rhi = stats.subset_relative_gain_ci(gen, ens, resamples=1000)
    true = 200 / gen.sum()
    assert rlo < true < rhi


def test_bad_input_is_a_clear_error():
    with pytest.raises(stats.StatsError, match="same images"):
        stats.mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(stats.StatsError, match="boolean"):
        stats.paired_bootstrap({"a": np.ones(3)})


def test_a_latency_ratio_is_taken_within_rounds_so_a_machine_slowing_down_does_not_move_it():
    rng = np.random.default_rng(0)
    reference = np.linspace(1.0, 8.0, 21)  # the machine slows down eightfold across the rounds
    measured = 1.4 * reference * rng.uniform(0.98, 1.02, 21)
    r = stats.latency_ratio(measured, reference)
    assert r.lo <= r.ratio <= r.hi and r.rounds == 21
    assert r.lo > 1.38 and r.hi < 1.42  # the ratio within a round is 1.4 (±2%) whatever the load that round
    assert r.against(1.5) == "met" and r.against(1.3) == "not met" and r.against(1.4) == "undecided"
    assert str(r).startswith("1.4") and "[" in str(r)
    exact = stats.latency_ratio(np.array([2.0, 4.0]), np.array([1.0, 2.0]))
    assert (exact.ratio, exact.lo, exact.hi) == (2.0, 2.0, 2.0)


def test_a_latency_ratio_over_blocks_holds_the_variation_between_blocks():
    """Rounds tight within a block, blocks apart (networks built afresh land elsewhere in memory): the interval over
    rounds alone is too narrow; the two-level one spans the blocks."""
    rng = np.random.default_rng(1)
    shifts = np.repeat([1.25, 1.32, 1.40], 10)  # three blocks of ten rounds
    reference = rng.uniform(0.9, 1.1, 30)
    measured = reference * shifts * rng.uniform(0.995, 1.005, 30)
    labels = np.repeat([0, 1, 2], 10)
    rounds_only = stats.latency_ratio(measured, reference)
    blocked = stats.latency_ratio(measured, reference, blocks=labels)
    assert blocked.ratio == rounds_only.ratio and (blocked.rounds, blocked.blocks, rounds_only.blocks) == (30, 3, 1)
    assert blocked.hi - blocked.lo > 1.5 * (rounds_only.hi - rounds_only.lo)
    assert blocked.lo < 1.27 and blocked.hi > 1.38  # reaches towards both outer blocks
    assert blocked.against(1.3) == "undecided"
    one = stats.latency_ratio(measured, reference, blocks=np.zeros(30))  # one block: the rounds-only interval
    assert (one.lo, one.hi) == (rounds_only.lo, rounds_only.hi)
    with pytest.raises(stats.StatsError, match="blocks must label each of the 30 rounds"):
        stats.latency_ratio(measured, reference, blocks=labels[:5])


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ([1.0, 2.0], [1.0], "equal"),
        ([1.0], [1.0], "R >= 2"),
        ([1.0, 0.0], [1.0, 1.0], "positive"),
    ],
)
def test_latency_ratio_refuses_times_that_do_not_pair(a, b, match):
    with pytest.raises(stats.StatsError, match=match):
        stats.latency_ratio(np.array(a), np.array(b))
