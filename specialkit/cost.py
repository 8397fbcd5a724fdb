"""Cost in one place: parameters, FLOPs, latency, memory, training budgets and compute matching.

* Per model: :func:`count_parameters` and :func:`count_flops` (one forward pass per image, counted by
  ``torch.utils.flop_counter``), :func:`train_flops_per_example` (one training example-pass, forward and backward as
  autograd runs them, counted the same way).
* Training budgets: :func:`train_flops` of a model for its example-passes, :func:`specialists_train_flops` (the
  generalist's forward counted where it teaches), :func:`budget_flops` (a run's generalist plus all its
  specialists: what a frontier generalist of another width gets, :func:`matched_epochs`) and
  :func:`compute_budget` (the specialists' training compute and the extra passes the compute-matched generalist gets:
  the one compute-matching formula, :func:`matched_passes`) and :func:`student_budget` (the same for the student's
  whole budget: specialists, teacher forward passes, the student's own passes).
* Inference: :func:`latency` (measured, batch 1 and 256), :func:`cost_summary` (one row per configuration: parameters,
  FLOPs, latency, weights and peak activation memory) and :func:`cost_points` (accuracy against FLOPs).

Every function takes a run read-only (a :class:`specialkit.view.RunView` or the run itself) and trains nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import dataset, ensemble, evaluation, models
from .errors import SpecialkitError

__all__ = [
    "count_parameters",
    "count_flops",
    "train_flops_per_example",
    "train_flops",
    "budget_flops",
    "matched_epochs",
    "matched_passes",
    "compute_budget",
    "student_budget",
    "teacher_forward_flops",
    "FrontierError",
    "latency",
    "cost_summary",
    "cost_points",
    "teacher_passes",
    "specialists_train_flops",
]


class FrontierError(SpecialkitError, ValueError):
    """A training budget or a frontier point cannot be made; the message names the problem and the fix."""


count_parameters = models.count_parameters
count_flops = models.count_flops


def _input_shape(ds: Any) -> tuple[int, int, int, int]:
    return (1, ds.channels, ds.image_size, ds.image_size)


def train_flops_per_example(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """Training FLOPs of one example-pass as the training loop spends them.

    One forward and one backward pass, counted by ``torch.utils.flop_counter`` on a copy of ``model`` in training mode
    (the copy's batch-norm statistics change, not the model's). The backward computes what autograd computes: weight
    gradients of every trained layer and input gradients only where something before needs them — not for the first
    layer (the images need none) and not into a frozen shared trunk, which runs forward only. (The old ``3 x forward``
    rule counted both, and a shared trunk's first trained layer's input gradient: 7.6% too much for two shared stages of
    the demo's CNN, issue 20.)

    Args:
        model: the trained network (any ``Classifier``, a :class:`specialkit.models.SharedTrunkClassifier` included).
        input_shape: (1, C, H, W).

    Returns:
        FLOPs per example (measured on a batch of 2).
    """
    shape = (2, *tuple(input_shape)[1:])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    copy_ = copy.deepcopy(model).train()
    x = torch.zeros(shape, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        copy_(x).float().logsumexp(dim=1).sum().backward()
    return int(counter.get_total_flops()) // shape[0]


def train_flops(model: torch.nn.Module, input_shape: Sequence[int], examples_seen: int) -> float:
    """Training FLOPs of ``model`` over ``examples_seen`` example-passes (:func:`train_flops_per_example` each).

    Args:
        model: the trained network.
        input_shape: (1, C, H, W).
        examples_seen: its training example-passes.

    Returns:
        FLOPs.
    """
    return float(examples_seen * train_flops_per_example(model, input_shape))


def teacher_passes(specialist: Any, *, soft_weight: float) -> int:
    """Example-passes on which the generalist taught ``specialist`` (one generalist forward each): every pass of its
    own training when it learnt from the generalist's soft targets (``specialist_soft_weight > 0``), and every pass of
    the distilled base it started from (``specialist_init="distill"``).

    Args:
        specialist: a ``TrainedSpecialist`` (``examples_seen`` counts the distilled base's passes too; its history
            its own).
        soft_weight: the run's ``specialist_soft_weight``.

    Returns:
        Passes.
    """
    history = specialist.history
    if isinstance(history, list):
        own = int(history[-1]["examples_seen"]) if history else int(specialist.examples_seen)
    else:
        own = int(history.examples_seen) if history is not None else int(specialist.examples_seen)
    distilled = max(0, int(specialist.examples_seen) - own)
    return distilled + (own if soft_weight > 0 else 0)


def specialists_train_flops(run: Any) -> float:
    """Training FLOPs of all ``run``'s specialists: their own forward and backward passes
    (:func:`train_flops_per_example`) plus one generalist forward per pass it taught (:func:`teacher_passes`).

    Args:
        run: a run whose generalist and specialists are finished.

    Returns:
        FLOPs.
    """
    ds = run.dataset()
    shape = _input_shape(ds)
    teacher = models.count_flops(run.generalist().model, shape)
    soft = run.config.specialist_soft_weight
    return float(
        sum(
            s.examples_seen * train_flops_per_example(s.model, shape) + teacher_passes(s, soft_weight=soft) * teacher
            for s in run.specialists()
        )
    )


def budget_flops(run: Any) -> float:
    """Training FLOPs of the run's generalist plus all its specialists (:func:`specialists_train_flops`).

    Args:
        run: a run whose generalist and specialists are finished.

    Returns:
        FLOPs.
    """
    ds, gen = run.dataset(), run.generalist()
    return train_flops(gen.model, _input_shape(ds), gen.examples_seen) + specialists_train_flops(run)


def matched_epochs(budget: float, train_flops_per_pass: float, n_train: int) -> int:
    """Whole epochs (>= 1) of a model that spends ``train_flops_per_pass`` per example-pass closest to ``budget``.

    Args:
        budget: training FLOPs to spend.
        train_flops_per_pass: the model's :func:`train_flops_per_example`.
        n_train: training images per epoch.

    Returns:
        Epochs.

    Raises:
        FrontierError: a non-positive argument.
    """
    if budget <= 0 or train_flops_per_pass <= 0 or n_train < 1:
        raise FrontierError(
            f"budget={budget}, train_flops_per_pass={train_flops_per_pass}, n_train={n_train}: all must be positive"
        )
    return max(1, int(round(budget / (train_flops_per_pass * n_train))))


def matched_passes(spend_flops: float, train_flops_per_pass: float) -> int:
    """Example-passes (>= 1) of a model that spends ``train_flops_per_pass`` per pass that cost ``spend_flops``.

    Args:
        spend_flops: training FLOPs to match.
        train_flops_per_pass: the model's :func:`train_flops_per_example`.

    Returns:
        Example-passes.
    """
    return max(1, int(round(spend_flops / train_flops_per_pass)))


def compute_budget(run: Any) -> dict[str, Any]:
    """The extra training compute the specialists used and what the compute-matched generalist gets: the one
    compute-matching formula.

    With ``compute_match="flops"`` the generalist gets as many extra example-passes as cost the specialists' training
    FLOPs (:func:`specialists_train_flops`, the generalist's forward where it taught them included) at the
    generalist's own training FLOPs per pass (:func:`matched_passes`); with ``"passes"`` as many example-passes as
    the specialists made.

    Args:
        run: a run whose generalist and specialists are finished.

    Returns:
        ``match``, ``specialist_passes``, ``specialist_train_flops``, ``generalist_forward_flops``,
        ``generalist_train_flops_per_pass``, ``compute_matched_passes`` and ``compute_matched_train_flops``.
    """
    ds, gen = run.dataset(), run.generalist()
    shape = _input_shape(ds)
    gen_flops = models.count_flops(gen.model, shape)
    per_pass = train_flops_per_example(gen.model, shape)
    spec_passes = int(sum(s.examples_seen for s in run.specialists()))
    spec_train_flops = specialists_train_flops(run)
    passes = max(spec_passes, 1) if run.config.compute_match == "passes" else matched_passes(spec_train_flops, per_pass)
    return {
        "match": run.config.compute_match,
        "specialist_passes": spec_passes,
        "specialist_train_flops": spec_train_flops,
        "generalist_forward_flops": int(gen_flops),
        "generalist_train_flops_per_pass": int(per_pass),
        "compute_matched_passes": passes,
        "compute_matched_train_flops": float(per_pass * passes),
    }


def teacher_forward_flops(run: Any) -> float:
    """Forward FLOPs per image of the student's teacher (:func:`specialkit.distill.ensemble_teacher`): the generalist
    (a shared trunk once) plus the specialists it switches on, their mean count per image measured on the validation
    images (the teacher's own batches are augmented training images, whose activations are not recorded).

    Args:
        run: a run whose generalist and specialists are finished.

    Returns:
        FLOPs per image.
    """
    ds = run.dataset()
    shape = (ds.channels, ds.image_size, ds.image_size)
    gen_cost = evaluation.model_cost(run.generalist().model, shape)
    spec_costs = [evaluation.model_cost(s.model, shape) for s in run.specialists()]
    return float(evaluation.ensemble_cost(gen_cost, spec_costs, run.activation("val"))["conditional_flops"])


def student_budget(run: Any) -> dict[str, Any]:
    """The student's whole extra training compute and what the generalist matched to it (stage ``student_matched``)
    gets: the second use of the one compute-matching formula (:func:`compute_budget`, :func:`matched_passes`).

    The student's knowledge cost the specialists' training (its teacher's making, :func:`specialists_train_flops`),
    its own example-passes (:func:`train_flops_per_example` of the student) and, on each of them when it learns from
    soft targets, one forward of its teacher (:func:`teacher_forward_flops`). With ``compute_match="flops"`` the
    matched generalist gets as many extra example-passes as cost that many FLOPs at its own training FLOPs per pass;
    with ``"passes"`` the specialists' passes plus the student's.

    Args:
        run: a run whose generalist, specialists and student are finished.

    Returns:
        ``match``, ``specialist_train_flops``, ``student_passes``, ``student_train_flops_per_pass``,
        ``teacher_forward_flops_per_pass`` (0 without soft targets), ``student_budget_flops`` (the sum),
        ``generalist_train_flops_per_pass``, ``student_matched_passes`` and ``student_matched_train_flops``.
    """
    base = compute_budget(run)
    shape = _input_shape(run.dataset())
    student = run.distill()
    passes = int(student.examples_seen)
    per_pass = train_flops_per_example(student.model, shape)
    teacher = teacher_forward_flops(run) if run.config.distill_soft_weight > 0 else 0.0
    total = base["specialist_train_flops"] + passes * (per_pass + teacher)
    gen_per_pass = base["generalist_train_flops_per_pass"]
    matched = (
        max(base["specialist_passes"] + passes, 1)
        if run.config.compute_match == "passes"
        else matched_passes(total, gen_per_pass)
    )
    return {
        "match": run.config.compute_match,
        "specialist_train_flops": base["specialist_train_flops"],
        "student_passes": passes,
        "student_train_flops_per_pass": int(per_pass),
        "teacher_forward_flops_per_pass": teacher,
        "student_budget_flops": float(total),
        "generalist_train_flops_per_pass": gen_per_pass,
        "student_matched_passes": matched,
        "student_matched_train_flops": float(gen_per_pass * matched),
    }


def latency(run: Any, *, max_images: int = 512, repeats: int = 3) -> pd.DataFrame:
    """Measured seconds per image at batch 1 and 256: the generalist and the ``kl`` ensemble, all vs conditional."""
    ds = run.dataset()
    x = ds.x_test[:max_images]
    active = run.activation("test")[:max_images]
    sps = run.specialists()

    def kl(p_gen: np.ndarray, probs: list[np.ndarray], act: np.ndarray) -> np.ndarray:
        outs = [
            ensemble.SpecialistOutputs(classes=s.classes, probs=np.nan_to_num(p, nan=1.0 / p.shape[1]))
            for s, p in zip(sps, probs)
        ]
        return ensemble.combine_kl(p_gen, outs, act)

    with torch.inference_mode():
        return evaluation.latency_table(
            run.generalist().model,
            [s.model for s in sps],
            x,
            active,
            rules={"kl": kl},
            repeats=repeats,
            max_images={1: min(64, len(x)), 256: len(x)},
        )


def latency_key(run: Any) -> str:
    """What :func:`latency`'s numbers depend on, hashed: the networks and the routing (the ``ensembles`` stage key,
    which chains the generalist's, the clusters' and the specialists'), the device, the machine, the intra-op thread
    count and the torch and specialkit versions (a newer kit may time otherwise). ``compute_metrics`` reuses a run's
    earlier measurement only under the same key."""
    from . import __version__

    device = next(run.generalist().model.parameters()).device
    parts = {
        "ensembles": run.key("ensembles"),
        "device": str(device),
        "machine": [platform.node(), platform.machine(), platform.processor()],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "specialkit": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cost_summary(
    run: Any,
    latency_records: Sequence[Mapping[str, Any]] | None = None,
    *,
    memory_batch: int = 256,
    flops: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Cost of inference of every configuration of the run, one row each: the generalist, the ensemble running
    all specialists, the ensemble with conditional execution, the student (when trained; nothing is trained here).

    Columns: ``params_stored`` (a shared trunk once; a shared-trunk specialist only its own stages),
    ``mflops_per_image`` (counted; a shared trunk once), ``ms_per_image_b1`` / ``ms_per_image_b256`` (measured,
    from ``latency_records`` of :func:`latency`, rule ``kl``; ``None`` without them), ``weights_mb`` and
    ``peak_activation_mb`` (one batch of ``memory_batch`` test images, :func:`evaluation.peak_activation_bytes`).
    ``flops``: the run's :func:`evaluation.ensemble_cost`, when already counted.
    """
    ds = run.dataset()
    shape = (ds.channels, ds.image_size, ds.image_size)
    gen, sps = run.generalist().model, [s.model for s in run.specialists()]
    trained = run.skip_reason("distill") is None and run.is_done("distill")
    student = (
        run.distill().model if trained else None
    )  # skipped or not trained yet: no student row (nothing trains here)
    if flops is None:  # compute_metrics passes the counts it already made
        flops = evaluation.ensemble_cost(
            evaluation.model_cost(gen, shape), [evaluation.model_cost(s, shape) for s in sps], run.activation("test")
        )
    groups, top_n, skip, sure = run.groups(), run.config.top_n, run.config.skip_threshold, run.config.skip_confident
    most = run.config.max_active
    dev = next(gen.parameters()).device
    xb = dataset.to_float(ds.x_test[:memory_batch]).to(dev)
    lat = {(r["model"], int(r["batch_size"])): r["seconds_per_image"] * 1e3 for r in (latency_records or [])}
    st_lat = {}
    if latency_records and student is not None:
        xs = dataset.to_float(ds.x_test[:256]).to(dev)
        with torch.inference_mode():
            st_lat = {
                bs: evaluation.measure_latency(student.eval(), xs[: 64 if bs == 1 else 256], batch_size=bs) * 1e3
                for bs in (1, 256)
            }

    def mem(fn: Any) -> float:
        return evaluation.peak_activation_bytes(fn, device=dev) / 1e6

    def activate(p: np.ndarray) -> np.ndarray:
        return ensemble.activation(p, groups, top_n=top_n, threshold=skip, confident=sure, max_active=most)

    ens_mb = evaluation.weight_bytes([gen, *sps]) / 1e6
    rows = [
        {
            "model": "generalist",
            "params_stored": flops["generalist_params"],
            "mflops_per_image": flops["generalist_flops"] / 1e6,
            "ms_per_image_b1": lat.get(("generalist", 1)),
            "ms_per_image_b256": lat.get(("generalist", 256)),
            "weights_mb": evaluation.weight_bytes([gen]) / 1e6,
            "peak_activation_mb": mem(lambda: gen.eval()(xb)),
        },
        {
            "model": "ensemble, all specialists",
            "params_stored": flops["ensemble_params"],
            "mflops_per_image": flops["all_flops"] / 1e6,
            "ms_per_image_b1": lat.get(("kl all", 1)),
            "ms_per_image_b256": lat.get(("kl all", 256)),
            "weights_mb": ens_mb,
            "peak_activation_mb": mem(lambda: evaluation.ensemble_forward(gen, sps, xb)),
        },
        {
            "model": "ensemble, conditional",
            "params_stored": flops["ensemble_params"],
            "mflops_per_image": flops["conditional_flops"] / 1e6,
            "ms_per_image_b1": lat.get(("kl conditional", 1)),
            "ms_per_image_b256": lat.get(("kl conditional", 256)),
            "weights_mb": ens_mb,
            "peak_activation_mb": mem(lambda: evaluation.ensemble_forward(gen, sps, xb, activate)),
        },
    ]
    if student is not None:
        rows.append(
            {
                "model": "student",
                "params_stored": models.count_parameters(student),
                "mflops_per_image": models.count_flops(student.eval(), (1, *shape)) / 1e6,
                "ms_per_image_b1": st_lat.get(1),
                "ms_per_image_b256": st_lat.get(256),
                "weights_mb": evaluation.weight_bytes([student]) / 1e6,
                "peak_activation_mb": mem(lambda: student(xb)),
            }
        )
    for r in rows:
        r["shared_stages"] = run.config.specialist_shared_stages if r["model"].startswith("ensemble") else 0
    return rows


def cost_points(metrics: dict[str, Any]) -> pd.DataFrame:
    """Accuracy (with its interval) against MFLOPs per image for every model and rule (``kl``, ``kl_calibrated`` and
    ``top_confident`` at the cost of the active specialists, ``moe`` of all of them; ``kl`` is also shown running
    all specialists)."""
    flops = metrics["cost"]["flops"]
    rows_by = {r["name"]: r for r in metrics["comparison"]}
    cost = {
        "generalist": flops["generalist_flops"],
        "compute_matched": flops["generalist_flops"],
        "student": metrics["cost"]["student"]["flops"],
        "top_confident": flops["conditional_flops"],
        "moe": flops["all_flops"],
        "kl": flops["conditional_flops"],
        "kl_calibrated": flops["conditional_flops"],
    }
    rows = []
    for n, r in rows_by.items():
        if n in cost:
            lo, hi = r["top1_ci"]
            rows.append(
                {
                    "name": f"{n} (conditional)" if n in ("kl", "kl_calibrated") else n,
                    "accuracy": r["top1"],
                    "lo": lo,
                    "hi": hi,
                    "cost": cost[n] / 1e6,
                }
            )
    if "kl" in rows_by:
        lo, hi = rows_by["kl"]["top1_ci"]
        rows.append(
            {
                "name": "kl (all specialists)",
                "accuracy": rows_by["kl"]["top1"],
                "lo": lo,
                "hi": hi,
                "cost": flops["all_flops"] / 1e6,
            }
        )
    return pd.DataFrame(rows)
