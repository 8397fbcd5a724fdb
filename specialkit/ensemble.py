"""Which specialists to run for an image, and how to combine their outputs with the generalist's.

Data model (``docs/LAYERS.md``): ``C`` classes; the generalist gives ``p_gen: (N, C)``;
specialist ``m`` covers ``classes_m: (|S_m|,)`` class indices and gives
``probs_m: (N, |S_m| + 1)`` with its **dustbin last** (the mass of every class outside ``S_m``).
A specialist's *cells* are its ``|S_m|`` special classes and its dustbin; :func:`collapse` maps a
full distribution onto them and :func:`expand_to_full` maps a specialist's output back to ``C``
classes.

Routing and combination (``docs/METHOD.md`` section 4):

* :func:`activation` -- specialist ``m`` is active for image ``i`` when ``S_m`` meets the
  generalist's top-``n`` classes (the paper: ``n = 1``).
* :func:`combine_kl` -- the paper's rule: ``q = argmin KL(p_gen || q) + sum_{m active}
  KL(p_m || collapse_m(q))``, solved for all images at once by the EM (multiplicative) update
  (damped Newton steps finish the rare images where EM is slow);
  :func:`combine_kl_gradient` solves the same problem the paper's way (``q = softmax(z)``,
  gradient-based optimisation of ``z`` image by image) and serves as baseline and cross-check.
  With ``calibration=`` (rule ``"kl_calibrated"``) each specialist's target is its calibrated evidence
  (:func:`evidence_update`) collapsed to its cells, so a specialist that outputs noise leaves ``p_gen``.
* :func:`combine_top_confident` -- option (a): average the ``n`` most confident specialists.
* :func:`combine_moe` -- option (b): a mixture of experts gated by the generalist, with HD-CNN
  style conditional execution (skip a specialist whose group mass is under a threshold).
* :func:`combine` dispatches on a rule name; :func:`run_conditionally` evaluates each specialist
  only on the images that need it and counts the cost.

Every rule returns ``q: (N, C)`` float64 rows summing to 1.

>>> import numpy as np
>>> p_gen = np.array([[0.5, 0.3, 0.2]])
>>> spec = SpecialistOutputs(classes=np.array([0, 1]), probs=np.array([[0.2, 0.6, 0.2]]))
>>> active = activation(p_gen, [spec.classes])
>>> combine_kl(p_gen, [spec], active).round(3)
array([[0.35, 0.45, 0.2 ]])
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

from . import checks
from .errors import SpecialkitError
from .typing import Groups, Labels, Mask, Probs

__all__ = [
    "RULES",
    "EnsembleError",
    "ConvergenceWarning",
    "SpecialistOutputs",
    "KLSolution",
    "ConditionalRun",
    "MoEGates",
    "cell_index",
    "collapse",
    "expand_to_full",
    "Calibration",
    "calibrate",
    "temper",
    "evidence_update",
    "activation",
    "fraction_routed",
    "coverage_count",
    "kl_objective",
    "solve_kl",
    "combine_kl",
    "combine_kl_gradient",
    "specialist_confidence",
    "combine_top_confident",
    "moe_gates",
    "combine_moe",
    "combine",
    "run_conditionally",
]

RULES: tuple[str, ...] = ("generalist", "kl", "kl_calibrated", "top_confident", "moe")
GRADIENT_METHODS: tuple[str, ...] = ("lbfgs", "torch-lbfgs", "gd")
CONFIDENCES: tuple[str, ...] = ("max", "mass")

_SUM_TOL = 1e-3  # how far a probability row may sum from 1 before it is an error
_EMPTY_DUSTBIN_TOL = 1e-6  # dustbin mass allowed for a specialist that covers every class
_INIT_FLOOR = 1e-12  # gradient baseline start: p_gen with every entry lifted to at least this
_REVIVE = 1e-12  # EM: mass given back to a class at 0 whose gradient asks for mass
_TINY = 1e-300
_DAMPING = (1e-8, 1e-4, 1e-2, 1.0, 1e2)  # Newton: Levenberg-Marquardt damping tried in turn
_STEPS = (1.0, 0.5, 0.25, 0.125)  # Newton: step lengths tried for each damping
_ROUNDING = 1e-14  # Newton line search: objective increases this small (relative) count as rounding
_MAX_LOG_STEP = 50.0  # Newton: one step shrinks an entry by a factor exp(-50) at most


class EnsembleError(SpecialkitError, ValueError):
    """Bad input to an ensemble function; the message names the problem and the fix."""


class ConvergenceWarning(RuntimeWarning):
    """An iterative combination stopped at ``max_iter`` before meeting its tolerance."""


@dataclass(frozen=True, eq=False)
class SpecialistOutputs:
    """One specialist's predictions.

    Attributes:
        classes: (|S|,) int64 distinct class indices of its special classes (order = output order).
        probs: (N, |S| + 1) float probabilities, the dustbin (every other class) **last**. Rows of
            images the specialist was not run on may hold a placeholder (NaN); the combination
            rules read only the rows they need (see each rule).
    """

    classes: np.ndarray
    probs: np.ndarray

    def __post_init__(self) -> None:
        classes = np.asarray(self.classes)
        if classes.ndim != 1 or classes.size == 0 or not np.issubdtype(classes.dtype, np.integer):
            raise EnsembleError(
                f"specialist classes must be a non-empty 1-D integer array, got dtype {classes.dtype} "
                f"shape {classes.shape}; pass the class indices of its special subset"
            )
        if (classes < 0).any() or np.unique(classes).size != classes.size:
            raise EnsembleError(
                f"specialist classes must be distinct non-negative class indices, got {classes.tolist()}; "
                "remove duplicates"
            )
        probs = np.asarray(self.probs)
        if probs.ndim != 2 or probs.shape[1] != classes.size + 1:
            raise EnsembleError(
                f"specialist probs must be (N, |S|+1) = (N, {classes.size + 1}) with the dustbin last, "
                f"got shape {probs.shape}; append the dustbin column"
            )
        object.__setattr__(self, "classes", classes.astype(np.int64, copy=False))
        object.__setattr__(self, "probs", probs)

    @property
    def num_images(self) -> int:
        """How many images the result covers."""
        return int(self.probs.shape[0])


SpecialistLike = Union[SpecialistOutputs, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, eq=False)
class KLSolution:
    """Result of :func:`solve_kl`.

    Attributes:
        q: (N, C) float64 combined distributions.
        iterations: (N,) int EM iterations each image took (0 for images with no active specialist).
        converged: (N,) bool whether the image met the tolerance before ``max_iter``.
        gap: (N,) float estimate of ``objective(q) - min objective`` at the last iteration: the
            Frank-Wolfe duality gap (an upper bound, possibly loose) or, for an image that stopped
            on its Newton decrement, half the squared decrement if smaller (a local estimate);
            0 for images with no active specialist.
    """

    q: np.ndarray
    iterations: np.ndarray
    converged: np.ndarray
    gap: np.ndarray


@dataclass(frozen=True, eq=False)
class ConditionalRun:
    """Result of :func:`run_conditionally`.

    Attributes:
        specialists: one :class:`SpecialistOutputs` per specialist, rows of images it did not run
            on filled with ``fill``.
        evaluations: total number of (image, specialist) evaluations -- the cost.
        per_specialist: (M,) int64 evaluations of each specialist.
    """

    specialists: tuple[SpecialistOutputs, ...]
    evaluations: int
    per_specialist: np.ndarray


@dataclass(frozen=True, eq=False)
class MoEGates:
    """Gates of :func:`combine_moe`.

    Attributes:
        specialist: (N, M) float64 mixture weight of each specialist (0 where skipped).
        generalist: (N,) float64 mixture weight of the generalist; ``generalist + specialist.sum(1) == 1``.
        run: (N, M) bool which specialists must be evaluated (gate > 0).
        group_mass: (N, M) float64 generalist mass on each group, ``sum_{j in S_m} p_gen[:, j]``.
    """

    specialist: np.ndarray
    generalist: np.ndarray
    run: np.ndarray
    group_mass: np.ndarray


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _as_specialists(specialists: Sequence[SpecialistLike]) -> list[SpecialistOutputs]:
    out = []
    for s in specialists:
        if isinstance(s, SpecialistOutputs):
            out.append(s)
        elif isinstance(s, tuple) and len(s) == 2:
            out.append(SpecialistOutputs(classes=s[0], probs=s[1]))
        else:
            raise EnsembleError(
                f"a specialist must be SpecialistOutputs or a (classes, probs) tuple, got {type(s).__name__}"
            )
    return out


def _check_p_gen(p_gen: Probs) -> np.ndarray:
    return checks.as_probs(p_gen, name="p_gen", error=EnsembleError, atol=_SUM_TOL, neg_atol=0.0)


def _normalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum(axis=1, keepdims=True)


def _check_groups(groups: Sequence[Labels | SpecialistOutputs], num_classes: int) -> list[np.ndarray]:
    classes = [g.classes if isinstance(g, SpecialistOutputs) else g for g in groups]
    return checks.check_groups(classes, num_classes, error=EnsembleError)


def _membership(groups: Groups, num_classes: int) -> np.ndarray:
    """(C, M) bool: class j belongs to group m."""
    member = np.zeros((num_classes, len(groups)), dtype=bool)
    for m, g in enumerate(groups):
        member[g, m] = True
    return member


def _check_mask(mask: Mask, shape: tuple[int, int], name: str) -> np.ndarray:
    return checks.as_bools(mask, shape, name=name, error=EnsembleError, fix="use activation(p_gen, groups)")


def _read_probs(specs: Sequence[SpecialistOutputs], read: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Validate the rows each rule reads; return float64 copies, normalised, unread rows = 0.

    ``read: (N, M)`` bool. A specialist covering every class has an empty dustbin: its dustbin
    probability must be ~0 and is set to exactly 0.
    """
    n = read.shape[0]
    out = []
    for m, s in enumerate(specs):
        if s.num_images != n:
            raise EnsembleError(
                f"specialist {m} has {s.num_images} rows but p_gen has {n}; pass outputs for the same images"
            )
        if (s.classes >= num_classes).any():
            raise EnsembleError(
                f"specialist {m} names class {int(s.classes.max())} but p_gen has only {num_classes} "
                "classes; use the same class order for both"
            )
        rows = read[:, m]
        p = np.zeros(s.probs.shape, dtype=np.float64)
        if rows.any():
            r = np.asarray(s.probs[rows], dtype=np.float64)
            if not np.isfinite(r).all() or (r < 0).any():
                raise EnsembleError(
                    f"specialist {m} has NaN/negative probabilities on rows the rule reads (where it is "
                    "active); run it on those images (run_conditionally with the same mask)"
                )
            sums = r.sum(axis=1)
            if (np.abs(sums - 1.0) > _SUM_TOL).any():
                raise EnsembleError(f"specialist {m} rows must sum to 1 (dustbin included); apply a softmax first")
            if s.classes.size == num_classes:
                if (r[:, -1] > _EMPTY_DUSTBIN_TOL).any():
                    raise EnsembleError(
                        f"specialist {m} covers every class so its dustbin is empty, yet it puts up to "
                        f"{r[:, -1].max():.3g} there; renormalise probs[:, :-1] and set the dustbin to 0"
                    )
                r[:, -1] = 0.0
            p[rows] = r / r.sum(axis=1, keepdims=True)
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# cells


def cell_index(classes: Labels, num_classes: int) -> np.ndarray:
    """Cell of every class for one specialist.

    Args:
        classes: (|S|,) special class indices.
        num_classes: C.

    Returns:
        (C,) int64: position of class j in ``classes``, or ``|S|`` (the dustbin) if j is not special.
    """
    classes = _check_groups([classes], num_classes)[0]
    cells = np.full(num_classes, classes.size, dtype=np.int64)
    cells[classes] = np.arange(classes.size)
    return cells


def collapse(q: Probs, classes: Labels) -> np.ndarray:
    """Collapse full distributions onto a specialist's cells.

    Args:
        q: (N, C) distributions over all classes.
        classes: (|S|,) special class indices.

    Returns:
        (N, |S| + 1): ``q`` on each special class, then the summed mass of all other classes.
    """
    q = np.asarray(q, dtype=np.float64)
    classes = _check_groups([classes], q.shape[1])[0]
    outside = np.ones(q.shape[1], dtype=bool)
    outside[classes] = False
    return np.concatenate([q[:, classes], q[:, outside].sum(axis=1, keepdims=True)], axis=1)


def expand_to_full(spec_probs: Probs, classes: Labels, p_gen: Probs) -> np.ndarray:
    """Turn a specialist's output into a distribution over all C classes.

    ``out[:, classes] = spec_probs[:, :-1]``; the dustbin mass ``spec_probs[:, -1]`` is spread over
    the other classes in proportion to ``p_gen`` (uniformly where ``p_gen`` puts no mass outside
    ``S``). If ``S`` is every class the dustbin must be ~0 and the special part is renormalised.

    Args:
        spec_probs: (N, |S| + 1) specialist probabilities, dustbin last.
        classes: (|S|,) special class indices.
        p_gen: (N, C) generalist probabilities.

    Returns:
        (N, C) float64 rows summing to 1 (NaN rows stay NaN).
    """
    pg = np.asarray(p_gen, dtype=np.float64)
    sp = np.asarray(spec_probs, dtype=np.float64)
    classes = _check_groups([classes], pg.shape[1])[0]
    if sp.shape != (pg.shape[0], classes.size + 1):
        raise EnsembleError(
            f"spec_probs must be (N, |S|+1) = {(pg.shape[0], classes.size + 1)}, got {sp.shape}; "
            "pass one row per p_gen row with the dustbin last"
        )
    out = np.empty_like(pg)
    outside = np.ones(pg.shape[1], dtype=bool)
    outside[classes] = False
    n_out = int(outside.sum())
    if n_out == 0:
        if (sp[:, -1] > _EMPTY_DUSTBIN_TOL).any():
            raise EnsembleError(
                "the specialist covers every class so its dustbin is empty, yet it has dustbin mass; "
                "renormalise spec_probs[:, :-1] and set the dustbin to 0"
            )
        out[:, classes] = sp[:, :-1] / sp[:, :-1].sum(axis=1, keepdims=True)
        return out
    rest = pg[:, outside]
    mass = rest.sum(axis=1, keepdims=True)
    share = np.divide(rest, mass, out=np.full_like(rest, 1.0 / n_out), where=mass > 0)
    out[:, outside] = sp[:, -1:] * share
    out[:, classes] = sp[:, :-1]
    return out


# --------------------------------------------------------------------------------------------
# calibrated evidence: what a specialist adds to the generalist, judged on validation images


@dataclass(frozen=True)
class Calibration:
    """How to read one specialist as evidence, fitted on validation images (never the test set).

    Attributes:
        temperature: T that minimises the specialist's validation NLL of its own targets (its classes and the
            dustbin): ``p_T = softmax(log p / T)``. A specialist that outputs noise gets a large T (near-flat output).
        mean: (|S| + 1,) the mean of ``p_T`` over the validation images: what the specialist says when it knows
            nothing about the image. The evidence of an output is its ratio to this mean.
    """

    temperature: float
    mean: np.ndarray


TEMPERATURE_RANGE = (0.05, 1000.0)


def temper(spec_probs: Probs, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row: (N, K) probabilities at temperature ``T`` (NaN rows stay NaN)."""
    logp = np.log(np.clip(np.asarray(spec_probs, dtype=np.float64), _TINY, None)) / float(temperature)
    logp -= np.max(logp, axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def calibrate(spec_probs: Probs, classes: Labels, y: Labels) -> Calibration:
    """Fit a specialist's :class:`Calibration` on validation images.

    Args:
        spec_probs: (N, |S| + 1) its probabilities on the validation images, dustbin last.
        classes: (|S|,) its special class indices.
        y: (N,) the images' labels (over all C classes); a label outside ``classes`` is the dustbin cell.

    Returns:
        The temperature (bounded search over :data:`TEMPERATURE_RANGE` on log T) and the mean tempered output.
    """
    from scipy.optimize import minimize_scalar

    sp = np.asarray(spec_probs, dtype=np.float64)
    classes = np.asarray(classes, dtype=np.int64)
    y = np.asarray(y, dtype=np.int64)
    if sp.ndim != 2 or sp.shape != (y.size, classes.size + 1) or y.size == 0:
        raise EnsembleError(
            f"calibration needs (N, |S|+1) = ({y.size}, {classes.size + 1}) probabilities for N >= 1 labelled "
            f"validation images, got {sp.shape}; pass the specialist's validation outputs and labels"
        )
    cell = np.full(y.size, classes.size)
    lookup = {int(c): i for i, c in enumerate(classes)}
    cell[:] = [lookup.get(int(label), classes.size) for label in y]

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(temper(sp, np.exp(log_t))[np.arange(y.size), cell], _TINY, None)).mean())

    lo, hi = np.log(TEMPERATURE_RANGE)
    t = float(np.exp(minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}).x))
    return Calibration(temperature=t, mean=temper(sp, t).mean(axis=0))


def evidence_update(spec_probs: Probs, classes: Labels, p_gen: Probs, calibration: Calibration) -> np.ndarray:
    """The generalist's distribution updated by one specialist's calibrated evidence.

    ``q_j ∝ p_gen_j · r(cell(j))`` with ``r = temper(p_m, T) / mean``: the specialist's tempered output against
    what it says on average. A specialist that knows nothing (its output is its mean, e.g. noise after
    calibration) leaves ``q = p_gen``; one that is sure of a class moves mass to it, in proportion to the
    generalist's own odds within each cell (the dustbin's mass stays where the generalist put it).

    Args:
        spec_probs: (N, |S| + 1) specialist probabilities, dustbin last.
        classes: (|S|,) its special class indices.
        p_gen: (N, C) generalist probabilities.
        calibration: from :func:`calibrate` on validation images.

    Returns:
        (N, C) float64 rows summing to 1.
    """
    pg = np.asarray(p_gen, dtype=np.float64)
    classes = _check_groups([classes], pg.shape[1])[0]
    ratio = temper(spec_probs, calibration.temperature) / np.clip(calibration.mean, _TINY, None)
    cells = cell_index(classes, pg.shape[1])
    q = pg * ratio[:, cells]
    total = q.sum(axis=1, keepdims=True)
    return np.divide(q, total, out=pg.copy(), where=total > 0)


# --------------------------------------------------------------------------------------------
# activation


def activation(
    p_gen: Probs,
    groups: Groups,
    *,
    top_n: int = 1,
    threshold: float = 0.0,
    confident: float = 1.0,
    max_active: int = 0,
) -> np.ndarray:
    """Which specialists to run: those whose classes meet the generalist's top-n classes.

    With ``threshold > 0`` a specialist switched on by the top-n classes is skipped unless the generalist's
    mass on its whole group, ``sum_{j in S_m} p_gen[i, j]``, is at least ``threshold`` (HD-CNN's conditional
    execution): a specialist is skipped where the generalist spreads its mass beyond the group.
    ``threshold = 0`` is the paper's rule.

    With ``confident < 1`` no specialist runs for an image whose generalist top-1 probability exceeds
    ``confident``: the generalist answers alone for an image it is sure of (a cascade; :func:`specialkit.frontier.
    choose_confident` picks the value on validation images). ``confident = 1`` skips nothing.

    With ``max_active > 0`` an image runs at most that many of the specialists switched on: those whose group holds
    the most generalist mass (ties towards the lower index). Where groups overlap, the top class switches on several
    specialists; ``max_active = 1`` keeps the one most sure to hold the answer. ``max_active = 0`` keeps every one
    (the paper's rule).

    Args:
        p_gen: (N, C) generalist probabilities.
        groups: M arrays of class indices (``ClusterSpec.indices()`` or each specialist's classes).
        top_n: how many of the generalist's most probable classes to look at (paper: 1). Ties are
            broken towards the lower class index.
        threshold: the group mass a specialist needs to run, in [0, 1] (0: no skipping).
        confident: the generalist's top-1 probability above which an image runs no specialist, in (0, 1]
            (1: no skipping).
        max_active: the most specialists one image runs, those with the most group mass (0: no limit).

    Returns:
        (N, M) bool, ``active[i, m]`` when ``groups[m]`` contains one of image i's top-n classes (and its group
        mass reaches ``threshold``, and image i's top-1 probability is at most ``confident``, and it is among
        the ``max_active`` active groups with the most mass).
    """
    p = _check_p_gen(p_gen)
    num_classes = p.shape[1]
    if not _is_int(top_n) or not 1 <= top_n <= num_classes:
        raise EnsembleError(f"top_n must be an integer in [1, C={num_classes}] (the paper uses 1), got {top_n!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise EnsembleError(
            f"threshold must be in [0, 1] (a group's probability mass; 0 skips nothing), got {threshold!r}"
        )
    if not 0.0 < float(confident) <= 1.0:
        raise EnsembleError(
            f"confident must be in (0, 1] (the generalist's top-1 probability above which it answers alone; "
            f"1 skips nothing), got {confident!r}"
        )
    if not _is_int(max_active) or max_active < 0:
        raise EnsembleError(
            f"max_active must be a whole number >= 0 (the most specialists one image runs; 0 = no limit), "
            f"got {max_active!r}"
        )
    member = _membership(_check_groups(groups, num_classes), num_classes)
    if top_n == 1:
        active = member[np.argmax(p, axis=1)]
    else:
        top = np.argsort(-p, axis=1, kind="stable")[:, :top_n]
        active = member[top].any(axis=1)
    if threshold > 0:
        active &= p @ member.astype(np.float64) >= threshold
    if confident < 1:
        active &= (p.max(axis=1) <= confident)[:, None]
    if 0 < max_active < active.shape[1]:
        score = np.where(active, p @ member.astype(np.float64), -np.inf)
        keep = np.zeros_like(active)
        np.put_along_axis(keep, np.argsort(-score, axis=1, kind="stable")[:, :max_active], True, axis=1)
        active &= keep
    return active


def fraction_routed(active: Mask) -> dict[str, float]:
    """How much specialist work an activation mask asks for.

    Args:
        active: (N, M) bool, e.g. :func:`activation`.

    Returns:
        ``fraction_routed``: the share of images that run at least one specialist; ``specialists_per_image``:
        the mean number of specialists run per image.
    """
    act = checks.as_bools(active, (-1, -1), name="active", error=EnsembleError)
    if act.shape[0] == 0:
        raise EnsembleError("active has no rows: pass the (N, M) mask of at least one image")
    return {
        "fraction_routed": float(act.any(axis=1).mean()),
        "specialists_per_image": float(act.sum(axis=1).mean()),
    }


def coverage_count(groups: Groups, num_classes: int) -> np.ndarray:
    """(C,) int64: how many groups contain each class (paper Table 4 buckets)."""
    return _membership(_check_groups(groups, num_classes), num_classes).sum(axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# the paper's KL combination


@dataclass(frozen=True, eq=False)
class _Layout:
    """All specialists' cells side by side: K = sum_m (|S_m| + 1) columns."""

    cells: np.ndarray  # (C, K) float64, cells[j, k] = 1 when class j lies in cell k
    owner: np.ndarray  # (K,) int64 specialist of each column
    offsets: np.ndarray  # (M + 1,) first column of each specialist


def _layout(specs: Sequence[SpecialistOutputs], num_classes: int) -> _Layout:
    sizes = np.array([s.classes.size + 1 for s in specs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    cells = np.zeros((num_classes, int(offsets[-1])), dtype=np.float64)
    for m, s in enumerate(specs):
        cells[:, offsets[m] + s.classes.size] = 1.0
        cells[s.classes, offsets[m] + s.classes.size] = 0.0
        cells[s.classes, offsets[m] + np.arange(s.classes.size)] = 1.0
    owner = np.repeat(np.arange(len(specs)), sizes)
    return _Layout(cells=cells, owner=owner, offsets=offsets)


def _kl_rows(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """(N,) sum_j p log(p / r), with 0 log 0 = 0 and p > 0 = r giving inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(r)), 0.0)
    return terms.sum(axis=1)


def _prepare_kl(
    p_gen: Probs, specialists: Sequence[SpecialistLike], active: Mask
) -> tuple[np.ndarray, list[SpecialistOutputs], np.ndarray, list[np.ndarray]]:
    pg = _check_p_gen(p_gen)
    specs = _as_specialists(specialists)
    act = _check_mask(active, (pg.shape[0], len(specs)), "active")
    probs = _read_probs(specs, act, pg.shape[1])
    return pg, specs, act, probs


def kl_objective(q: np.ndarray, p_gen: Probs, specialists: Sequence[SpecialistLike], active: Mask) -> np.ndarray:
    """The paper's objective per image: ``KL(p_gen || q) + sum_{m active} KL(p_m || collapse_m(q))``.

    Args:
        q: (N, C) candidate distributions.
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists (rows where a specialist is inactive are not read).
        active: (N, M) bool.

    Returns:
        (N,) float64 objective values (``inf`` where q gives zero mass to a cell with mass).
    """
    pg, specs, act, probs = _prepare_kl(p_gen, specialists, active)
    q = np.asarray(q, dtype=np.float64)
    if q.shape != pg.shape:
        raise EnsembleError(f"q must have the shape of p_gen {pg.shape}, got {q.shape}")
    out = _kl_rows(_normalise(pg), q)
    for m, s in enumerate(specs):
        rows = act[:, m]
        if rows.any():
            out[rows] += _kl_rows(probs[m][rows], collapse(q[rows], s.classes))
    return out


def solve_kl(
    p_gen: Probs,
    specialists: Sequence[SpecialistLike],
    active: Mask,
    *,
    tol: float = 1e-10,
    max_iter: int = 1_000,
    newton_after: int | None = 200,
) -> KLSolution:
    """Minimise ``KL(p_gen || q) + sum_{m active} KL(p_m || collapse_m(q))`` for every image at once.

    The objective is convex in q (each term is ``-sum p log(linear function of q)``). The EM /
    multiplicative update of docs/METHOD.md section 4,

        q_j <- (p_gen_j + sum_{m active} p_m[cell_m(j)] * q_j / Q_m[cell_m(j)]) / (1 + |A|),

    with ``Q_m = collapse_m(q)``, keeps q on the simplex, never increases the objective, and
    converges to the global minimum from any strictly positive start. In logits ``z`` with
    ``q = softmax(z)``, ``grad_z objective = (1 + |A|) * (q - EM(q))``, so a fixed point is exactly a
    stationary point of the paper's gradient descent.

    Implementation: all specialists' cells sit side by side in one (C, K) 0/1 matrix ``B``, so one
    iteration for all images is ``Q = q @ B; q' = (p_gen + q * ((P / Q) @ B.T)) / (1 + |A|)``
    with ``P`` the specialists' outputs (zero where inactive). Images that have converged are
    dropped from the working set.

    Start: ``p_gen`` itself. One EM step from it is the average of ``p_gen`` and the active
    specialists' outputs expanded in proportion to ``p_gen``; with a single active specialist that
    is already the optimum (each cell gets mass ``(P_gen + P_m) / 2``, spread inside the cell in
    proportion to ``p_gen``), so iterations are spent only on images with two or more active
    specialists. A multiplicative update keeps a class at 0 forever, so a class at 0 whose
    gradient asks for mass (it would raise the gap bound above ``tol``) is given 1e-12 and grows
    from there (e.g. a class the generalist rules out but that lies in every active dustbin).

    EM converges linearly, and very slowly on some images with confident, disagreeing models
    (thousands of iterations). Images still unconverged after ``newton_after`` EM iterations switch
    to damped Newton steps, each followed by one EM step. The Newton step works in relative
    coordinates ``dq = q * e`` on the simplex with Hessian
    ``diag(p_gen) + sum_k P_k (q * b_k / Q_k)(q * b_k / Q_k)^T`` (``b_k`` the classes of cell k),
    Levenberg-Marquardt damped by ``lambda * (1 + |A|) * diag(q)`` -- EM's own curvature, so a
    large lambda gives a short EM-like step -- for lambda = 1e-8, 1e-4, 1e-2, 1, 100 in turn, and
    step lengths t = 1, 1/2, 1/4, 1/8; an entry moves by ``1 + t e`` when it grows and
    ``exp(t e)`` when it shrinks, so q stays positive. The first step that passes an Armijo test
    is taken; if none does, the EM step is. So every iteration decreases the objective (up to
    rounding, 1e-14 relative). ``newton_after=None`` runs plain EM only.

    Stop, per image, when ``max_j |q'_j - q_j| < tol`` and either the Frank-Wolfe duality gap
    ``(1 + |A|) * max_j (-grad_j / (1 + |A|) - 1)`` (``= (1 + |A|) * max_j (EM(q)_j / q_j - 1)``
    where ``q_j > 0``), an upper bound on ``objective(q) - min``, or -- in the Newton phase -- the
    squared Newton decrement (about twice ``objective(q) - min`` near the optimum) is < tol.

    Args:
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists; only rows where ``active`` is True are read (others may be NaN).
        active: (N, M) bool, usually :func:`activation`.
        tol: tolerance on the change of q and on the objective gap bound.
        max_iter: iteration cap (EM and Newton iterations together); images that hit it are
            reported in ``converged``.
        newton_after: EM iterations before an image switches to Newton steps (None: never).

    Returns:
        :class:`KLSolution`; images with no active specialist get ``p_gen`` exactly (as float64).
    """
    if not tol > 0:
        raise EnsembleError(f"tol must be > 0, got {tol!r}")
    if not _is_int(max_iter) or max_iter < 1:
        raise EnsembleError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if newton_after is not None and (not _is_int(newton_after) or newton_after < 0):
        raise EnsembleError(f"newton_after must be None or an integer >= 0, got {newton_after!r}")
    pg, specs, act, probs = _prepare_kl(p_gen, specialists, active)
    n = pg.shape[0]
    q = pg.copy()
    iterations = np.zeros(n, dtype=np.int64)
    converged = np.ones(n, dtype=bool)
    gap_est = np.zeros(n, dtype=np.float64)
    n_active = act.sum(axis=1)
    rows = np.flatnonzero(n_active > 0)
    if rows.size == 0:
        return KLSolution(q=q, iterations=iterations, converged=converged, gap=gap_est)

    solved = rows.copy()
    layout = _layout(specs, pg.shape[1])
    cells, cells_t = layout.cells, np.ascontiguousarray(layout.cells.T)
    big_p = np.concatenate([p[rows] for p in probs], axis=1)
    g = _normalise(pg[rows])
    x = g.copy()
    weight = (1.0 + n_active[rows]).astype(np.float64)[:, None]
    for it in range(1, max_iter + 1):
        em, factor = _em_step(x, g, big_p, weight, cells, cells_t)
        excess = weight * (factor - 1.0)
        gap = excess.max(axis=1)
        revive = (x == 0) & (excess > tol)
        if revive.any():
            em = _normalise(np.where(revive, _REVIVE, em))
        if newton_after is None or it <= newton_after:
            new, decrement = em, np.full(rows.size, np.inf)
        else:
            new, decrement = _newton_step(x, g, big_p, weight, cells, em)
            new = _em_step(new, g, big_p, weight, cells, cells_t)[0]  # keeps every q_j >= p_gen_j / (1 + |A|)
            revived = revive.any(axis=1)
            new[revived], decrement[revived] = em[revived], np.inf
        change = np.abs(new - x).max(axis=1)
        x = new
        done = (change < tol) & ((gap < tol) | (decrement < tol))
        if it == max_iter:
            converged[rows[~done]] = False
            done[:] = True
        if done.any():
            q[rows[done]] = x[done]
            iterations[rows[done]] = it
            gap_est[rows[done]] = np.clip(np.minimum(gap[done], decrement[done] / 2), 0.0, None)
            keep = ~done
            rows, x, g, big_p, weight = rows[keep], x[keep], g[keep], big_p[keep], weight[keep]
            if rows.size == 0:
                break
    q[solved] = _normalise(q[solved])
    return KLSolution(q=q, iterations=iterations, converged=converged, gap=gap_est)


def _em_step(
    x: np.ndarray, g: np.ndarray, p: np.ndarray, weight: np.ndarray, cells: np.ndarray, cells_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One EM update of (n, C) ``x`` (``p: (n, K)``, ``weight: (n, 1) = 1 + |A|``).

    Returns ``EM(x)`` and ``factor = -grad f / (1 + |A|)``, which is ``EM(x) / x`` where ``x > 0``;
    ``(1 + |A|) * max(factor - 1)`` is the Frank-Wolfe gap.
    """
    back = (p / np.maximum(x @ cells, _TINY)) @ cells_t
    em = (g + x * back) / weight
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(x > 0, g / x, 0.0) + back
    return em, factor / weight


def _raw_objective(x: np.ndarray, g: np.ndarray, p: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(n,) objective up to a constant: ``-sum g log x - sum P log Q`` (``inf`` where a weighted entry is 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(g > 0, g * np.log(x), 0.0).sum(axis=1) - np.where(p > 0, p * np.log(x @ cells), 0.0).sum(
            axis=1
        )


def _newton_step(
    x: np.ndarray, g: np.ndarray, p: np.ndarray, weight: np.ndarray, cells: np.ndarray, em: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One damped (Levenberg-Marquardt) Newton step per row (see :func:`solve_kl`).

    Returns the new (n, C) points (``em`` where no damped step decreases the objective) and the
    (n,) squared Newton decrements of nearly undamped steps (``inf`` otherwise), which estimate
    ``2 * (objective - min)``.
    """
    n, c = x.shape
    big_q = np.maximum(x @ cells, _TINY)
    scaled_grad = -weight * em  # x * grad f
    z = x[:, :, None] * (cells[None, :, :] / big_q[:, None, :])  # (n, C, K): x_j b_jk / Q_k
    hess = np.matmul(z * p[:, None, :], z.transpose(0, 2, 1))
    diag = np.arange(c)
    hess[:, diag, diag] += g + _TINY
    rhs = np.stack([-scaled_grad, x], axis=2)
    f0 = _raw_objective(x, g, p, cells)
    new, decrement = em.copy(), np.full(n, np.inf)
    pending = np.ones(n, dtype=bool)
    with np.errstate(all="ignore"):
        for damping in _DAMPING:
            idx = np.flatnonzero(pending)
            if idx.size == 0:
                break
            h = hess[idx].copy()
            h[:, diag, diag] += damping * weight[idx] * x[idx]  # EM's own curvature: large damping -> EM
            sol = _solve_rows(h, rhs[idx])
            xi, u, v = x[idx], sol[..., 0], sol[..., 1]
            e = u - ((xi * u).sum(axis=1) / (xi * v).sum(axis=1))[:, None] * v
            slope = (scaled_grad[idx] * e).sum(axis=1)
            valid = np.isfinite(e).all(axis=1) & (slope < 0)
            idx, xi, e, slope = idx[valid], xi[valid], e[valid], slope[valid]
            slack = _ROUNDING * (1.0 + np.abs(f0[idx]))  # below rounding the objective cannot tell
            for t in _STEPS:
                te = t * e  # multiply by 1 + te when growing, exp(te) when shrinking: stays positive
                trial = _normalise(xi * np.where(te >= 0, 1.0 + te, np.exp(np.maximum(te, -_MAX_LOG_STEP))))
                ok = _raw_objective(trial, g[idx], p[idx], cells) <= f0[idx] + 1e-4 * t * slope + slack
                new[idx[ok]] = trial[ok]
                if damping <= _DAMPING[0]:
                    decrement[idx[ok]] = -slope[ok]
                pending[idx[ok]] = False
                keep = ~ok
                idx, xi, e, slope, slack = idx[keep], xi[keep], e[keep], slope[keep], slack[keep]
                if idx.size == 0:
                    break
    return new, decrement


def _solve_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched ``solve(a, b)`` with Jacobi scaling; NaN for rows that are singular."""
    scale = 1.0 / np.sqrt(np.maximum(np.abs(np.diagonal(a, axis1=1, axis2=2)), _TINY))
    a_s = a * scale[:, :, None] * scale[:, None, :]
    b_s = b * scale[:, :, None]
    try:
        y = np.linalg.solve(a_s, b_s)
    except np.linalg.LinAlgError:
        y = np.full_like(b_s, np.nan)
        for i in range(len(a_s)):
            with contextlib.suppress(np.linalg.LinAlgError):
                y[i] = np.linalg.solve(a_s[i], b_s[i])
    return y * scale[:, :, None]


def combine_kl(
    p_gen: Probs,
    specialists: Sequence[SpecialistLike],
    active: Mask,
    *,
    tol: float = 1e-10,
    max_iter: int = 1_000,
    newton_after: int | None = 200,
    calibration: Sequence[Calibration] | None = None,
) -> np.ndarray:
    """The paper's combination: ``argmin_q KL(p_gen || q) + sum_{m active} KL(p_m || collapse_m(q))``.

    Batched EM over all images (Newton steps for the few slow ones); see :func:`solve_kl` for the
    update, start and stopping rule.
    Reads only the rows where a specialist is active, so it works on the output of
    :func:`run_conditionally` with the same ``active`` mask. Warns (:class:`ConvergenceWarning`)
    when images hit ``max_iter``.

    With ``calibration`` (one per specialist, fitted on validation images; rule ``"kl_calibrated"``) the same
    objective and solver, but each active specialist's target ``p_m`` is its calibrated evidence collapsed to its
    cells, ``collapse_m(evidence_update(p_m, S_m, p_gen, cal_m))``: a specialist whose tempered output is its mean
    (noise after calibration) then agrees with the generalist and leaves ``q = p_gen``; an informed one still moves
    mass. ``None`` (default) is the paper's rule, unchanged.

    Args:
        p_gen: (N, C) generalist probabilities.
        specialists: M :class:`SpecialistOutputs` (or ``(classes, probs)`` tuples).
        active: (N, M) bool, usually ``activation(p_gen, groups, top_n=1)``.
        tol: tolerance on the change of q and on the objective gap bound.
        max_iter: iteration cap.
        newton_after: EM iterations before an image switches to Newton steps (None: plain EM).
        calibration: one :class:`Calibration` per specialist (from :func:`calibrate`), or ``None`` for the
            paper's rule.

    Returns:
        q: (N, C) float64; images with no active specialist get ``p_gen`` exactly.
    """
    if calibration is not None:
        specialists = _evidence_targets(p_gen, specialists, active, calibration)
    sol = solve_kl(p_gen, specialists, active, tol=tol, max_iter=max_iter, newton_after=newton_after)
    if not sol.converged.all():
        warnings.warn(
            f"combine_kl: {int((~sol.converged).sum())} images hit max_iter={max_iter} before tol={tol:g} "
            f"(largest objective gap estimate {sol.gap.max():.3g}); raise max_iter",
            ConvergenceWarning,
            stacklevel=2,
        )
    return sol.q


def _evidence_targets(
    p_gen: Probs, specialists: Sequence[SpecialistLike], active: Mask, calibration: Sequence[Calibration]
) -> list[SpecialistOutputs]:
    """The specialists with each active row replaced by ``collapse_m(evidence_update(p_m, S_m, p_gen, cal_m))``.

    Each target row is a distribution over the specialist's cells (``evidence_update`` rows sum to 1; a specialist
    covering every class keeps an empty dustbin); inactive rows are NaN, as :func:`solve_kl` never reads them.
    """
    pg, specs, act, probs = _prepare_kl(p_gen, specialists, active)
    cal = _check_calibration(calibration, specs)
    g = _normalise(pg)
    out = []
    for m, s in enumerate(specs):
        rows = act[:, m]
        target = np.full(s.probs.shape, np.nan)
        if rows.any():
            target[rows] = collapse(evidence_update(probs[m][rows], s.classes, g[rows], cal[m]), s.classes)
        out.append(SpecialistOutputs(classes=s.classes, probs=target))
    return out


def _image_objective(
    g: np.ndarray, p: np.ndarray, cells: np.ndarray
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """Objective and gradient in logits z for one image; ``p: (K_a,)``, ``cells: (C, K_a)``."""
    g_pos, p_pos = g > 0, p > 0
    const = float(np.sum(g[g_pos] * np.log(g[g_pos])) + np.sum(p[p_pos] * np.log(p[p_pos])))
    total = 1.0 + float(p.sum())  # 1 + |A|: every active specialist's cells sum to 1

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        z = z - z.max()
        e = np.exp(z)
        s = e.sum()
        q = e / s
        log_q = z - np.log(s)
        big_q = q @ cells
        with np.errstate(divide="ignore"):
            f = const - float(g @ log_q) - float(p[p_pos] @ np.log(big_q[p_pos]))
        grad = total * q - g - q * (cells @ (p / np.maximum(big_q, _TINY)))
        return f, grad

    return fun


def _torch_image_solve(
    g: np.ndarray, p: np.ndarray, cells: np.ndarray, z0: np.ndarray, tol: float, max_iter: int
) -> np.ndarray:
    import torch

    gt, pt, bt = (torch.from_numpy(a) for a in (g, p, cells))
    p_pos = pt > 0
    z = torch.tensor(z0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-16,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        log_q = torch.log_softmax(z, dim=0)
        big_q = torch.exp(log_q) @ bt
        f = -(gt * log_q).sum() - (pt[p_pos] * torch.log(big_q[p_pos])).sum()
        f.backward()
        return f

    opt.step(closure)
    return torch.softmax(z.detach(), dim=0).numpy()


def combine_kl_gradient(
    p_gen: Probs,
    specialists: Sequence[SpecialistLike],
    active: Mask,
    *,
    method: str = "lbfgs",
    tol: float = 1e-8,
    max_iter: int = 5_000,
    lr: float | None = None,
) -> np.ndarray:
    """The paper's way to combine: ``q = softmax(z)``, optimise ``z`` image by image.

    Same objective and result as :func:`combine_kl` (used as its baseline and cross-check). Start:
    ``z = log p_gen`` (entries below 1e-12 lifted to 1e-12, since softmax cannot reach 0). Gradient:
    ``grad_z = (1 + |A|) q - p_gen - q * sum_m p_m[cell_m] / Q_m[cell_m]``.

    Args:
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists; only active rows are read.
        active: (N, M) bool.
        method: ``"lbfgs"`` (scipy L-BFGS-B, analytic gradient, ``gtol=tol``), ``"torch-lbfgs"``
            (``torch.optim.LBFGS`` in float64 with autograd and strong-Wolfe line search,
            ``tolerance_grad=tol``) or ``"gd"`` (plain gradient descent with step ``lr``, default
            ``1 / (1 + |A|)``, until ``max |grad| < tol`` -- the paper's literal method, slow).
        tol: gradient tolerance.
        max_iter: iteration cap per image.
        lr: step size for ``"gd"``.

    Returns:
        q: (N, C) float64; images with no active specialist get ``p_gen`` exactly.
    """
    if method not in GRADIENT_METHODS:
        raise EnsembleError(f"unknown method {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
    pg, specs, act, probs = _prepare_kl(p_gen, specialists, active)
    q = pg.copy()
    layout = _layout(specs, pg.shape[1])
    big_p = np.concatenate(probs, axis=1)
    col_active = act[:, layout.owner]
    with _one_blas_thread():
        for i in np.flatnonzero(act.any(axis=1)):
            q[i] = _solve_image(pg[i], big_p[i], layout.cells, col_active[i], method, tol, max_iter, lr)
    return q


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Per-image problems are tiny; BLAS threads only add overhead (30x on a busy 2-core box)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _solve_image(
    g: np.ndarray,
    p_all: np.ndarray,
    cells_all: np.ndarray,
    col_active: np.ndarray,
    method: str,
    tol: float,
    max_iter: int,
    lr: float | None,
) -> np.ndarray:
    """One image of :func:`combine_kl_gradient`: (C,) q."""
    cols = np.flatnonzero(col_active)
    g = g / g.sum()
    p, cells = p_all[cols], cells_all[:, cols]
    z0 = np.log(_normalise(np.maximum(g, _INIT_FLOOR)[None])[0])
    if method == "torch-lbfgs":
        return _torch_image_solve(g, p, cells, z0, tol, max_iter)
    fun = _image_objective(g, p, cells)
    if method == "lbfgs":
        from scipy.optimize import minimize

        res = minimize(
            fun,
            z0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-16, "maxcor": 20},
        )
        z = res.x
    else:
        step = 1.0 / float(p.sum() + 1.0) if lr is None else float(lr)
        z = z0.copy()
        for _ in range(max_iter):
            _, grad = fun(z)
            if np.abs(grad).max() < tol:
                break
            z -= step * grad
    e = np.exp(z - z.max())
    return e / e.sum()


# --------------------------------------------------------------------------------------------
# option (a): the most confident specialists


def specialist_confidence(spec_probs: Probs, *, confidence: str = "max") -> np.ndarray:
    """(N,) confidence of one specialist.

    ``"max"``: its largest non-dustbin probability (how sure it is of one of its own classes);
    ``"mass"``: ``1 - dustbin`` (how sure it is that the image belongs to its group at all).
    """
    if confidence not in CONFIDENCES:
        raise EnsembleError(f"unknown confidence {confidence!r}; use one of {', '.join(CONFIDENCES)}")
    sp = np.asarray(spec_probs, dtype=np.float64)
    return sp[:, :-1].max(axis=1) if confidence == "max" else 1.0 - sp[:, -1]


def combine_top_confident(
    p_gen: Probs,
    specialists: Sequence[SpecialistLike],
    *,
    n: int = 2,
    confidence: str = "max",
    active: Mask | None = None,
    calibration: Sequence[Calibration] | None = None,
) -> np.ndarray:
    """Option (a): run the specialists, keep the ``n`` most confident, average their outputs.

    With ``calibration`` (one per specialist, fitted on validation images; what the pipeline passes), each
    specialist is first tempered, its confidence read from the tempered output, and its "output" is the
    generalist updated by its evidence (:func:`evidence_update`), so a specialist that knows nothing leaves
    the generalist's answer as it was. Without it, the rule as first built (below).

    For image i, among the candidate specialists (all of them, or those with ``active[i, m]``),
    take the ``n`` with the highest :func:`specialist_confidence` (ties towards the lower index)
    and return ``q_i = mean_{m in top} expand_to_full(p_m)_i``: each specialist's non-dustbin
    probabilities on its own classes, its dustbin mass spread over the other classes in proportion
    to ``p_gen``. Images with fewer than ``n`` candidates average the ones they have; images with
    none get ``p_gen``.

    Reads every candidate row: without ``active`` that means running every specialist on every
    image (no conditional execution); with ``active`` (e.g. generalist top-n gating) only active rows.

    Args:
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists.
        n: how many specialists to average per image (>= 1, <= M).
        confidence: ``"max"`` or ``"mass"`` (see :func:`specialist_confidence`).
        active: optional (N, M) bool restricting the candidates.
        calibration: one :class:`Calibration` per specialist (from :func:`calibrate`), or ``None`` for the rule as
            first built.

    Returns:
        q: (N, C) float64.
    """
    pg = _check_p_gen(p_gen)
    specs = _as_specialists(specialists)
    m_count = len(specs)
    if not _is_int(n) or not 1 <= n <= max(m_count, 1):
        raise EnsembleError(f"n must be an integer in [1, M={m_count}], got {n!r}")
    if confidence not in CONFIDENCES:
        raise EnsembleError(f"unknown confidence {confidence!r}; use one of {', '.join(CONFIDENCES)}")
    shape = (pg.shape[0], m_count)
    cand = np.ones(shape, dtype=bool) if active is None else _check_mask(active, shape, "active")
    probs = _read_probs(specs, cand, pg.shape[1])
    if calibration is not None:
        probs = [temper(p, c.temperature) for p, c in zip(probs, _check_calibration(calibration, specs))]
    conf = np.full(shape, -np.inf)
    for m, p in enumerate(probs):
        conf[cand[:, m], m] = specialist_confidence(p[cand[:, m]], confidence=confidence)
    order = np.argsort(-conf, axis=1, kind="stable")[:, :n]
    chosen = np.zeros(shape, dtype=bool)
    np.put_along_axis(chosen, order, True, axis=1)
    chosen &= cand
    if calibration is not None:  # probs are tempered already: read them as evidence at T = 1
        calibration = [Calibration(1.0, c.mean) for c in calibration]
    return _mixture(
        pg, specs, probs, chosen.astype(np.float64), np.zeros(pg.shape[0]), normalise=True, calibration=calibration
    )


def _check_calibration(calibration: Sequence[Calibration], specs: Sequence[SpecialistOutputs]) -> list[Calibration]:
    cal = list(calibration)
    if len(cal) != len(specs) or any(np.asarray(c.mean).shape != (s.classes.size + 1,) for c, s in zip(cal, specs)):
        raise EnsembleError(
            f"calibration must hold one Calibration per specialist ({len(specs)}) with a mean over its "
            "|S|+1 cells; fit them with ensemble.calibrate on validation outputs"
        )
    return cal


def _mixture(
    pg: np.ndarray,
    specs: Sequence[SpecialistOutputs],
    probs: Sequence[np.ndarray],
    weights: np.ndarray,
    gen_weight: np.ndarray,
    *,
    normalise: bool,
    calibration: Sequence[Calibration] | None = None,
) -> np.ndarray:
    """``q = gen_weight * p_gen + sum_m weights[:, m] * expand_m``, rows with zero weight -> p_gen. ``expand_m`` is
    :func:`evidence_update` with ``calibration``, else :func:`expand_to_full`."""
    g = _normalise(pg)
    q = gen_weight[:, None] * g
    cal = None if calibration is None else _check_calibration(calibration, specs)
    for m, (s, p) in enumerate(zip(specs, probs)):
        rows = weights[:, m] > 0
        if rows.any():
            full = (
                expand_to_full(p[rows], s.classes, g[rows])
                if cal is None
                else evidence_update(p[rows], s.classes, g[rows], cal[m])
            )
            q[rows] += weights[rows, m, None] * full
    total = gen_weight + weights.sum(axis=1)
    none = total <= 0
    q[none] = pg[none]
    if normalise:
        q[~none] /= total[~none, None]
    return q


# --------------------------------------------------------------------------------------------
# option (b): mixture of experts gated by the generalist


def moe_gates(p_gen: Probs, groups: Groups, *, threshold: float = 0.0) -> MoEGates:
    """Gates of the generalist-weighted mixture of experts (see :func:`combine_moe`).

    Args:
        p_gen: (N, C) generalist probabilities.
        groups: M arrays of class indices.
        threshold: skip specialist m on image i when its group mass ``w_im < threshold``.

    Returns:
        :class:`MoEGates`.
    """
    pg = _normalise(_check_p_gen(p_gen))
    if not 0.0 <= float(threshold) <= 1.0:
        raise EnsembleError(f"threshold must be in [0, 1] (a probability mass), got {threshold!r}")
    member = _membership(_check_groups(groups, pg.shape[1]), pg.shape[1])
    cover = member.sum(axis=1)
    share = member / np.maximum(cover, 1)[:, None]
    gates = pg @ share
    mass = pg @ member.astype(np.float64)
    run = (mass >= threshold) & (gates > 0)
    gates = np.where(run, gates, 0.0)
    generalist = np.clip(1.0 - gates.sum(axis=1), 0.0, 1.0)
    return MoEGates(specialist=gates, generalist=generalist, run=run, group_mass=mass)


def combine_moe(
    p_gen: Probs,
    specialists: Sequence[SpecialistLike],
    *,
    threshold: float = 0.0,
    calibration: Sequence[Calibration] | None = None,
) -> np.ndarray:
    """Option (b): the generalist's probabilities weight the specialists (mixture of experts).

    With ``calibration`` (one per specialist, fitted on validation images; what the pipeline passes) each
    expert's opinion is the generalist updated by that specialist's calibrated evidence
    (:func:`evidence_update`) instead of the specialist's own output with its dustbin spread, so an expert
    that knows nothing leaves the generalist's answer unchanged. Without it, the rule as first built:

    With ``member[j, m] = (j in S_m)`` and ``cover_j = sum_m member[j, m]``:

    * gate of specialist m: ``g_m = sum_{j in S_m} p_gen_j / cover_j`` -- each class's generalist
      probability is shared equally by the specialists covering it (for disjoint groups this is
      the group mass ``w_m = sum_{j in S_m} p_gen_j``, HD-CNN's coarse-category weight);
    * conditional execution (HD-CNN): specialist m is skipped when ``w_m < threshold`` (or
      ``w_m == 0``); its gate moves to the generalist;
    * gate of the generalist: ``g_0 = 1 - sum_{m run} g_m`` (the mass of uncovered classes plus
      the gates of skipped specialists), so ``g_0 + sum_m g_m = 1``;
    * ``q = g_0 * p_gen + sum_{m run} g_m * expand_to_full(p_m)`` (dustbin spread in proportion
      to ``p_gen``).

    ``threshold = 0`` runs every specialist with non-zero group mass; ``threshold > 1`` is refused;
    a specialist that agrees with the generalist (``p_m = collapse_m(p_gen)``) leaves q = p_gen.
    Reads only rows where ``moe_gates(...).run`` is True (pass that mask to
    :func:`run_conditionally`).

    Args:
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists.
        threshold: group-mass threshold for running a specialist, in [0, 1].
        calibration: one :class:`Calibration` per specialist (from :func:`calibrate`), or ``None`` for the rule as
            first built.

    Returns:
        q: (N, C) float64.
    """
    pg = _check_p_gen(p_gen)
    specs = _as_specialists(specialists)
    gates = moe_gates(pg, [s.classes for s in specs], threshold=threshold)
    probs = _read_probs(specs, gates.run, pg.shape[1])
    return _mixture(pg, specs, probs, gates.specialist, gates.generalist, normalise=True, calibration=calibration)


# --------------------------------------------------------------------------------------------
# dispatch and conditional execution


def combine(
    rule: str,
    p_gen: Probs,
    specialists: Sequence[SpecialistLike] = (),
    *,
    active: Mask | None = None,
    top_n: int = 1,
    gated: bool = True,
    **options: object,
) -> np.ndarray:
    """Combine with a named rule.

    Args:
        rule: ``"generalist"`` (p_gen itself), ``"kl"`` (:func:`combine_kl`, the paper's rule),
            ``"kl_calibrated"`` (:func:`combine_kl` with ``calibration``, which it requires), ``"top_confident"``
            (:func:`combine_top_confident`) or ``"moe"`` (:func:`combine_moe`).
        p_gen: (N, C) generalist probabilities.
        specialists: M specialists.
        active: (N, M) bool; for ``"kl"``, ``"kl_calibrated"`` and ``"top_confident"`` defaults to
            ``activation(p_gen, groups, top_n=top_n)`` (for ``"top_confident"`` only while ``gated``);
            refused for ``"moe"``, which gates itself (use ``threshold=``).
        top_n: generalist classes looked at when ``active`` is computed here.
        gated: ``"top_confident"`` only: restrict the candidates to the specialists the generalist's
            top-n classes switch on (default). ``False`` lets every specialist compete, so a confident
            specialist can overrule a generalist that is sure the image is none of its classes.
        **options: passed to the rule (``tol``, ``max_iter``, ``n``, ``confidence``, ``threshold``, and
            ``calibration`` for ``kl_calibrated``, ``top_confident`` and ``moe``).

    Returns:
        q: (N, C) float64.
    """
    if rule not in RULES:
        raise EnsembleError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    pg = _check_p_gen(p_gen)
    specs = _as_specialists(specialists)
    if rule == "generalist":
        if options:
            raise EnsembleError(f"rule 'generalist' takes no options, got {sorted(options)}")
        return pg.copy()
    if rule in ("kl", "kl_calibrated"):
        if rule == "kl_calibrated" and options.get("calibration") is None:
            raise EnsembleError(
                "rule 'kl_calibrated' needs calibration= (one Calibration per specialist from ensemble.calibrate on "
                "validation outputs); pass it, or use rule 'kl' for the paper's rule"
            )
        if rule == "kl" and options.get("calibration") is not None:
            raise EnsembleError("rule 'kl' is the paper's rule and takes no calibration; use rule 'kl_calibrated'")
        if active is None:
            active = activation(pg, [s.classes for s in specs], top_n=top_n)
        return combine_kl(pg, specs, active, **options)  # type: ignore[arg-type]
    if rule == "top_confident":
        if active is None and gated:
            active = activation(pg, [s.classes for s in specs], top_n=top_n)
        return combine_top_confident(pg, specs, active=active, **options)  # type: ignore[arg-type]
    if active is not None:
        raise EnsembleError("rule 'moe' chooses its own specialists; drop active= and use threshold=")
    return combine_moe(pg, specs, **options)  # type: ignore[arg-type]


def run_conditionally(
    active: Mask,
    groups: Groups,
    predict_fns: Sequence[Callable[[np.ndarray], np.ndarray]],
    *,
    fill: float = np.nan,
) -> ConditionalRun:
    """Evaluate each specialist only on the images that need it.

    Args:
        active: (N, M) bool -- ``activation(...)`` for ``"kl"``, ``moe_gates(...).run`` for
            ``"moe"``, or all True for ``"top_confident"`` without gating.
        groups: M arrays of class indices (fixes each output width ``|S_m| + 1``).
        predict_fns: M callables; ``predict_fns[m](indices: (n,) int64) -> (n, |S_m| + 1)``
            probabilities of specialist m on those images. Not called when ``n == 0``.
        fill: placeholder for rows a specialist was not run on (default NaN, so a rule that read
            them by mistake would fail loudly).

    Returns:
        :class:`ConditionalRun` with one :class:`SpecialistOutputs` per specialist and the number
        of evaluations (the cost).
    """
    act = checks.as_bools(active, (-1, -1), name="active", error=EnsembleError)
    if not len(groups) == len(predict_fns) == act.shape[1]:
        raise EnsembleError(
            f"need one group and one predict function per column of active: got {len(groups)} groups, "
            f"{len(predict_fns)} functions, {act.shape[1]} columns"
        )
    outs, counts = [], np.zeros(act.shape[1], dtype=np.int64)
    for m, (g, fn) in enumerate(zip(groups, predict_fns)):
        g = np.asarray(g.classes if isinstance(g, SpecialistOutputs) else g)
        probs = np.full((act.shape[0], g.size + 1), fill, dtype=np.float64)
        idx = np.flatnonzero(act[:, m])
        if idx.size:
            got = np.asarray(fn(idx))
            if got.shape != (idx.size, g.size + 1):
                raise EnsembleError(
                    f"predict_fns[{m}] returned shape {got.shape} for {idx.size} images; it must return "
                    f"({idx.size}, {g.size + 1}) probabilities, dustbin last"
                )
            probs[idx] = got
            counts[m] = idx.size
        outs.append(SpecialistOutputs(classes=g, probs=probs))
    return ConditionalRun(specialists=tuple(outs), evaluations=int(counts.sum()), per_specialist=counts)
