"""Uncertainty of every comparison: paired bootstrap intervals and McNemar's exact test.

Two models evaluated on the *same* test images are compared on the paired outcomes (docs/METHOD.md §7):

* :func:`mcnemar` -- McNemar's exact test on the discordant images: ``fixed`` (first model wrong,
  second right) against ``broken`` (first right, second wrong), a two-sided binomial test with
  p = 1/2 (``scipy.stats.binomtest``).
* :func:`paired_bootstrap` -- one set of resampled test-image indices (seeded, vectorised) shared by
  every model, so that every interval -- of one accuracy, of a difference, of a ratio of gains -- is
  computed on the same resamples and stays paired.
* :func:`verdict` -- the plain-words reading of a difference: ``better``, ``worse`` or
  ``indistinguishable`` at the 5% level.

>>> import numpy as np
>>> a = np.array([1, 1, 0, 0, 1], dtype=bool); b = np.array([1, 1, 1, 0, 1], dtype=bool)
>>> mcnemar(a, b).fixed, mcnemar(a, b).broken
(1, 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy import stats as _st

from . import checks
from .errors import SpecialkitError
from .typing import Mask

__all__ = [
    "MIN_SEEDS",
    "TIE_MARGIN",
    "TwoLevel",
    "two_level_bootstrap",
    "holm",
    "across_seed_verdict",
    "StatsError",
    "McNemar",
    "mcnemar",
    "Bootstrap",
    "paired_bootstrap",
    "verdict",
    "ALPHA",
    "MIN_ROW",
    "LatencyRatio",
    "latency_ratio",
]

ALPHA = 0.05
"""Significance level of every test and 1 - coverage of every interval (95% intervals)."""
MIN_ROW = 30
"""Rows of a breakdown with fewer test examples than this are marked too small to read."""


class StatsError(SpecialkitError, ValueError):
    """Inputs to a statistic do not fit together; the message names the problem and the fix."""


def _correct(a: Mask, name: str) -> np.ndarray:
    return checks.as_bools(a, (-1,), name=name, error=StatsError, fix="pass per-image correctness (pred == y)")


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two models on the same images.

    Attributes:
        fixed: images the first model got wrong and the second right.
        broken: images the first model got right and the second wrong.
        p_value: two-sided exact binomial p-value of ``fixed`` out of ``fixed + broken`` at 1/2
            (1.0 when there is no discordant image).
    """

    fixed: int
    broken: int
    p_value: float


def mcnemar(first_correct: Mask, second_correct: Mask) -> McNemar:
    """McNemar's exact test: is the second model's accuracy different from the first's?

    Args:
        first_correct: (N,) bool, the first (reference) model's correctness per image.
        second_correct: (N,) bool, the second model's, on the same images in the same order.
    """
    a, b = _correct(first_correct, "first_correct"), _correct(second_correct, "second_correct")
    if a.shape != b.shape:
        raise StatsError(f"both models must be scored on the same images: {a.shape[0]} vs {b.shape[0]} outcomes")
    fixed, broken = int((~a & b).sum()), int((a & ~b).sum())
    n = fixed + broken
    p = 1.0 if n == 0 else float(_st.binomtest(fixed, n, 0.5, alternative="two-sided").pvalue)
    return McNemar(fixed=fixed, broken=broken, p_value=min(1.0, p))


class Bootstrap:
    """Paired bootstrap over test images: ``resamples`` index sets drawn once, shared by every model.

    Args:
        correct: name -> (N,) bool correctness of each model on the same N images.
        resamples: number of bootstrap resamples B (>= 1000 for a 95% interval).
        seed: seed of the resampling (same seed, same intervals).
        chunk: resamples drawn per block (bounds memory at ``chunk * N`` indices).

    Each model's per-resample accuracy is kept, (B,), so differences and ratios are paired.
    """

    def __init__(self, correct: Mapping[str, Mask], *, resamples: int = 2000, seed: int = 0, chunk: int = 500):
        if not correct:
            raise StatsError("no models to bootstrap: pass name -> (N,) correctness arrays")
        if resamples < 100:
            raise StatsError(f"resamples={resamples}: use at least 1000 for a 95% interval")
        arrays = {name: _correct(c, name) for name, c in correct.items()}
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise StatsError(f"every model must be scored on the same images; got sizes {sorted(sizes)}")
        n = sizes.pop()
        if n == 0:
            raise StatsError("no test images: a bootstrap over an empty split is undefined")
        self.n, self.resamples, self.seed = n, resamples, seed
        self.correct = arrays
        names = list(arrays)
        mat = np.stack([arrays[k] for k in names]).astype(np.float64)  # (M, N)
        rng = np.random.default_rng(seed)
        out = np.empty((len(names), resamples))
        for start in range(0, resamples, chunk):
            stop = min(resamples, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            rows = stop - start
            flat = (idx + (np.arange(rows) * n)[:, None]).ravel()
            counts = np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)  # (b, N)
            out[:, start:stop] = (mat @ counts.T) / n
        self._acc = dict(zip(names, out))

    def accuracy(self, name: str) -> np.ndarray:
        """(B,) the model's accuracy on every resample."""
        if name not in self._acc:
            raise StatsError(f"{name!r} is not among the bootstrapped models {list(self._acc)}")
        return self._acc[name]

    def interval(self, values: np.ndarray) -> tuple[float, float]:
        """Percentile 95% interval of (B,) resampled values (NaNs, e.g. 0/0 ratios, are dropped)."""
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            return (float("nan"), float("nan"))
        lo, hi = np.quantile(v, [ALPHA / 2, 1 - ALPHA / 2])
        return (float(lo), float(hi))

    def top1_ci(self, name: str) -> tuple[float, float]:
        """95% interval of one model's top-1."""
        return self.interval(self.accuracy(name))

    def gain_ci(self, name: str, baseline: str) -> tuple[float, float]:
        """95% interval of ``top1(name) - top1(baseline)`` (absolute points, paired)."""
        return self.interval(self.accuracy(name) - self.accuracy(baseline))

    def share_ci(self, name: str, baseline: str, reference: str) -> tuple[float, float]:
        """95% interval of ``(name - baseline) / (reference - baseline)``: the share of the reference's gain
        that ``name`` keeps (resamples where the reference gains nothing are dropped)."""
        num = self.accuracy(name) - self.accuracy(baseline)
        den = self.accuracy(reference) - self.accuracy(baseline)
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.interval(np.where(den > 0, num / den, np.nan))


def paired_bootstrap(correct: Mapping[str, Mask], *, resamples: int = 2000, seed: int = 0) -> Bootstrap:
    """A :class:`Bootstrap` over ``correct`` (name -> (N,) bool on the same images)."""
    return Bootstrap(correct, resamples=resamples, seed=seed)


def subset_relative_gain_ci(
    gen_correct: Mask, ens_correct: Mask, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% paired-bootstrap interval of the relative gain ``(ens - gen) / gen`` (counts of correct images),
    the paper's Table 4 statistic, on one subset of test images."""
    g, e = _correct(gen_correct, "gen_correct"), _correct(ens_correct, "ens_correct")
    if len(g) == 0:
        return (float("nan"), float("nan"))
    b = Bootstrap({"gen": g, "ens": e}, resamples=resamples, seed=seed)
    gen_acc, ens_acc = b.accuracy("gen"), b.accuracy("ens")
    with np.errstate(divide="ignore", invalid="ignore"):
        return b.interval(np.where(gen_acc > 0, (ens_acc - gen_acc) / gen_acc, np.nan))


def verdict(ci: tuple[float, float] | list[float] | None, p_value: float | None = None) -> str:
    """``"better"``, ``"worse"`` or ``"indistinguishable"``: the interval of a difference excludes 0 on
    one side (and, when given, McNemar's p < 0.05), or it does not."""
    if ci is None or any(v is None or not np.isfinite(v) for v in ci):
        return "indistinguishable"
    lo, hi = ci
    significant = p_value is None or p_value < ALPHA
    if lo > 0 and significant:
        return "better"
    if hi < 0 and significant:
        return "worse"
    return "indistinguishable"


# ----------------------------------------------------------------------------------------- across seeds
MIN_SEEDS = 5
"""Fewer seeds than this get no across-seed verdict: the between-seed spread is too poorly known."""

TIE_MARGIN = 0.005
"""Default equivalence margin (a proportion: 0.5 points of top-1): an interval inside ±margin reads "equivalent"."""


@dataclass(frozen=True)
class TwoLevel:
    """The mean gain across seeds with an interval that holds both sources of variation.

    Attributes:
        mean: mean over seeds of the per-seed gain (a proportion).
        lo, hi: the 95% percentile interval of the two-level bootstrap.
        p_value: two-sided bootstrap p-value of "no gain" (the share of resamples on the other side of 0, doubled).
        seeds: how many seeds.
    """

    mean: float
    lo: float
    hi: float
    p_value: float
    seeds: int


def two_level_bootstrap(diffs: np.ndarray, *, resamples: int = 2000, seed: int = 0) -> TwoLevel:
    """Bootstrap the mean gain over seeds and test images together.

    Each resample draws the seeds with replacement (the training noise) and, once for all seeds, the test
    images with replacement (the test-set noise every seed shares, which a t interval over the per-seed gains
    leaves out); the statistic is the mean over the drawn seeds of each seed's gain on the drawn images.

    Args:
        diffs: (S, N) per seed and test image, rule correct minus baseline correct (-1, 0 or 1), the same N
            test images in the same order for every seed.
        resamples: bootstrap resamples.
        seed: of the resampling.

    Returns:
        :class:`TwoLevel`.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"diffs must be (seeds, test images) with both >= 1, got shape {d.shape}")
    s, n = d.shape
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for start in range(0, resamples, 250):  # blocks keep the (block, N) image counts small
        b = min(250, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # (b, N), shared by the seeds
        per_seed = counts @ d.T / n  # (b, S)
        pick = rng.integers(0, s, size=(b, s))
        boot[start : start + b] = np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    p = min(1.0, 2 * min((np.sum(boot <= 0) + 1) / (resamples + 1), (np.sum(boot >= 0) + 1) / (resamples + 1)))
    return TwoLevel(mean=float(d.mean()), lo=float(lo), hi=float(hi), p_value=float(p), seeds=s)


def holm(p_values: np.ndarray | list[float]) -> np.ndarray:
    """Holm's step-down adjustment of p-values for the many comparisons of one study (family-wise error).

    Args:
        p_values: (K,) raw p-values (NaN entries are left NaN and do not count).

    Returns:
        (K,) adjusted p-values: compare each with ALPHA.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def across_seed_verdict(lo: float, hi: float, p_adjusted: float, seeds: int, *, margin: float = TIE_MARGIN) -> str:
    """The reading of an across-seed gain: ``"too few seeds"`` below :data:`MIN_SEEDS`; ``"better"`` /
    ``"worse"`` when the interval excludes 0 and the Holm-adjusted p is below ALPHA; ``"equivalent"`` when the
    interval lies inside ±``margin``; else ``"indistinguishable"``."""
    if seeds < MIN_SEEDS:
        return "too few seeds"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "indistinguishable"
    if p_adjusted < ALPHA and (lo > 0 or hi < 0):
        return "better" if lo > 0 else "worse"
    if margin > 0 and -margin < lo and hi < margin:
        return "equivalent"
    return "indistinguishable"


@dataclass(frozen=True)
class LatencyRatio:
    """How many times slower one callable is than another, from times taken in the same rounds.

    Attributes:
        ratio: the median over rounds of ``numerator / denominator`` within a round.
        lo, hi: a percentile-bootstrap 95% interval of that median, resampling rounds (and blocks, where there are
            several: see :func:`latency_ratio`).
        rounds: the rounds timed.
        blocks: the blocks the rounds came in (1: one).
    """

    ratio: float
    lo: float
    hi: float
    rounds: int
    blocks: int = 1

    def against(self, limit: float) -> str:
        """``"met"`` when the whole interval is at or under ``limit``, ``"not met"`` when it is all above, else
        ``"undecided"`` (the interval holds the limit: time more rounds, or on a quieter machine)."""
        if self.hi <= limit:
            return "met"
        return "not met" if self.lo > limit else "undecided"

    def __str__(self) -> str:
        return f"{self.ratio:.3f}x [{self.lo:.3f}, {self.hi:.3f}]"


def latency_ratio(
    numerator: np.ndarray,
    denominator: np.ndarray,
    *,
    blocks: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> LatencyRatio:
    """The ratio of two callables' latencies timed interleaved (``evaluation.measure_latency_rounds``), with its
    uncertainty: a ratio is taken within each round, where both met the same load, and the median of the per-round
    ratios is reported with a bootstrap interval over rounds (``scipy.stats.bootstrap``, percentile method), so a
    machine that speeds up or slows down between rounds widens the interval instead of moving the number.

    Rounds may come in blocks, each timing the two built afresh (new tensors, new memory): a block's rounds vary
    less than blocks do, so the interval then resamples blocks and, within each block drawn, its rounds (a
    two-level percentile bootstrap of the median of all rounds drawn).

    Args:
        numerator: (R,) seconds per image of the callable measured, one per round.
        denominator: (R,) seconds per image of the reference, same rounds.
        blocks: (R,) the block of each round (any labels); None = one block.
        resamples: bootstrap resamples.
        seed: the bootstrap's seed.

    Returns:
        The :class:`LatencyRatio`.
    """
    a, b = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise StatsError(f"need two equal (R,) arrays of per-round times with R >= 2; got shapes {a.shape}, {b.shape}")
    if not (np.all(a > 0) and np.all(b > 0)):
        raise StatsError("latencies must be positive seconds; a zero or negative time is a timing error")
    labels = np.zeros(len(a), dtype=np.int64) if blocks is None else np.asarray(blocks)
    if labels.shape != a.shape:
        raise StatsError(f"blocks must label each of the {len(a)} rounds; got shape {labels.shape}")
    r = a / b
    groups = [r[labels == u] for u in np.unique(labels)]
    if np.ptp(r) == 0:
        return LatencyRatio(float(r[0]), float(r[0]), float(r[0]), len(r), len(groups))
    if len(groups) == 1:
        ci = _st.bootstrap(
            (r,), np.median, n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed)
        ).confidence_interval
        return LatencyRatio(float(np.median(r)), float(ci.low), float(ci.high), len(r))
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for i in range(resamples):
        drawn = (groups[j] for j in rng.integers(0, len(groups), len(groups)))
        boot[i] = np.median(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in drawn]))
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    return LatencyRatio(float(np.median(r)), float(lo), float(hi), len(r), len(groups))
