"""Named array types for signatures, instead of ``Any`` (in the spirit of ``cleanlab.typing``).

Each name says what an argument holds; its shape is written in the docstring below it and in the
docstrings of the functions that take it. Arrays may be numpy arrays or torch tensors (moved to the
CPU and converted by :mod:`specialkit.checks` where a function needs numpy).
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["Labels", "Probs", "Scores", "Logits", "Images", "Mask", "Matrix", "Groups"]

Labels = Union[npt.NDArray[np.integer], torch.Tensor]
"""(N,) integer class indices in ``[0, C)``."""

Probs = Union[npt.NDArray[np.floating], torch.Tensor]
"""(N, C) probabilities: rows >= 0 that sum to 1 (a softmax of logits)."""

Logits = Union[npt.NDArray[np.floating], torch.Tensor]
"""(N, C) raw model outputs z, before the softmax."""

Scores = Union[Probs, Logits, Labels]
"""(N, C) probabilities or logits (only their argmax is used), or (N,) integer predictions."""

Images = Union[npt.NDArray[np.uint8], torch.Tensor]
"""(N, C, H, W) images: ``uint8`` in [0, 255], or float in [0, 1]."""

Mask = npt.NDArray[np.bool_]
"""Boolean array, e.g. (N,) per-image correctness or (N, M) "specialist m is active on image n"."""

Matrix = npt.NDArray[np.floating]
"""(C, C) square class-by-class matrix (confusion, covariance, distance or similarity)."""

Groups = Sequence[Labels]
"""M groups of class indices, one (|S_m|,) integer array per specialist."""
