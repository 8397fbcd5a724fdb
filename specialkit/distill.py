"""Distilling the specialist ensemble back into one model (the paper's "future work").

The student is trained on the ``kl`` ensemble's combined distribution q, softened at temperature T,
plus the hard labels (``training.distillation_loss``). The teacher is evaluated on the very augmented
batch the student trains on (:func:`ensemble_teacher`), not once per un-augmented training image: a
teacher computed on the clean image disagrees with what the student sees after a random crop, and
on images the teacher has memorised its targets are near one-hot, so fixed per-image targets taught
the student little beyond the labels (measured in docs/METHOD.md's notes on the student).

>>> # teacher = ensemble_teacher(generalist, specialists, top_n=1, temperature=4.0)
>>> # training.fit(student, x, y, config=tc, teacher=teacher)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import ensemble, training
from . import specialists as specialists_mod

__all__ = ["ensemble_teacher", "soften"]


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` of (N, K) probabilities, in float64 (soft targets of a distribution)."""
    from .pipeline import softmax

    return softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)), temperature)


def ensemble_teacher(
    generalist: torch.nn.Module,
    trained: Sequence[specialists_mod.TrainedSpecialist],
    *,
    top_n: int = 1,
    temperature: float = 4.0,
) -> training.Teacher:
    """The ``kl`` ensemble as a per-batch teacher for :func:`training.fit` (``teacher=``).

    For a prepared batch x (B, C, H, W floats): ``p_gen = softmax(generalist(x))``; the generalist's
    top-n classes switch specialists on (``ensemble.activation``); each active specialist runs only on
    its rows, with its dustbin correction; ``ensemble.combine_kl`` gives q; the target is
    ``soften(q, T)``.

    Args:
        generalist: the generalist (eval mode is set here).
        trained: the specialists (``TrainedSpecialist``: model, classes, dustbin correction).
        top_n: the paper's n.
        temperature: T of the soft targets (the loop scales the soft term by T²).

    Returns:
        ``teacher(x) -> (B, C)`` float32 tensor on x's device.
    """
    generalist.eval()
    for sp in trained:
        sp.model.eval()
    groups = [np.asarray(sp.classes) for sp in trained]

    @torch.no_grad()
    def teach(x: torch.Tensor) -> torch.Tensor:
        for m in [generalist, *(sp.model for sp in trained)]:
            if next(m.parameters()).device != x.device:
                m.to(x.device)
        p_gen = torch.softmax(generalist(x).double(), dim=1).cpu().numpy()
        active = ensemble.activation(p_gen, groups, top_n=top_n)
        outs = []
        for m, sp in enumerate(trained):
            probs = np.full((len(x), len(sp.classes) + 1), 1.0 / (len(sp.classes) + 1))
            rows = np.flatnonzero(active[:, m])
            if len(rows):
                z = sp.model(x[torch.as_tensor(rows, device=x.device)]).double().cpu().numpy()
                probs[rows] = specialists_mod.apply_dustbin_shift(z, sp.dustbin_shift)
            outs.append(ensemble.SpecialistOutputs(classes=sp.classes, probs=probs))
        q = ensemble.combine_kl(p_gen, outs, active)
        return torch.from_numpy(soften(q, temperature)).to(x.device, torch.float32)

    return teach
