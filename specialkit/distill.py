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

from typing import Any, Sequence

import numpy as np
import torch

from . import checkpoints, ensemble, evaluation, models, stages, training
from . import specialists as specialists_mod
from .errors import ConfigError
from .generalist import ModelResult, load_model, train_model

__all__ = ["ensemble_teacher", "soften", "teacher_of", "make_student", "make_control", "train_student"]


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` of (N, K) probabilities, in float64 (soft targets of a distribution)."""
    return training.softmax(np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)), temperature)


def ensemble_teacher(
    generalist: torch.nn.Module,
    trained: Sequence[specialists_mod.TrainedSpecialist],
    *,
    top_n: int = 1,
    temperature: float = 4.0,
    skip_threshold: float = 0.0,
    skip_confident: float = 1.0,
    max_active: int = 0,
) -> training.Teacher:
    """The ``kl`` ensemble as a per-batch teacher for :func:`training.fit` (``teacher=``).

    For a prepared batch x (B, C, H, W floats): ``p_gen = softmax(generalist(x))``; the generalist's
    top-n classes switch specialists on (``ensemble.activation``); each active specialist runs only on
    its rows, with its dustbin correction; ``ensemble.combine_kl`` gives q; the target is
    ``soften(q, T)``. Specialists that share the generalist's trunk get its output: the trunk runs once per
    batch, and each active specialist only its own stages.

    Args:
        generalist: the generalist (eval mode is set here).
        trained: the specialists (``TrainedSpecialist``: model, classes, dustbin correction).
        top_n: the paper's n.
        temperature: T of the soft targets (the loop scales the soft term by T²).
        skip_threshold: a specialist runs only where the generalist's mass on its group reaches this
            (``ensemble.activation``'s ``threshold``; 0 = never skip).
        skip_confident: no specialist runs where the generalist's top-1 probability exceeds this
            (``ensemble.activation``'s ``confident``; 1 = never skip).
        max_active: the most specialists one image runs, those whose group holds the most generalist mass
            (``ensemble.activation``'s ``max_active``; 0 = no limit).

    Returns:
        ``teacher(x) -> (B, C)`` float32 tensor on x's device.
    """
    generalist.eval()
    for sp in trained:
        sp.model.eval()
    groups = [np.asarray(sp.classes) for sp in trained]
    trunk = evaluation.shared_trunk_of([sp.model for sp in trained])

    @torch.no_grad()
    def teach(x: torch.Tensor) -> torch.Tensor:
        for m in [generalist, *(sp.model for sp in trained)]:
            if next(m.parameters()).device != x.device:
                m.to(x.device)
        if trunk is None:
            h, logits = x, generalist(x)
        else:  # the shared trunk runs once per batch; each active specialist runs its own stages on its rows
            h = trunk(x)
            logits = generalist.forward_from(h, trunk.stages)
        p_gen = torch.softmax(logits.double(), dim=1).cpu().numpy()
        active = ensemble.activation(
            p_gen, groups, top_n=top_n, threshold=skip_threshold, confident=skip_confident, max_active=max_active
        )
        outs = []
        for m, sp in enumerate(trained):
            probs = np.full((len(x), len(sp.classes) + 1), 1.0 / (len(sp.classes) + 1))
            rows = np.flatnonzero(active[:, m])
            if len(rows):
                own = sp.model.forward if trunk is None else sp.model.forward_shared
                z = own(h[torch.as_tensor(rows, device=x.device)]).double().cpu().numpy()
                probs[rows] = specialists_mod.apply_dustbin_shift(z, sp.dustbin_shift)
            outs.append(ensemble.SpecialistOutputs(classes=sp.classes, probs=probs))
        q = ensemble.combine_kl(p_gen, outs, active)
        return torch.from_numpy(soften(q, temperature)).to(x.device, torch.float32)

    return teach


# ---------------------------------------------------------------------------------------------- the stages' recipes
def teacher_of(run: Any) -> training.Teacher:
    """``run``'s ``kl`` ensemble as a per-batch teacher for the student (:func:`ensemble_teacher`): on each augmented
    training batch the generalist's top-n switch specialists on, only the active ones run, and their opinions are
    combined; the result is softened at ``distill_temperature``.

    Args:
        run: the run.

    Returns:
        The teacher.
    """
    c = run.config
    return ensemble_teacher(
        run.generalist().model,
        run.specialists(),
        top_n=c.top_n,
        temperature=c.distill_temperature,
        skip_threshold=c.skip_threshold,
        skip_confident=c.skip_confident,
        max_active=c.max_active,
    )


def make_student(run: Any) -> ModelResult:
    """Stage 5: one student trained on the ensemble's q at temperature T (computed on the same augmented batch the
    student sees) plus hard labels, the soft term scaled by T².

    Args:
        run: the run.

    Returns:
        The student.
    """
    reason = run.skip_reason("distill")
    if reason:
        raise ConfigError(f"{reason}; bring the model itself (torchvision:, torchscript: or export:) to distil")
    if not run.is_done("distill"):
        return train_student(run, "distill", teacher=teacher_of(run) if run.config.distill_soft_weight > 0 else None)
    return load_model(run, "distill")


def make_control(run: Any) -> ModelResult:
    """Stage 6, the student's control: the student's start, epochs, learning rate and seed, trained on the hard labels
    alone (no teacher). The student's gain over it is what distillation adds; its gain over the generalist is what the
    extra training alone gives.

    Args:
        run: the run.

    Returns:
        The hard-label student.
    """
    reason = run.skip_reason("hard_label_student")
    if reason:
        raise ConfigError(
            f"{reason}: there is no hard-label control; set hard_label_control=true (and bring a model) to train it"
        )
    if not run.is_done("hard_label_student"):
        return train_student(run, "hard_label_student", teacher=None)
    return load_model(run, "hard_label_student")


def train_student(run: Any, stage: str, *, teacher: training.Teacher | None) -> ModelResult:
    """A student of ``stage``: the generalist's weights (``student_init``) or scratch, ``student_epochs`` at the
    generalist's lr (times :data:`specialkit.stages.FINE_TUNE_LR` from the generalist's weights), the soft term only
    with a ``teacher``. With ``distill_mixup > 0`` every batch of the student and of its control is mixed
    (:func:`specialkit.training.mixup_batch`) and the teacher is asked on the mixed images (consistent views).

    Args:
        run: the run.
        stage: ``distill`` or ``hard_label_student``.
        teacher: soft targets per batch, or ``None`` (hard labels only).

    Returns:
        The trained student.
    """
    c = run.config
    ds = run.dataset()
    mc = run.model_config(num_classes=ds.num_classes, width=c.student_width, depth=c.student_depth)
    from_gen = (
        c.student_init == "generalist"
        and mc == run.model_config(num_classes=ds.num_classes)
        and run.scratch_reason() is None
    )
    run.generalist()  # on a fresh run, train it first (its checkpoint is read below)
    offset = stages.by_name(stage).seed_offset
    training.seed_everything(c.seed + offset)
    if from_gen:
        model = checkpoints.load_checkpoint(run.stage_dir("generalist") / "model.pt")[0]
    else:
        model = models.build_model(mc)
    run.log(
        f"[{stage}] student initialised from {'the generalist' if from_gen else 'scratch'}"
        + ("" if teacher is not None else ", hard labels only")
    )
    soft = c.distill_soft_weight if teacher is not None else 0.0
    tc = run.train_config(
        epochs=c.student_epochs,
        lr=c.lr * (stages.FINE_TUNE_LR if from_gen else 1.0),
        seed_offset=offset,
        soft_weight=soft,
        temperature=c.distill_temperature,
        mixup_alpha=c.distill_mixup,
    )
    return train_model(run, stage, model=model, model_config=mc, tc=tc, teacher=teacher)
