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
from .typing import Mask

__all__ = [
    "StatsError",
    "McNemar",
    "mcnemar",
    "Bootstrap",
    "paired_bootstrap",
    "verdict",
    "ALPHA",
    "MIN_ROW",
]

ALPHA = 0.05
"""Significance level of every test and 1 - coverage of every interval (95% intervals)."""
MIN_ROW = 30
"""Rows of a breakdown with fewer test examples than this are marked too small to read."""


class StatsError(ValueError):
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


def subset_relative_gain_ci(gen_correct: Mask, ens_correct: Mask, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
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
