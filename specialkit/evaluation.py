"""Metrics, the paper's tables, and cost (parameters, FLOPs, latency): numpy in, numbers/DataFrames out.

Accuracy (Hinton, Vinyals & Dean 2015, §5.4 and Tables 3-4):

* :func:`top1` -- plain test accuracy.
* :func:`conditional_accuracy` -- Table 3's "conditional test accuracy": only the test examples whose
  true class is covered by some specialist, with the prediction restricted to the covered classes.
* :func:`coverage_breakdown` -- Table 4: correct counts of the generalist and the ensemble, grouped by
  how many specialists cover the true class; the rows add up to the totals.
* :func:`per_class_change`, :func:`fixed_and_broken`, :func:`comparison_table`.

Cost (the honest side of the comparison, docs/METHOD.md section 7):

* :func:`model_cost` -- parameters and FLOPs per image of one model.
* :func:`ensemble_cost` -- FLOPs per image of the generalist alone, of the ensemble running every
  specialist, and of the ensemble with conditional execution (only the active specialists run).
* :func:`measure_latency`, :func:`latency_table` -- measured seconds per image, as ratios to the
  generalist.
* :func:`weight_bytes`, :func:`peak_activation_bytes` -- memory of inference: the weights held (a
  shared trunk once) and the peak of the tensors a forward pass keeps alive.
* :func:`compute_matched_epochs` -- extra generalist epochs that match the specialists' training passes.

>>> import numpy as np
>>> top1(np.array([[0.9, 0.1], [0.4, 0.6]]), np.array([0, 0]))
0.5
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import checks
from .errors import SpecialkitError
from .typing import Labels, Mask, Scores

__all__ = [
    "EvaluationError",
    "predictions",
    "top1",
    "conditional_accuracy",
    "nll",
    "ece",
    "ECE_BINS",
    "coverage_breakdown",
    "per_class_change",
    "fixed_and_broken",
    "comparison_table",
    "model_cost",
    "ensemble_cost",
    "measure_latency",
    "measure_latencies",
    "measure_latency_rounds",
    "latency_table",
    "ensemble_forward",
    "group_membership",
    "routed_forward",
    "shared_trunk_of",
    "compute_matched_epochs",
    "weight_bytes",
    "peak_activation_bytes",
]


class EvaluationError(SpecialkitError, ValueError):
    """Inputs to a metric do not fit together; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------- accuracy


def _labels(y: Labels) -> np.ndarray:
    return checks.as_labels(y, error=EvaluationError, fix="pass ds.y_test")


def _probs(p: Scores, n: int, *, name: str = "probs") -> np.ndarray:
    return checks.as_probs(p, n, name=name, error=EvaluationError, check_values=False)


def predictions(probs_or_preds: Scores) -> np.ndarray:
    """(N, C) scores -> (N,) argmax; (N,) integer predictions are returned as they are."""
    a = checks.as_numpy(probs_or_preds)
    if a.ndim == 2:
        return a.argmax(axis=1).astype(np.int64)
    if a.ndim == 1 and np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    raise EvaluationError(f"expected (N, C) probabilities or (N,) integer predictions, got {a.dtype} {a.shape}")


def top1(probs_or_preds: Scores, y: Labels) -> float:
    """Top-1 accuracy.

    Args:
        probs_or_preds: (N, C) probabilities (or logits), or (N,) integer predictions.
        y: (N,) true labels.
    """
    y = _labels(y)
    pred = predictions(probs_or_preds)
    if pred.shape != y.shape:
        raise EvaluationError(f"{pred.shape[0]} predictions for {y.shape[0]} labels; pass the same split's labels")
    if len(y) == 0:
        raise EvaluationError("no examples: top-1 accuracy of an empty split is undefined; pass a non-empty split")
    return float((pred == y).mean())


def _covered(covered_classes: Labels | Mask, num_classes: int) -> np.ndarray:
    c = checks.as_numpy(covered_classes)
    if c.dtype == bool:
        if c.shape != (num_classes,):
            raise EvaluationError(f"a boolean coverage mask must have shape ({num_classes},), got {c.shape}")
        c = np.flatnonzero(c)
    c = np.unique(c.astype(np.int64))
    if len(c) == 0:
        raise EvaluationError("covered_classes is empty: pass the union of the specialists' classes")
    if c.min() < 0 or c.max() >= num_classes:
        raise EvaluationError(f"covered_classes must lie in [0, {num_classes}); got {c.min()}..{c.max()}")
    return c


ECE_BINS = 15
"""Equal-width confidence bins of :func:`ece` (the usual choice since Guo et al. 2017)."""


def nll(probs: Scores, y: Labels) -> float:
    """Mean negative log-likelihood of the true class (nats; probabilities floored at 1e-12).

    Args:
        probs: (N, C) probabilities.
        y: (N,) labels.

    Returns:
        ``mean(-log probs[i, y_i])``; lower is better, 0 for a certain and right model.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] != y.size:
        raise EvaluationError(f"probs must be (N, C) with N = len(y) = {y.size}, got {p.shape}")
    return float(-np.log(np.clip(p[np.arange(y.size), y], 1e-12, None)).mean())


def ece(probs: Scores, y: Labels, *, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 prediction: the images are put in ``bins`` equal-width bins of
    their top probability; ECE = sum over bins of (share of images) x |accuracy - mean top probability|.

    Args:
        probs: (N, C) probabilities.
        y: (N,) labels.
        bins: how many bins over [0, 1].

    Returns:
        ECE in [0, 1] (0: the model's confidence is its accuracy).
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if p.ndim != 2 or p.shape[0] != y.size or bins < 1:
        raise EvaluationError(f"need (N, C) probs with N = len(y) = {y.size} and bins >= 1, got {p.shape}, bins={bins}")
    conf, ok = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, weights=ok, minlength=bins) - np.bincount(which, weights=conf, minlength=bins))
    return float(gap.sum() / max(y.size, 1)) if count.sum() else 0.0


def conditional_accuracy(probs: Scores, y: Labels, covered_classes: Labels | Mask) -> float:
    """The paper's conditional test accuracy (Table 3).

    Only examples whose true class is covered by some specialist count, and the prediction is the
    argmax over the covered classes only.

    Args:
        probs: (N, C) probabilities.
        y: (N,) true labels.
        covered_classes: (K,) indices of the classes covered by at least one specialist, or a (C,)
            boolean mask (e.g. ``ClusterSpec.coverage() > 0``).

    Returns:
        The accuracy, or ``nan`` when no example has a covered true class.
    """
    y = _labels(y)
    p = _probs(probs, len(y))
    cov = _covered(covered_classes, p.shape[1])
    keep = np.isin(y, cov)
    if not keep.any():
        return float("nan")
    pred = cov[p[keep][:, cov].argmax(axis=1)]
    return float((pred == y[keep]).mean())


def _coverage_per_class(coverage: Any, num_classes: int) -> np.ndarray:
    cov = np.asarray(coverage)
    if cov.shape != (num_classes,) or not np.issubdtype(cov.dtype, np.integer) or (cov < 0).any():
        raise EvaluationError(
            f"coverage must be a ({num_classes},) array of non-negative counts (specialists covering each "
            f"class, e.g. ClusterSpec.coverage()), got {cov.dtype} {cov.shape}"
        )
    return cov.astype(np.int64)


def coverage_breakdown(
    p_gen: Scores, q_ens: Scores, y: Labels, coverage: Labels, *, tail: int | None = None, add_total: bool = False
) -> pd.DataFrame:
    """The paper's Table 4: accuracy change grouped by how many specialists cover the true class.

    Args:
        p_gen: (N, C) generalist probabilities.
        q_ens: (N, C) ensemble probabilities.
        y: (N,) true labels.
        coverage: (C,) int, number of specialists covering each class.
        tail: if given, counts ``>= tail`` share one row labelled ``"{tail}+"`` (the paper's "10 or more").
        add_total: append a ``"total"`` row (the sum of the others).

    Returns:
        DataFrame indexed by ``covered_by`` (``"0"``, ``"1"``, ..., or ``"k+"``), one row per coverage
        count held by some class, with columns ``n_classes``, ``n_examples``, ``gen_correct``,
        ``ens_correct``, ``delta_correct`` (ens - gen), ``gen_acc``, ``ens_acc`` and
        ``relative_gain`` = delta_correct / gen_correct (the paper's relative top-1 gain; ``nan``
        where the generalist got none right). The rows (without ``total``) sum to the totals.
    """
    y = _labels(y)
    pg = _probs(p_gen, len(y), name="p_gen")
    qe = _probs(q_ens, len(y), name="q_ens")
    if pg.shape != qe.shape:
        raise EvaluationError(f"p_gen {pg.shape} and q_ens {qe.shape} must have the same shape")
    cov = _coverage_per_class(coverage, pg.shape[1])
    if tail is not None and tail < 1:
        raise EvaluationError(f"tail={tail}: use a count >= 1 (e.g. 10 for the paper's '10 or more') or None")
    bucket_of_class = np.minimum(cov, tail) if tail is not None else cov
    gen_ok = pg.argmax(1) == y
    ens_ok = qe.argmax(1) == y
    b = bucket_of_class[y]
    rows = []
    for k in np.unique(bucket_of_class):
        sel = b == k
        rows.append(
            {
                "covered_by": f"{k}+" if tail is not None and k == tail else str(k),
                "n_classes": int((bucket_of_class == k).sum()),
                "n_examples": int(sel.sum()),
                "gen_correct": int(gen_ok[sel].sum()),
                "ens_correct": int(ens_ok[sel].sum()),
            }
        )
    if add_total:
        rows.append(
            {
                "covered_by": "total",
                "n_classes": int(len(cov)),
                "n_examples": int(len(y)),
                "gen_correct": int(gen_ok.sum()),
                "ens_correct": int(ens_ok.sum()),
            }
        )
    df = pd.DataFrame(rows).set_index("covered_by")
    df["delta_correct"] = df["ens_correct"] - df["gen_correct"]
    n = df["n_examples"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["gen_acc"] = np.where(n > 0, df["gen_correct"] / np.maximum(n, 1), np.nan)
        df["ens_acc"] = np.where(n > 0, df["ens_correct"] / np.maximum(n, 1), np.nan)
        g = df["gen_correct"].to_numpy(dtype=float)
        df["relative_gain"] = np.where(g > 0, df["delta_correct"].to_numpy(dtype=float) / np.where(g > 0, g, 1), np.nan)
    return df


def per_class_change(
    p_gen: Scores, q: Scores, y: Labels, num_classes: int | None = None, *, class_names: Sequence[str] | None = None
) -> pd.DataFrame:
    """Per-class accuracy of the generalist and of another model (e.g. the ensemble), and the change.

    Args:
        p_gen: (N, C) generalist probabilities (or (N,) predictions).
        q: (N, C) probabilities of the model compared (or (N,) predictions).
        y: (N,) true labels.
        num_classes: C (default: the width of ``p_gen``).
        class_names: optional (C,) names, added as a column.

    Returns:
        DataFrame indexed by class with ``n``, ``gen_correct``, ``ens_correct``, ``gen_acc``,
        ``ens_acc``, ``delta`` (ens_acc - gen_acc; ``nan`` for a class with no example).
    """
    y = _labels(y)
    pg, pq = predictions(p_gen), predictions(q)
    if pg.shape != y.shape or pq.shape != y.shape:
        raise EvaluationError(f"need one prediction per label: {pg.shape}, {pq.shape} vs {y.shape}")
    if num_classes is None:
        a = np.asarray(p_gen)
        if a.ndim != 2:
            raise EvaluationError("pass num_classes when p_gen is a vector of predictions")
        num_classes = a.shape[1]
    n = np.bincount(y, minlength=num_classes)
    g = np.bincount(y, weights=(pg == y), minlength=num_classes)
    e = np.bincount(y, weights=(pq == y), minlength=num_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        gen_acc = np.where(n > 0, g / np.maximum(n, 1), np.nan)
        ens_acc = np.where(n > 0, e / np.maximum(n, 1), np.nan)
    df = pd.DataFrame(
        {
            "n": n,
            "gen_correct": g.astype(np.int64),
            "ens_correct": e.astype(np.int64),
            "gen_acc": gen_acc,
            "ens_acc": ens_acc,
            "delta": ens_acc - gen_acc,
        },
        index=pd.RangeIndex(num_classes, name="class"),
    )
    if class_names is not None:
        if len(class_names) != num_classes:
            raise EvaluationError(f"{len(class_names)} class names for {num_classes} classes")
        df.insert(0, "name", list(class_names))
    return df


def fixed_and_broken(p_gen: Scores, q: Scores, y: Labels) -> tuple[np.ndarray, np.ndarray]:
    """Examples the other model fixed (generalist wrong, it right) and broke (generalist right, it wrong).

    Args:
        p_gen: (N, C) generalist probabilities or (N,) predictions.
        q: (N, C) probabilities or (N,) predictions of the model compared.
        y: (N,) true labels.

    Returns:
        ``(fixed_idx, broken_idx)``: sorted int64 index arrays into the N examples.
    """
    y = _labels(y)
    g, e = predictions(p_gen) == y, predictions(q) == y
    if g.shape != y.shape or e.shape != y.shape:
        raise EvaluationError("p_gen, q and y must describe the same N examples")
    return np.flatnonzero(~g & e), np.flatnonzero(g & ~e)


def comparison_table(
    results: Mapping[str, Any],
    y: Labels,
    *,
    baseline: str = "generalist",
    covered_classes: Labels | Mask | None = None,
) -> pd.DataFrame:
    """One row per model: top-1, change relative to the baseline, and (optionally) conditional accuracy.

    Args:
        results: name -> (N, C) probabilities (or (N,) predictions), e.g. ``{"generalist": p_gen,
            "kl": q_kl, "compute_matched": p_cm}``.
        y: (N,) true labels.
        baseline: the key the relative changes are measured against.
        covered_classes: classes covered by some specialist (indices or a (C,) mask); adds
            ``conditional_acc`` and ``conditional_rel_change`` (the paper's Table 3).

    Returns:
        DataFrame indexed by name with ``top1``, ``n_correct``, ``delta_top1`` (absolute, vs the
        baseline), ``relative_change`` (delta / baseline top-1), and the conditional columns.
    """
    if baseline not in results:
        raise EvaluationError(
            f"baseline {baseline!r} is not among the results {list(results)}; add it or pass baseline="
        )
    y = _labels(y)
    rows = {}
    for name, p in results.items():
        pred = predictions(p)
        row: dict[str, float] = {"top1": top1(pred, y), "n_correct": int((pred == y).sum())}
        if covered_classes is not None:
            row["conditional_acc"] = conditional_accuracy(_probs(p, len(y), name=name), y, covered_classes)
        rows[name] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "model"
    base = df.loc[baseline, "top1"]
    df["delta_top1"] = df["top1"] - base
    df["relative_change"] = df["delta_top1"] / base if base > 0 else np.nan
    if covered_classes is not None:
        cb = df.loc[baseline, "conditional_acc"]
        df["conditional_rel_change"] = (df["conditional_acc"] - cb) / cb if cb > 0 else np.nan
    return df


# ------------------------------------------------------------------------------------------------- cost


def model_cost(model: torch.nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Parameters and forward FLOPs per image (``models.count_parameters`` / ``models.count_flops``).

    Args:
        model: a classifier.
        input_shape: ``(C, H, W)`` or ``(1, C, H, W)``.

    Returns:
        ``{"params": int, "flops": int}``. For a shared-trunk specialist (``models.SharedTrunkClassifier``)
        both are its own stages and head only: the trunk is stored and run once, with the generalist. For a
        specialist with low-rank deltas, the parameters are those stored (the deltas) and the FLOPs those of the
        dense layers that run (``models.merge_deltas``).
    """
    from . import models

    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise EvaluationError(f"input_shape must be (C, H, W) or (1, C, H, W), got {shape}")
    runs = models.merge_deltas(model) if any(isinstance(m, models.LowRankDelta) for m in model.modules()) else model
    flops = models.count_flops(runs, shape)
    if isinstance(model, models.SharedTrunkClassifier):
        flops -= models.count_flops(model.shared_trunk, shape)
    return {"params": models.count_parameters(model), "flops": flops}


def ensemble_cost(
    gen_cost: Mapping[str, int], spec_costs: Sequence[Mapping[str, int]], active: Mask
) -> dict[str, float]:
    """FLOPs and parameters per image of the generalist and of the ensemble, with and without conditional execution.

    The ensemble always runs the generalist (its top-n choose the active specialists). "All" runs every
    specialist on every image; "conditional" runs specialist m only on the images that activate it.

    Args:
        gen_cost: ``{"params", "flops"}`` of the generalist (:func:`model_cost`).
        spec_costs: M dicts ``{"params", "flops"}``, one per specialist.
        active: (N, M) bool, which specialists each image activates (``ensemble.activation``).

    Returns:
        dict with ``generalist_flops``, ``all_flops`` (= gen + sum of specialists),
        ``conditional_flops`` (= gen + mean over images of the active specialists' FLOPs),
        ``all_ratio`` / ``conditional_ratio`` (to the generalist), ``mean_active`` (specialists per
        image), ``generalist_params``, ``ensemble_params`` (all models must be held in memory either way),
        ``params_ratio``.
    """
    a = np.asarray(active, dtype=bool)
    m = len(spec_costs)
    if a.ndim != 2 or a.shape[1] != m:
        raise EvaluationError(f"active must be (N, {m}) bool (one column per specialist cost), got {a.shape}")
    sf = np.array([float(c["flops"]) for c in spec_costs])
    sp = np.array([float(c["params"]) for c in spec_costs])
    gf, gp = float(gen_cost["flops"]), float(gen_cost["params"])
    all_flops = gf + sf.sum()
    cond_flops = gf + (float((a * sf).sum(axis=1).mean()) if len(a) else 0.0)
    ens_params = gp + sp.sum()
    return {
        "generalist_flops": gf,
        "all_flops": all_flops,
        "conditional_flops": cond_flops,
        "all_ratio": all_flops / gf,
        "conditional_ratio": cond_flops / gf,
        "mean_active": float(a.sum(axis=1).mean()) if len(a) else 0.0,
        "generalist_params": gp,
        "ensemble_params": ens_params,
        "params_ratio": ens_params / gp,
    }


def _sync(x: Any) -> None:
    if getattr(x, "is_cuda", False):
        torch.cuda.synchronize(x.device)


def measure_latency_rounds(
    fns: Mapping[str, Callable[[Any], Any]],
    x: Any,
    *,
    batch_size: int,
    rounds: int = 15,
    warmup: int = 1,
) -> dict[str, np.ndarray]:
    """Seconds per image of each of several callables in every round, timed **interleaved**: every round times each
    ``fn`` once, in turn, over all of ``x`` (:func:`measure_latency` with one repeat), so a change of load on a shared
    machine reaches all of them alike. ``stats.latency_ratio`` turns two of them into a ratio with an interval.

    Args:
        fns: name -> callable taking a batch ``x[i:i+batch_size]``.
        x: (N, ...) inputs (or anything sliceable with ``len``, ``is_cuda`` and ``device``, as for
            :func:`measure_latency`).
        batch_size: images per call.
        rounds: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> (rounds,) seconds per image.
    """
    if rounds < 1:
        raise EvaluationError(f"need rounds >= 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t = measure_latency(fn, x, batch_size=batch_size, repeats=1, warmup=0)
            if r >= warmup:
                times[name].append(t)
    return {name: np.asarray(t) for name, t in times.items()}


def measure_latencies(
    fns: Mapping[str, Callable[[Any], Any]],
    x: Any,
    *,
    batch_size: int,
    rounds: int = 15,
    warmup: int = 1,
) -> dict[str, float]:
    """Smallest seconds per image of each of several callables, timed interleaved (:func:`measure_latency_rounds`).

    Args:
        fns: name -> callable taking a batch ``x[i:i+batch_size]``.
        x: (N, ...) inputs (as for :func:`measure_latency_rounds`).
        batch_size: images per call.
        rounds: timed rounds (the smallest time of each ``fn`` is kept).
        warmup: untimed rounds first.

    Returns:
        name -> seconds per image.
    """
    t = measure_latency_rounds(fns, x, batch_size=batch_size, rounds=rounds, warmup=warmup)
    return {name: float(v.min()) for name, v in t.items()}


def measure_latency(
    fn: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    batch_size: int,
    repeats: int = 5,
    warmup: int = 1,
    best: bool = False,
) -> float:
    """Median (``best=True``: smallest) seconds per image of ``fn`` applied to ``x`` in batches (``time.perf_counter``).

    Each repeat runs ``fn`` over all of ``x`` in batches of ``batch_size`` (the last batch may be
    smaller) under ``torch.inference_mode``, synchronising CUDA before the clock stops; the time per
    image is the total over ``len(x)``. ``warmup`` untimed passes come first.

    Args:
        fn: callable taking a batch ``x[i:i+batch_size]``.
        x: (N, ...) inputs (already on the device ``fn`` expects).
        batch_size: images per call.
        repeats: timed passes; the median is returned (the smallest with ``best``, steadier on a shared machine).
        warmup: untimed passes before timing.
        best: return the smallest time of the repeats instead of the median.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise EvaluationError(f"need batch_size >= 1, repeats >= 1, warmup >= 0; got {batch_size}, {repeats}, {warmup}")
    n = len(x)
    if n == 0:
        raise EvaluationError("x is empty: pass at least one image to time")
    times = []
    with torch.inference_mode():
        for r in range(warmup + repeats):
            _sync(x)
            t0 = time.perf_counter()
            for i in range(0, n, batch_size):
                fn(x[i : i + batch_size])
            _sync(x)
            if r >= warmup:
                times.append((time.perf_counter() - t0) / n)
    return float(min(times) if best else statistics.median(times))


Combine = Callable[[np.ndarray, list[np.ndarray], np.ndarray], Any]
_RowActivate = Callable[[np.ndarray, np.ndarray], np.ndarray]


def shared_trunk_of(specialists: Sequence[torch.nn.Module]) -> Any:
    """The one ``models.Trunk`` every specialist shares, or ``None`` when none shares a trunk (an error when
    only some do, or they hold different trunk objects: attach one ``generalist.trunk(s)`` to all)."""
    from . import models

    shared = [s for s in specialists if isinstance(s, models.SharedTrunkClassifier)]
    if not shared:
        return None
    trunks = {id(s.shared_trunk) for s in shared}
    if len(shared) != len(specialists) or len(trunks) != 1:
        raise EvaluationError(
            "the specialists must all share one trunk object (or none): load them with the same "
            "trunk=generalist.trunk(s)"
        )
    return shared[0].shared_trunk


def ensemble_forward(
    generalist: torch.nn.Module,
    specialists: Sequence[torch.nn.Module],
    xb: torch.Tensor,
    activate: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    routing_probs: np.ndarray | None = None,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """One ensemble pass over a batch with conditional execution.

    The generalist runs on every image; ``activate(p_gen)`` says which specialists each image switches on;
    specialist m runs once, batched over the rows that activate it (its other rows are NaN). When the
    specialists share a trunk (``models.SharedTrunkClassifier``) the trunk runs **once** on the batch,
    the generalist's later stages and every active specialist's own stages run on its output.

    Args:
        generalist: the generalist (float images in [0, 1] -> (B, C) logits).
        specialists: M classifiers, each (B, |S_m|+1) logits; all or none sharing one trunk.
        xb: (B, channels, H, W) float images in [0, 1].
        activate: ``p_gen (B, C) -> (B, M) bool``; ``None`` runs every specialist on every row.
        routing_probs: (B, C) distributions the activation sees instead of the generalist's softmax.

    Returns:
        ``(p_gen (B, C), [probs (B, |S_m|+1) with NaN rows where inactive], active (B, M) bool)``.
    """
    trunk = shared_trunk_of(specialists)
    if trunk is None:
        h, logits = xb, generalist(xb)

        def run(spec: Any, rows: torch.Tensor | None) -> torch.Tensor:
            return spec(h if rows is None else h.index_select(0, rows))
    else:
        h = trunk(xb)
        logits = generalist.forward_from(h, trunk.stages)

        def run(spec: Any, rows: torch.Tensor | None) -> torch.Tensor:
            return spec.forward_shared(h if rows is None else h.index_select(0, rows))

    p_gen = torch.softmax(logits.float(), dim=1).cpu().numpy()
    p_route = p_gen if routing_probs is None else routing_probs
    if activate is None:
        act = np.ones((len(xb), len(specialists)), dtype=bool)
        return p_gen, [torch.softmax(run(s, None).float(), dim=1).cpu().numpy() for s in specialists], act
    act = np.asarray(activate(p_route), dtype=bool)
    outs = []
    for m, spec in enumerate(specialists):
        out = np.full((len(xb), int(spec.head.out_features)), np.nan, dtype=np.float32)
        rows = np.flatnonzero(act[:, m])
        if len(rows):
            out[rows] = torch.softmax(run(spec, torch.from_numpy(rows).to(xb.device)).float(), dim=1).cpu().numpy()
        outs.append(out)
    return p_gen, outs, act


def group_membership(groups: Sequence[Any], num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(C, M) float tensor, 1 where class j belongs to group m: the routing table of :func:`routed_forward`.

    Args:
        groups: M arrays of class indices.
        num_classes: C.
        device: where the table lives (the models' device).

    Returns:
        The membership table.
    """
    member = torch.zeros(num_classes, len(groups), dtype=torch.float32)
    for m, g in enumerate(groups):
        idx = torch.as_tensor(np.asarray(g), dtype=torch.long)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= num_classes:
            raise EvaluationError(f"group {m} must hold class indices in [0, {num_classes}), got {idx.tolist()}")
        member[idx, m] = 1.0
    return member.to(device)


def routed_activation(
    p: torch.Tensor,
    member: torch.Tensor,
    *,
    top_n: int = 1,
    threshold: float = 0.0,
    confident: float = 1.0,
    max_active: int = 0,
) -> torch.Tensor:
    """(B, M) bool: :func:`specialkit.ensemble.activation` in torch, without its checks (for the timed paths).

    Args:
        p: (B, C) the distributions that route (the generalist's softmax).
        member: (C, M) :func:`group_membership` of the specialists' groups.
        top_n: the generalist's classes that switch specialists on.
        threshold: the group mass a specialist needs to run (0: none skipped).
        confident: the top-1 probability above which an image runs no specialist (1: none skipped).
        max_active: the most specialists one image runs, those with the most group mass (0: no limit).

    Returns:
        The activation mask, on ``member``'s device.
    """
    if top_n == 1:
        active = member.index_select(0, p.argmax(dim=1)) > 0
    else:
        active = member[p.topk(top_n, dim=1).indices].amax(dim=1) > 0
    if threshold > 0:
        active &= p.to(member.dtype) @ member >= threshold
    if confident < 1:
        active &= (p.amax(dim=1) <= confident)[:, None]
    if 0 < max_active < active.shape[1]:
        score = torch.where(active, p.to(member.dtype) @ member, float("-inf"))
        top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :max_active]
        active &= torch.zeros_like(active).scatter_(1, top, True)
    return active


def routed_forward(
    generalist: torch.nn.Module,
    specialists: Sequence[torch.nn.Module],
    xb: torch.Tensor,
    member: torch.Tensor,
    *,
    top_n: int = 1,
    threshold: float = 0.0,
    confident: float = 1.0,
    max_active: int = 0,
    routing_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
    """:func:`ensemble_forward` with the routing in torch: the same networks and the same activation as
    ``ensemble.activation(p, groups, top_n=top_n, threshold=threshold, confident=confident, max_active=max_active)``,
    without the round trip through numpy or the checks of every call, so a pass at batch 1 costs the networks and
    little else.

    The generalist (and a shared trunk, once) runs on the batch; ``p_gen`` switches on the specialists whose group
    meets its top-n classes (and, with ``threshold > 0``, whose group mass reaches it); each switched-on specialist
    runs once on its rows. Specialists no row switches on are not called.

    Args:
        generalist: the generalist.
        specialists: M classifiers, all or none sharing one trunk.
        xb: (B, channels, H, W) float images in [0, 1].
        member: (C, M) :func:`group_membership` of the specialists' groups, on the models' device.
        top_n: the generalist's classes that switch specialists on.
        threshold: the group mass a specialist needs to run (0: none skipped).
        confident: the generalist's top-1 probability above which an image runs no specialist (1: none skipped).
        max_active: the most specialists one image runs, those with the most group mass (0: no limit).
        routing_probs: (B, C) distributions the routing sees instead of the generalist's softmax.

    Returns:
        ``(p_gen (B, C), per specialist its (B, |S_m|+1) probabilities with NaN rows where inactive or None where
        it ran on no row, active (B, M) bool)``, tensors on the models' device.
    """
    trunk = shared_trunk_of(specialists)
    if trunk is None:
        h, p_gen = xb, torch.softmax(generalist(xb).float(), dim=1)
        own = [s.forward for s in specialists]
    else:
        h = trunk(xb)
        p_gen = torch.softmax(generalist.forward_from(h, trunk.stages).float(), dim=1)
        own = [s.forward_shared for s in specialists]
    active = routed_activation(
        p_gen if routing_probs is None else routing_probs,
        member,
        top_n=top_n,
        threshold=threshold,
        confident=confident,
        max_active=max_active,
    )
    outs: list[torch.Tensor | None] = [None] * len(specialists)
    if len(xb) == 1:
        for m in active[0].nonzero().flatten().tolist():
            outs[m] = torch.softmax(own[m](h).float(), dim=1)
        return p_gen, outs, active
    for m in active.any(dim=0).nonzero().flatten().tolist():
        rows = active[:, m].nonzero().flatten()
        got = torch.softmax(own[m](h.index_select(0, rows)).float(), dim=1)
        out = torch.full((len(xb), got.shape[1]), float("nan"), device=got.device)
        outs[m] = out.index_copy_(0, rows, got)
    return p_gen, outs, active


def _ensemble_forward(
    generalist: torch.nn.Module,
    specialists: Sequence[torch.nn.Module],
    activate: _RowActivate | None,
    routing_probs: np.ndarray | None,
    captured: dict[int, tuple[np.ndarray, list[np.ndarray], np.ndarray]],
) -> Callable[[tuple[torch.Tensor, torch.Tensor]], None]:
    """The models of one ensemble pass (:func:`ensemble_forward`); ``activate=None`` runs every specialist on
    every row. The last outputs of every batch are kept in ``captured`` (by first row) for timing the rules.
    """

    def run(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        xb, idx = batch
        rows = idx.numpy()
        route = None if routing_probs is None else routing_probs[rows]
        fn = None if activate is None else (lambda p: activate(p, rows))
        p_gen, outs, act = ensemble_forward(generalist, specialists, xb, fn, routing_probs=route)
        captured[int(idx[0])] = (route if route is not None else p_gen, outs, act)

    return run


def _time_calls(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], *, repeats: int, warmup: int, best: bool = False
) -> float:
    """Median (``best``: smallest) total seconds of ``fn(*args)`` over every ``args`` in ``calls``."""
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        for args in calls:
            fn(*args)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return float(min(times) if best else statistics.median(times))


def _row_activate(active: Any, num_images: int, num_specialists: int) -> _RowActivate:
    if callable(active):
        return lambda p, idx: active(p)
    a = np.asarray(active, dtype=bool)
    if a.shape != (num_images, num_specialists):
        raise EvaluationError(
            f"active must be ({num_images}, {num_specialists}) bool (one row per image, one column per specialist) "
            f"or a function p_gen -> mask, got shape {a.shape}"
        )
    return lambda p, idx: a[idx]


def latency_table(
    generalist: torch.nn.Module,
    specialists: Sequence[torch.nn.Module],
    x: torch.Tensor,
    active: Any,
    *,
    batch_sizes: Sequence[int] = (1, 256),
    rules: Mapping[str, Combine | None | tuple[Combine | None, Any]] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    max_images: Mapping[int, int] | None = None,
    routing_probs: Any | None = None,
    best: bool = False,
) -> pd.DataFrame:
    """Measured seconds per image of the generalist and of the ensemble, all vs conditional execution.

    One ensemble pass over a batch is: the generalist's forward pass and softmax; then

    * ``all``: every specialist on the whole batch; the rule gets an all-True mask (no routing);
    * ``conditional``: the activation mask of the batch (computed inside the timed pass), then each
      specialist only on the rows that activate it (picked with ``index_select``; its other rows are
      NaN); the rule gets that mask;

    then the combination rule. The model part is timed once per mode and routing (rules that share
    a routing share it); each rule's combination is timed separately on the outputs of those passes,
    and a rule's latency is the sum (the two run one after the other, so the sum is what one pass
    costs, without re-running the networks for every rule). Models are put in eval mode and timed
    where they are (CPU or CUDA); ``x`` is moved to the generalist's device.

    Args:
        generalist: (N, C, H, W) float in [0, 1] -> (N, C) logits.
        specialists: M classifiers (with a ``.head``), each -> (N, |S_m|+1) logits.
        x: (N, C, H, W) images, ``uint8`` (converted once to float in [0, 1]) or float.
        active: the default activation: an (N, M) bool array (row i for image i, e.g. from
            ``ensemble.activation`` beforehand), or a function ``p_gen (B, C) -> (B, M) bool``
            evaluated per batch inside the timed pass (e.g. ``lambda p: ensemble.activation(p, groups)``).
        batch_sizes: batch sizes to time.
        rules: name -> ``combine`` or ``(combine, activation)`` (activation as ``active``: the rule's
            own routing, e.g. ``moe_gates(...).run``), where ``combine(p_gen (B, C), spec_probs: list
            of (B, |S_m|+1), mask (B, M)) -> q``; a ``None`` combine times the models only.
            Default ``{"ensemble": None}``.
        repeats: timed passes (see :func:`measure_latency`).
        warmup: untimed passes before timing.
        max_images: batch size -> number of images timed (default all of ``x``): batch 1 over
            thousands of images is slow on a CPU.
        best: report the smallest time of the repeats instead of the median.
        routing_probs: optional (N, C) distributions that the activation functions and rules see
            instead of the generalist's softmax (the generalist still runs, for its cost): lets a
            benchmark with an untrained generalist route images like a trained one would.

    Returns:
        DataFrame with columns ``batch_size``, ``model`` (``"generalist"``, ``"<rule> all"``,
        ``"<rule> conditional"``), ``seconds_per_image`` (models + combination),
        ``combine_seconds_per_image`` (the rule alone), ``ratio`` (to the generalist at that batch
        size) and ``mean_active`` (specialists run per image).
    """
    device = next(generalist.parameters()).device
    xf = x.to(device)
    if xf.dtype == torch.uint8:
        xf = xf.float().div_(255.0)
    generalist.eval()
    for s in specialists:
        s.eval()
    m = len(specialists)
    default = _row_activate(active, len(xf), m)
    table: dict[str, tuple[Combine | None, _RowActivate]] = {}
    for name, rule in (rules or {"ensemble": None}).items():
        if isinstance(rule, tuple):
            table[name] = (rule[0], _row_activate(rule[1], len(xf), m))
        else:
            table[name] = (rule, default)
    routings = list({id(a): a for _, a in table.values()}.values())
    if routing_probs is not None:
        p_all = _probs(routing_probs, len(xf), name="routing_probs")
    else:
        with torch.inference_mode():
            p_all = torch.cat([torch.softmax(generalist(xf[i : i + 512]).float(), 1) for i in range(0, len(xf), 512)])
        p_all = p_all.cpu().numpy()
    routing = None if routing_probs is None else p_all

    rows = []
    for bs in batch_sizes:
        n = min(len(xf), int((max_images or {}).get(bs, len(xf))))
        pairs = _Paired(xf[:n], torch.arange(n))
        t_gen = measure_latency(
            lambda b: generalist(b[0]), pairs, batch_size=bs, repeats=repeats, warmup=warmup, best=best
        )
        rows.append(
            {
                "batch_size": bs,
                "model": "generalist",
                "seconds_per_image": t_gen,
                "combine_seconds_per_image": 0.0,
                "mean_active": 0.0,
            }
        )
        passes: dict[Any, tuple[float, list, float]] = {}
        for key, act_fn in [(None, None)] + [(id(a), a) for a in routings]:
            captured: dict[int, Any] = {}
            fn = _ensemble_forward(generalist, specialists, act_fn, routing, captured)
            t = measure_latency(fn, pairs, batch_size=bs, repeats=repeats, warmup=warmup, best=best)
            mean_active = (
                float(m) if act_fn is None else float(np.asarray(act_fn(p_all[:n], np.arange(n))).sum(1).mean())
            )
            passes[key] = (t, [captured[k] for k in sorted(captured)], mean_active)
        for name, (combine, act_fn) in table.items():
            for mode, key in (("all", None), ("conditional", id(act_fn))):
                t_models, calls, mean_active = passes[key]
                t_comb = (
                    0.0
                    if combine is None
                    else _time_calls(combine, calls, repeats=repeats, warmup=warmup, best=best) / n
                )
                rows.append(
                    {
                        "batch_size": bs,
                        "model": f"{name} {mode}",
                        "seconds_per_image": t_models + t_comb,
                        "combine_seconds_per_image": t_comb,
                        "mean_active": mean_active,
                    }
                )
    df = pd.DataFrame(rows)
    gen = df[df["model"] == "generalist"].set_index("batch_size")["seconds_per_image"]
    df["ratio"] = df["seconds_per_image"] / df["batch_size"].map(gen)
    return df[["batch_size", "model", "seconds_per_image", "combine_seconds_per_image", "ratio", "mean_active"]]


class _Paired:
    """(images, row indices) sliced together, so a timed function knows which rows it got."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        self.x, self.idx = x, idx
        self.is_cuda = x.is_cuda
        self.device = x.device

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, s: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[s], self.idx[s]


def weight_bytes(modules: Sequence[torch.nn.Module]) -> int:
    """Bytes of the parameters and buffers inference holds for ``modules``, each tensor once (a trunk shared
    with the generalist is counted with it; a shared-trunk specialist adds only its own stages)."""
    from . import models

    seen: dict[int, int] = {}
    for mod in modules:
        tensors = list(mod.parameters()) + list(mod.buffers())
        if isinstance(mod, models.SharedTrunkClassifier) and mod._trunk:
            tensors += list(mod.shared_trunk.parameters()) + list(mod.shared_trunk.buffers())
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return int(sum(seen.values()))


def peak_activation_bytes(fn: Callable[[], Any], *, device: torch.device | str = "cpu") -> int:
    """Peak bytes of the tensors alive at once while ``fn()`` runs (inputs and weights made before it excluded).

    On CUDA: ``torch.cuda.max_memory_allocated`` over the call, less what was allocated before it. On the CPU,
    where PyTorch keeps no such counter: every tensor an operator returns (views and in-place results excluded)
    is added when made and subtracted when freed (a ``TorchDispatchMode``), and the running maximum is kept.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    tracker = _LiveBytes()
    with torch.inference_mode(), tracker:
        fn()
    return int(tracker.peak)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Running total and peak of the bytes of tensors made by operators and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import weakref

        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def compute_matched_epochs(examples_seen_by_specialists: int | float | Sequence[int], n_train: int) -> float:
    """Extra generalist epochs that use as many example-passes as all specialists together (docs/METHOD.md section 7).

    Args:
        examples_seen_by_specialists: total training example-passes of all specialists (or a sequence
            of per-specialist counts, e.g. ``[s.examples_seen for s in specialists]``).
        n_train: size of the generalist's training set.

    Returns:
        ``total / n_train`` (fractional; the pipeline rounds it as it needs).
    """
    total = float(np.sum(examples_seen_by_specialists))
    if n_train <= 0:
        raise EvaluationError(f"n_train={n_train}: pass the number of training images (> 0)")
    if total < 0:
        raise EvaluationError(f"examples seen must be >= 0, got {total}")
    return total / n_train
