"""Input checks that several modules share (internal).

Each check takes the ``error`` class of the calling module (``EnsembleError``, ``ConfusionError``
...), so a caller still sees its module's exception; messages name the problem and the fix, and
``fix=`` lets the caller name the fix in its own terms. Arrays may be numpy arrays, sequences or torch
tensors (detached and moved to the CPU).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .errors import SpecialkitError
from .typing import Labels, Mask, Matrix, Probs

__all__ = [
    "InputError",
    "as_numpy",
    "as_labels",
    "check_label_range",
    "as_probs",
    "as_bools",
    "as_square",
    "check_groups",
]


class InputError(SpecialkitError, ValueError):
    """Bad array input; the default ``error`` of the checks below."""


def as_numpy(a: Any) -> np.ndarray:
    """``a`` as a numpy array (a tensor is detached and copied to the CPU; nothing else is copied)."""
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def as_labels(
    y: Labels,
    *,
    name: str = "labels",
    error: type[Exception] = InputError,
    integral_floats: bool = False,
    fix: str = "pass labels, not scores",
) -> np.ndarray:
    """(N,) int64 class indices.

    Args:
        y: (N,) integer labels.
        name: the argument's name in messages.
        error: exception class raised.
        integral_floats: also accept floats that are whole numbers (and an empty array of any dtype).
        fix: what the caller should pass instead.
    """
    y = as_numpy(y)
    integer = np.issubdtype(y.dtype, np.integer)
    if integral_floats and y.ndim == 1 and not integer:
        integer = y.size == 0 or bool(np.all(np.isfinite(y)) and np.all(y == np.round(y)))
    if y.ndim != 1 or not integer:
        raise error(f"{name} must be a (N,) array of integer class indices, got {y.dtype} {y.shape}; {fix}")
    return y.astype(np.int64, copy=False)


def check_label_range(
    y: np.ndarray,
    num_classes: int,
    *,
    name: str = "labels",
    error: type[Exception] = InputError,
    fix: str = "check num_classes",
) -> None:
    """Raise unless every label of ``y`` (N,) lies in ``[0, num_classes)``."""
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise error(f"{name} has labels outside [0, {num_classes}): min {y.min()}, max {y.max()}; {fix}")


def as_probs(
    p: Probs,
    n: int | None = None,
    *,
    name: str = "probs",
    error: type[Exception] = InputError,
    check_values: bool = True,
    atol: float = 1e-3,
    neg_atol: float | None = None,
) -> np.ndarray:
    """(N, C) probabilities as float64 (with ``check_values=False``: any (N, C) scores, dtype kept).

    Args:
        p: (N, C) array.
        n: the number of rows it must have (one per label), or ``None``.
        name: the argument's name in messages.
        error: exception class raised.
        check_values: check that entries are finite, non-negative and rows sum to 1.
        atol: how far a row may sum from 1.
        neg_atol: how far below 0 an entry may be; ``None`` = ``atol``.
    """
    p = as_numpy(p)
    if p.ndim != 2 or p.shape[1] < 1 or (n is not None and p.shape[0] != n):
        rows = "" if n is None else f" with N={n} rows (one per label)"
        raise error(f"{name} must be (N, C){rows}, got shape {p.shape}; pass one row per image")
    if not check_values:
        return p
    p = p.astype(np.float64, copy=False)
    if not np.all(np.isfinite(p)):
        raise error(f"{name} holds NaN or inf; check the model's outputs")
    neg = atol if neg_atol is None else neg_atol
    bad = (p < -neg).any(axis=1) | (np.abs(p.sum(axis=1) - 1.0) > atol)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise error(
            f"{name} rows must be probabilities (non-negative, summing to 1), row {i} has min {p[i].min():.6g} and "
            f"sums to {p[i].sum():.6g}; if these are logits, apply a softmax first, e.g. scipy.special.softmax(logits, axis=1)"
        )
    return p


def as_bools(
    a: Mask, shape: tuple[int, ...], *, name: str, error: type[Exception] = InputError, fix: str = ""
) -> np.ndarray:
    """A boolean array of exactly ``shape`` (``-1`` = any size along that axis)."""
    arr = as_numpy(a)
    fits = arr.ndim == len(shape) and all(s in (-1, t) for s, t in zip(shape, arr.shape))
    if not fits or arr.dtype != bool:
        want = "(" + ", ".join("N" if s == -1 else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise error(
            f"{name} must be a boolean array of shape {want}, got {arr.dtype} {arr.shape}" + (f"; {fix}" if fix else "")
        )
    return arr


def as_square(m: Matrix, n: int | None = None, *, name: str, error: type[Exception] = InputError) -> np.ndarray:
    """A finite (C, C) float64 matrix (``n`` = the C it must have, or ``None`` for any square)."""
    x = np.asarray(as_numpy(m), dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != x.shape[1] or (n is not None and x.shape[0] != n):
        want = "(C, C) matrix" if n is None else f"({n}, {n}) matrix, one row and column per class"
        raise error(f"{name} must be a square {want}, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise error(f"{name} holds NaN or inf; compute it from finite predictions")
    return x


def check_groups(
    groups: Sequence[Labels], num_classes: int, *, error: type[Exception] = InputError
) -> list[np.ndarray]:
    """M groups of distinct class indices in ``[0, num_classes)``, each as a (|S_m|,) int64 array."""
    out = []
    for m, g in enumerate(groups):
        g = as_numpy(g)
        if g.ndim != 1 or g.size == 0 or not np.issubdtype(g.dtype, np.integer):
            raise error(f"group {m} must be a non-empty 1-D array of class indices, got {g!r}")
        if (g < 0).any() or (g >= num_classes).any() or np.unique(g).size != g.size:
            raise error(
                f"group {m} must hold distinct class indices in [0, {num_classes}), got {g.tolist()}; "
                "check that the groups and the probabilities use the same class order"
            )
        out.append(g.astype(np.int64, copy=False))
    return out
