"""What the generalist confuses: confusion matrix, prediction covariance, class similarity.

Everything here is a pure numpy function of the generalist's predictions on held-out data
(the validation split, never the test split)::

    >>> s = summarise(y_val, probs_val, class_names)      # cm, F, covariance, distance, accuracy
    >>> top_confused_pairs(s.cm, class_names, k=10)        # a pandas table
    >>> clusters.covariance_kmeans(s.covariance, class_names, k=6)

Conventions fixed here (the rest of the package relies on them):

* ``cm[i, j]`` counts examples of **true** class ``i`` predicted as ``j`` (rows = truth).
* ``F = row_normalise(cm)``: row ``i`` is the distribution of predictions for class ``i``;
  classes with no examples keep an all-zero row.
* :func:`prediction_covariance` is the **population** covariance (divide by ``N``, like
  ``np.cov(probs, rowvar=False, bias=True)``); ``ddof=1`` gives the sample covariance.
* :func:`confusion_distance` is HD-CNN's distance ``1 - (F_ij + F_ji) / 2`` off the diagonal,
  0 on it (see its docstring for how this reads the paper's formula).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from . import checks
from .errors import SpecialkitError
from .typing import Labels, Matrix, Probs

__all__ = [
    "ConfusionError",
    "ConfusionSummary",
    "confusion_matrix",
    "soft_confusion_matrix",
    "row_normalise",
    "per_class_accuracy",
    "prediction_covariance",
    "confusion_distance",
    "class_similarity",
    "top_confused_pairs",
    "class_map",
    "warm_umap_cache",
    "class_mean_features",
    "summarise",
    "CLASS_MAP_METHODS",
]

CLASS_MAP_METHODS = ("umap", "pca", "mds")


class ConfusionError(SpecialkitError, ValueError):
    """Bad input to a confusion/covariance function; the message names the problem and the fix."""


# --------------------------------------------------------------------------- validation helpers


def _labels(y: Labels, name: str) -> np.ndarray:
    return checks.as_labels(y, name=name, error=ConfusionError, integral_floats=True)


def _square(m: Matrix, name: str) -> np.ndarray:
    return checks.as_square(m, name=name, error=ConfusionError)


def _probs(probs: Probs) -> np.ndarray:
    return checks.as_probs(probs, name="probs", error=ConfusionError)


# --------------------------------------------------------------------------- confusion


def confusion_matrix(y_true: Labels, y_pred: Labels | Probs, num_classes: int | None = None) -> np.ndarray:
    """Count (true class, predicted class) pairs.

    Args:
        y_true: (N,) int true labels in ``[0, C)``.
        y_pred: (N,) int predicted labels, or (N, C) probabilities (their argmax is taken).
        num_classes: C. Required with label predictions; inferred from (N, C) probabilities.

    Returns:
        (C, C) int64, ``cm[i, j]`` = number of examples of true class ``i`` predicted as ``j``.
    """
    yt = _labels(y_true, "y_true")
    pred = np.asarray(y_pred)
    if pred.ndim == 2:
        if num_classes is not None and pred.shape[1] != num_classes:
            raise ConfusionError(
                f"y_pred has {pred.shape[1]} columns but num_classes={num_classes}; pass matching shapes"
            )
        num_classes = pred.shape[1]
        pred = pred.argmax(axis=1) if pred.shape[0] else np.zeros(0, dtype=np.int64)
    if num_classes is None:
        raise ConfusionError("num_classes is required when y_pred holds labels; pass num_classes=len(class_names)")
    yp = _labels(pred, "y_pred")
    if yt.shape != yp.shape:
        raise ConfusionError(
            f"y_true has {yt.shape[0]} labels but y_pred has {yp.shape[0]}; pass predictions for the same examples"
        )
    c = int(num_classes)
    if c < 1:
        raise ConfusionError(f"num_classes must be >= 1, got {num_classes}")
    for name, y in (("y_true", yt), ("y_pred", yp)):
        checks.check_label_range(y, c, name=name, error=ConfusionError)
    return np.bincount(yt * c + yp, minlength=c * c).reshape(c, c).astype(np.int64)


def soft_confusion_matrix(y_true: Labels, probs: Probs) -> np.ndarray:
    """Expected confusion counts: the predicted probabilities summed per true class.

    ``M[i, j] = Σ_{n: y_n = i} probs[n, j]``; row ``i`` sums to the number of examples of class
    ``i``, and ``row_normalise(M)[i]`` is the mean predicted distribution of class ``i``. Unlike
    :func:`confusion_matrix` it is dense even when the generalist makes few argmax errors, so it
    can stand in for ``cm`` in :func:`confusion_distance` and ``clusters.grow_overlap``.

    Args:
        y_true: (N,) int labels in ``[0, C)``.
        probs: (N, C) predicted probabilities.

    Returns:
        (C, C) float64.
    """
    p = _probs(probs)
    yt = _labels(y_true, "y_true")
    if yt.shape[0] != p.shape[0]:
        raise ConfusionError(
            f"y_true has {yt.shape[0]} labels but probs has {p.shape[0]} rows; pass predictions for the same examples"
        )
    c = p.shape[1]
    checks.check_label_range(
        yt, c, name="y_true", error=ConfusionError, fix="check that probs has one column per class"
    )
    out = np.zeros((c, c))
    np.add.at(out, yt, p)
    return out


def row_normalise(cm: Matrix) -> np.ndarray:
    """Turn counts into rates per true class.

    Args:
        cm: (C, C) counts (rows = true class).

    Returns:
        (C, C) float64 ``F``; row ``i`` sums to 1, or stays all zero when class ``i`` has no examples.
    """
    m = _square(cm, "cm")
    if m.min() < 0:
        raise ConfusionError("cm has negative entries; pass counts or rates")
    totals = m.sum(axis=1, keepdims=True)
    return np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)


def per_class_accuracy(cm: Matrix) -> np.ndarray:
    """Recall of every class.

    Args:
        cm: (C, C) counts (rows = true class).

    Returns:
        (C,) float64 ``cm[i, i] / cm[i].sum()``; NaN for a class with no examples.
    """
    m = _square(cm, "cm")
    totals = m.sum(axis=1)
    out = np.full(m.shape[0], np.nan)
    np.divide(np.diag(m), totals, out=out, where=totals > 0)
    return out


def prediction_covariance(probs: Probs, *, ddof: int = 0) -> np.ndarray:
    """The paper's statistic: covariance of predicted probabilities across examples (no labels).

    ``cov[i, j] = mean_n (p_ni - mean_i)(p_nj - mean_j)`` — **population** covariance (``ddof=0``,
    divide by ``N``), equal to ``np.cov(probs, rowvar=False, bias=True)``. ``ddof=1`` divides by
    ``N - 1``. Since every row of ``probs`` sums to 1, every row/column of the result sums to 0:
    classes predicted together get positive entries, classes that exclude each other negative ones.

    Args:
        probs: (N, C) predicted probabilities (rows sum to 1).
        ddof: delta degrees of freedom (0 or 1).

    Returns:
        (C, C) float64 symmetric positive semi-definite matrix.
    """
    p = _probs(probs)
    n = p.shape[0]
    if n - ddof < 1:
        raise ConfusionError(f"need more than {ddof} examples for ddof={ddof}, got N={n}")
    centred = p - p.mean(axis=0, keepdims=True)
    cov = centred.T @ centred / (n - ddof)
    return (cov + cov.T) / 2


def confusion_distance(F: Matrix) -> np.ndarray:
    """HD-CNN's class distance from a confusion matrix.

    HD-CNN (Yan et al. 2015) writes ``D = ½[(I − F) + (I − F)ᵀ]`` with the diagonal set to 0.
    Read with ``I`` the identity, every off-diagonal entry would be ``−½(F_ij + F_ji) ≤ 0`` (not a
    distance). We use the matrix of ones in place of ``I``, which shifts every off-diagonal entry
    by +1 and keeps the ordering::

        D_ij = 1 − ½ (F_ij + F_ji)   (i ≠ j),    D_ii = 0.

    With row-normalised ``F`` this lies in ``[0, 1]``: 1 = never confused either way.

    Args:
        F: (C, C) row-normalised confusion rates (counts are row-normalised first).

    Returns:
        (C, C) float64 symmetric, zero diagonal, values in ``[0, 1]``.
    """
    f = row_normalise(F)
    d = 1.0 - (f + f.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def class_similarity(matrix: Matrix, kind: str = "covariance") -> np.ndarray:
    """A symmetric class-by-class similarity.

    * ``kind="covariance"``: ``matrix`` is a prediction covariance; returns the correlation
      ``cov_ij / sqrt(cov_ii cov_jj)`` in ``[-1, 1]`` (a class with zero variance gets 0 off the
      diagonal). Diagonal 1.
    * ``kind="confusion"``: ``matrix`` is a confusion matrix (counts or rates; row-normalised
      first); returns ``½(F_ij + F_ji)`` in ``[0, 1]`` (= ``1 - confusion_distance``). Diagonal 1.

    Args:
        matrix: (C, C).
        kind: ``"covariance"`` or ``"confusion"``.

    Returns:
        (C, C) float64 symmetric similarity with unit diagonal.
    """
    if kind == "covariance":
        cov = _square(matrix, "cov")
        sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        outer = np.outer(sd, sd)
        s = np.divide(cov, outer, out=np.zeros_like(cov), where=outer > 0)
        s = np.clip((s + s.T) / 2, -1.0, 1.0)
    elif kind == "confusion":
        f = row_normalise(matrix)
        s = (f + f.T) / 2
    else:
        raise ConfusionError(f"unknown kind {kind!r}; use kind='covariance' or kind='confusion'")
    np.fill_diagonal(s, 1.0)
    return s


def top_confused_pairs(
    cm: np.ndarray, class_names: tuple[str, ...] | list[str], k: int = 10, *, symmetric: bool = False
) -> pd.DataFrame:
    """The most frequent confusions, as a table.

    Only pairs with at least one error are listed. Ties are broken by rate, then class index.

    Args:
        cm: (C, C) counts (rows = true class).
        class_names: (C,) names.
        k: at most this many rows.
        symmetric: ``False`` — one row per direction, columns ``true, predicted, count, rate``
            (``rate = count / examples of the true class``). ``True`` — one row per unordered pair,
            columns ``class_a, class_b, count`` (both ways), ``a_as_b, b_as_a``, ``rate``
            (``count / examples of both classes``).

    Returns:
        pandas.DataFrame with at most ``k`` rows, most confused first.
    """
    m = _square(cm, "cm")
    names = tuple(class_names)
    if len(names) != m.shape[0]:
        raise ConfusionError(
            f"cm is {m.shape[0]}x{m.shape[0]} but {len(names)} class names were given; pass the dataset's class_names"
        )
    if k < 0:
        raise ConfusionError(f"k must be >= 0, got {k}")
    totals = m.sum(axis=1)
    if not symmetric:
        i, j = np.nonzero(m * (1 - np.eye(m.shape[0])))
        count = m[i, j]
        rate = count / totals[i]
        order = np.lexsort((j, i, -rate, -count))[:k]
        return pd.DataFrame(
            {
                "true": [names[t] for t in i[order]],
                "predicted": [names[p] for p in j[order]],
                "count": count[order].astype(np.int64),
                "rate": rate[order],
            }
        )
    pair = m + m.T
    i, j = np.nonzero(np.triu(pair, k=1))
    count = pair[i, j]
    rate = count / (totals[i] + totals[j])
    order = np.lexsort((j, i, -rate, -count))[:k]
    i, j = i[order], j[order]
    return pd.DataFrame(
        {
            "class_a": [names[t] for t in i],
            "class_b": [names[p] for p in j],
            "count": count[order].astype(np.int64),
            "a_as_b": m[i, j].astype(np.int64),
            "b_as_a": m[j, i].astype(np.int64),
            "rate": rate[order],
        }
    )


# --------------------------------------------------------------------------- class features / map


def class_mean_features(features: np.ndarray, y: Labels, num_classes: int) -> np.ndarray:
    """Average feature vector of every class.

    Args:
        features: (N, D) per-example features (e.g. the generalist's ``.features(x)``).
        y: (N,) int labels in ``[0, C)``.
        num_classes: C.

    Returns:
        (C, D) float64; the row of a class with no examples is NaN.
    """
    x = np.asarray(features, dtype=np.float64)
    yy = _labels(y, "y")
    if x.ndim != 2 or x.shape[0] != yy.shape[0]:
        raise ConfusionError(f"features must be (N, D) with N = len(y) = {yy.shape[0]}, got shape {x.shape}")
    checks.check_label_range(yy, num_classes, name="y", error=ConfusionError)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, yy, x)
    counts = np.bincount(yy, minlength=num_classes)[:, None]
    return np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0)


def class_map(
    features: np.ndarray,
    *,
    method: str = "umap",
    seed: int = 0,
    n_epochs: int | None = None,
    n_neighbors: int = 15,
    metric: str = "euclidean",
) -> np.ndarray:
    """2-D map of the classes (one point per class) for plotting.

    * ``"umap"``: ``umap.UMAP(n_components=2, random_state=seed, n_jobs=1)``; deterministic for
      a seed. UMAP needs ``n_neighbors < C``: the value used is ``min(n_neighbors, C - 1)``
      (so 15, or ``C - 1`` for fewer than 16 classes). Needs ``C >= 4``; use ``"pca"`` below that.
      ``n_epochs=None`` keeps UMAP's default (200 for small inputs); tests use ~20.
    * ``"pca"``: the first two principal components (exact SVD, signs fixed by scikit-learn).
    * ``"mds"``: metric MDS on Euclidean (or ``metric``) distances, ``random_state=seed``.

    Args:
        features: (C, D) one row per class (see :func:`class_mean_features`), finite.
        method: ``"umap"``, ``"pca"`` or ``"mds"``.
        seed: random seed (UMAP, MDS).
        n_epochs: UMAP optimisation epochs (``None`` = UMAP's default); ignored otherwise.
        n_neighbors: UMAP neighbourhood size before capping at ``C - 1``.
        metric: distance between feature rows (UMAP, MDS).

    Returns:
        (C, 2) float64 coordinates.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ConfusionError(f"features must be (C, D), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        bad = np.nonzero(~np.all(np.isfinite(x), axis=1))[0].tolist()
        raise ConfusionError(
            f"features rows {bad[:10]} are not finite (a class with no examples?); drop those rows or fill them"
        )
    c = x.shape[0]
    if method == "umap":
        if c < 4:
            raise ConfusionError(f"UMAP needs at least 4 classes, got {c}; use method='pca'")
        import torch

        threads = torch.get_num_threads()  # numba (under UMAP) resets the shared OpenMP thread count:
        try:  # restore it, or later training in this process runs with other threads and other numbers
            umap = _umap()
            reducer = umap.UMAP(
                n_components=2,
                n_neighbors=min(n_neighbors, c - 1),
                n_epochs=n_epochs,
                metric=metric,
                random_state=seed,
                n_jobs=1,
            )
            out = reducer.fit_transform(x)
        finally:
            torch.set_num_threads(threads)
    elif method == "pca":
        if c < 2 or x.shape[1] < 2:
            raise ConfusionError(f"PCA to 2-D needs at least 2 classes and 2 feature dims, got {x.shape}")
        from sklearn.decomposition import PCA

        out = PCA(n_components=2, svd_solver="full").fit_transform(x)
    elif method == "mds":
        if c < 3:
            raise ConfusionError(f"MDS needs at least 3 classes, got {c}; use method='pca'")
        from scipy.spatial.distance import pdist, squareform
        from sklearn.manifold import MDS

        dist = squareform(pdist(x, metric=metric))
        out = _mds(MDS, dist, seed)
    else:
        raise ConfusionError(f"unknown method {method!r}; use one of {CLASS_MAP_METHODS}")
    return np.asarray(out, dtype=np.float64)


def warm_umap_cache(seed: int = 0) -> float:
    """Compile UMAP's numba code into numba's on-disk cache (:func:`_umap`) by mapping 12 random classes once, from
    a precomputed distance matrix (as the clusters stage does) and from features, so that the first class map of
    every later process loads the machine code in about a second instead of compiling it for about 30 s.
    ``make setup`` runs it after installing; the class maps it makes are thrown away.

    Args:
        seed: the random classes' seed.

    Returns:
        The seconds it took (about 30 the first time on a 2-core CPU, a few once the cache is warm).
    """
    import time
    import warnings

    from scipy.spatial.distance import pdist, squareform

    t0 = time.perf_counter()
    x = np.random.default_rng(seed).normal(size=(12, 8))
    d = squareform(pdist(x))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="using precomputed metric")  # UMAP's note: no inverse_transform
        class_map(d, method="umap", metric="precomputed", seed=seed)
    class_map(x, method="umap", seed=seed)
    return time.perf_counter() - t0


@functools.cache
def _umap() -> Any:
    """The ``umap`` module (a slow import: numba), its numba-compiled functions set to cache their machine code on
    disk (numba's own cache: next to the installed package, or ``NUMBA_CACHE_DIR``). UMAP leaves caching off, so
    every new process (a notebook kernel, a CLI run) spent about 12 s compiling before its first class map; with it,
    the first process compiles and later ones load in about 1 s. The compiled code, and so every number, is the
    same either way; where a function cannot be cached it is simply compiled as before. Done once per process."""
    import umap
    from numba.core.registry import CPUDispatcher

    for module in (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances):
        for fn in vars(module).values():
            if isinstance(fn, CPUDispatcher):
                try:
                    fn.enable_caching()
                except Exception:  # noqa: BLE001 - an optimisation only: an uncachable function compiles as before
                    pass
    return umap


def _mds(mds_cls: type, dist: np.ndarray, seed: int) -> np.ndarray:
    import inspect

    params = inspect.signature(mds_cls).parameters
    kw: dict = {"n_components": 2, "random_state": seed, "n_init": 4}
    if "metric_mds" in params:  # scikit-learn >= 1.8
        kw.update(metric_mds=True, metric="precomputed", init="random")
    else:
        kw.update(dissimilarity="precomputed", metric=True)
    if "normalized_stress" in params:
        kw["normalized_stress"] = "auto"
    return mds_cls(**kw).fit_transform(dist)


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class ConfusionSummary:
    """Everything the clustering stage needs from the generalist's held-out predictions.

    Attributes:
        class_names: (C,) names.
        cm: (C, C) int64 counts, rows = true class (argmax predictions).
        F: (C, C) float64 row-normalised ``cm``.
        F_soft: (C, C) float64 row-normalised :func:`soft_confusion_matrix` (mean predicted
            distribution of every class; dense even with few errors).
        covariance: (C, C) population covariance of the predicted probabilities.
        distance: (C, C) HD-CNN distance from ``F`` (see :func:`confusion_distance`).
        accuracy: overall top-1 accuracy.
        per_class: (C,) per-class accuracy (NaN where a class has no examples).
    """

    class_names: tuple[str, ...]
    cm: np.ndarray
    F: np.ndarray
    F_soft: np.ndarray
    covariance: np.ndarray
    distance: np.ndarray
    accuracy: float
    per_class: np.ndarray

    @property
    def num_classes(self) -> int:
        """How many classes the matrix has (its rows)."""
        return len(self.class_names)

    def top_pairs(self, k: int = 10, *, symmetric: bool = False) -> pd.DataFrame:
        """:func:`top_confused_pairs` of this summary."""
        return top_confused_pairs(self.cm, self.class_names, k, symmetric=symmetric)


def summarise(y_true: Labels, probs: Probs, class_names: tuple[str, ...] | list[str]) -> ConfusionSummary:
    """Confusion statistics of a generalist on held-out data.

    Args:
        y_true: (N,) int labels.
        probs: (N, C) predicted probabilities.
        class_names: (C,) names.

    Returns:
        :class:`ConfusionSummary`.
    """
    p = _probs(probs)
    names = tuple(class_names)
    if p.shape[1] != len(names):
        raise ConfusionError(
            f"probs has {p.shape[1]} columns but {len(names)} class names were given; pass the dataset's class_names"
        )
    if p.shape[0] == 0:
        raise ConfusionError("no examples: pass the validation predictions")
    cm = confusion_matrix(y_true, p, len(names))
    f = row_normalise(cm)
    return ConfusionSummary(
        class_names=names,
        cm=cm,
        F=f,
        F_soft=row_normalise(soft_confusion_matrix(y_true, p)),
        covariance=prediction_covariance(p),
        distance=confusion_distance(f),
        accuracy=float(np.trace(cm) / cm.sum()),
        per_class=per_class_accuracy(cm),
    )
