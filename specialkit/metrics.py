"""Every number of a run, computed from its artifacts (``metrics.json``); never trains a model.

* :func:`comparison_rows` -- one row per model and rule: top-1 with its 95% paired-bootstrap interval,
  the gain over the generalist and over the compute-matched generalist with intervals, McNemar's exact
  p-values, fixed/broken counts, the paper's conditional accuracy (Table 3) and the within-group accuracy.
* :func:`table4_rows` -- the paper's Table 4 (gain by the number of specialists covering the true class)
  with the relative gain's interval and rows too small to read marked.
* :func:`compute_metrics` -- all of it for a finished run, plus clusters, specialists (with the
  initialisation check and the dustbin-correction comparison), cost and timings.
* :func:`aggregate_seeds` -- mean, standard deviation and every seed's value across several runs.
* :func:`convergence` -- was the generalist still improving? (its last epochs' validation accuracy, and the
  compute-matched generalist's gain against the ensemble's).
* :func:`specialist_fit` -- overfitting: each specialist's accuracy on its own classes' training images
  against their validation images.
* :func:`study_row` / :func:`study_summary` -- one flat row per study point and seed, and the mean gain with
  its interval across seeds per point (``specialkit study``).

A stage that is not finished is a :class:`MissingStageError` naming the stage and the command that
makes it; the report only renders what is computed here.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import clusters, cost, ensemble, evaluation, models, runs, specialists, stages, stats, training
from .cost import cost_points, cost_summary, latency
from .errors import MissingStageError
from .view import RunView, require, view_of

__all__ = [
    "MissingStageError",
    "comparison_rows",
    "table4_rows",
    "within_group_accuracy",
    "compute_metrics",
    "specialist_rows",
    "init_check",
    "correction_comparison",
    "dustbin_effect",
    "cost_points",
    "latency",
    "measured_latency",
    "cost_summary",
    "stage_seconds",
    "aggregate_seeds",
    "finite",
    "convergence",
    "specialist_fit",
    "study_row",
    "study_summary",
    "seed_interval",
]

BASELINE, MATCHED = "generalist", "compute_matched"
CONTROL = "hard_label_student"
STUDENT_MATCHED = "student_matched"
NOT_RULES = (BASELINE, MATCHED, "student", CONTROL, STUDENT_MATCHED)


# ----------------------------------------------------------------------------------------- accuracy


def within_group_accuracy(probs: np.ndarray, y: np.ndarray, groups: Sequence[np.ndarray]) -> float:
    """Accuracy on the images whose true class some specialist covers, the prediction restricted to the
    classes of the specialists covering that true class (nan when no image is covered).

    Args:
        probs: (N, C) probabilities.
        y: (N,) labels.
        groups: M arrays of class indices.
    """
    c = probs.shape[1]
    member = np.zeros((c, len(groups)), dtype=bool)
    for m, g in enumerate(groups):
        member[np.asarray(g), m] = True
    allowed = (member.astype(np.int64) @ member.T.astype(np.int64)) > 0  # (C, C): classes sharing a group
    keep = member[y].any(axis=1)
    if not keep.any():
        return float("nan")
    masked = np.where(allowed[y[keep]], probs[keep], -np.inf)
    return float((masked.argmax(axis=1) == y[keep]).mean())


def comparison_rows(
    results: Mapping[str, np.ndarray],
    y: np.ndarray,
    *,
    groups: Sequence[np.ndarray],
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], stats.Bootstrap]:
    """One row per model/rule with its uncertainty (keys read by tools and tests).

    Args:
        results: name -> (N, C) test probabilities; must hold ``generalist`` (and may hold
            ``compute_matched``).
        y: (N,) test labels.
        groups: the specialists' class groups (for conditional and within-group accuracy).
        resamples: resamples of the paired bootstrap (shared by every row).
        seed: the bootstrap's seed.

    Returns:
        ``(rows, bootstrap)``; each row has ``name``, ``top1``, ``top1_ci``, ``n_correct``,
        ``delta_top1``, ``gain_vs_generalist_ci``, ``relative_change``, ``p_vs_generalist``, ``fixed``,
        ``broken`` (vs the generalist), ``gain_vs_compute_matched``, ``gain_vs_compute_matched_ci``,
        ``p_vs_compute_matched`` (None where it does not apply), the verdicts, ``conditional_acc``
        (the paper's Table 3), ``within_group_acc``, and the calibration of the probabilities: ``nll`` (mean
        negative log-likelihood, nats) and ``ece`` (expected calibration error, ``evaluation.ECE_BINS`` bins).
    """
    if BASELINE not in results:
        raise evaluation.EvaluationError(f"results must include {BASELINE!r}; got {list(results)}")
    correct = {name: np.asarray(p).argmax(axis=1) == y for name, p in results.items()}
    boot = stats.paired_bootstrap(correct, resamples=resamples, seed=seed)
    covered = (
        np.unique(np.concatenate([np.asarray(g) for g in groups])) if len(groups) else np.array([], dtype=np.int64)
    )
    base_top1 = float(correct[BASELINE].mean())
    rows = []
    for name, p in results.items():
        ok = correct[name]
        vs_gen = stats.mcnemar(correct[BASELINE], ok)
        row: dict[str, Any] = {
            "name": name,
            "top1": float(ok.mean()),
            "top1_ci": list(boot.top1_ci(name)),
            "n_correct": int(ok.sum()),
            "delta_top1": float(ok.mean()) - base_top1,
            "gain_vs_generalist_ci": list(boot.gain_ci(name, BASELINE)),
            "relative_change": (float(ok.mean()) - base_top1) / base_top1 if base_top1 > 0 else None,
            "p_vs_generalist": None if name == BASELINE else vs_gen.p_value,
            "fixed": vs_gen.fixed,
            "broken": vs_gen.broken,
            "gain_vs_compute_matched": None,
            "gain_vs_compute_matched_ci": None,
            "p_vs_compute_matched": None,
        }
        row["vs_generalist"] = (
            None if name == BASELINE else stats.verdict(row["gain_vs_generalist_ci"], row["p_vs_generalist"])
        )
        if MATCHED in results and name != MATCHED:
            vs_cm = stats.mcnemar(correct[MATCHED], ok)
            row["gain_vs_compute_matched"] = float(ok.mean() - correct[MATCHED].mean())
            row["gain_vs_compute_matched_ci"] = list(boot.gain_ci(name, MATCHED))
            row["p_vs_compute_matched"] = vs_cm.p_value
            row["vs_compute_matched"] = stats.verdict(row["gain_vs_compute_matched_ci"], vs_cm.p_value)
        row["nll"], row["ece"] = evaluation.nll(p, y), evaluation.ece(p, y)
        row["conditional_acc"] = evaluation.conditional_accuracy(p, y, covered) if len(covered) else None
        row["within_group_acc"] = within_group_accuracy(np.asarray(p), y, groups) if len(groups) else None
        rows.append(row)
    return rows, boot


def table4_rows(
    p_gen: np.ndarray, q: np.ndarray, y: np.ndarray, coverage: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> list[dict[str, Any]]:
    """The paper's Table 4 for one rule, with the interval of each row's relative gain.

    Each row: ``covered_by``, ``n_classes``, ``n_examples``, ``gen_correct``, ``ens_correct``,
    ``delta_correct``, ``gen_acc``, ``ens_acc``, ``relative_gain`` (delta / generalist correct, the
    paper's statistic), ``relative_gain_ci`` and ``too_small`` (fewer than ``stats.MIN_ROW`` test
    examples: not to be read). The last row is the ``total``.
    """
    df = evaluation.coverage_breakdown(p_gen, q, y, coverage, add_total=True).reset_index()
    bucket = np.asarray(coverage)[y]
    gen_ok, ens_ok = p_gen.argmax(1) == y, q.argmax(1) == y
    rows = json.loads(df.to_json(orient="records"))
    for row in rows:
        sel = np.ones(len(y), dtype=bool) if row["covered_by"] == "total" else bucket == int(row["covered_by"])
        row["relative_gain_ci"] = list(
            stats.subset_relative_gain_ci(gen_ok[sel], ens_ok[sel], resamples=resamples, seed=seed)
        )
        row["too_small"] = bool(row["n_examples"] < stats.MIN_ROW)
    return rows


# ----------------------------------------------------------------------------------------- specialists


def init_check(run: RunView, *, split: str = "val") -> list[dict[str, Any]]:
    """Per specialist, how well a freshly initialised specialist reproduces the generalist on ``split``:
    mean |dustbin probability - generalist mass outside the group| and the largest special-class gap,
    for the kit's initialisation and for the one-row head it replaced (:func:`specialists.dustbin_head`)."""
    ds, gen = run.dataset(), run.generalist()
    x = ds.split(split)[0]
    p_gen = gen.probs(split)
    rows: list[dict[str, Any]] = []
    if (
        run.config.specialist_model
        or run.config.specialist_width
        or run.config.specialist_depth
        or run.scratch_reason()
    ):
        return rows  # from-scratch specialists have no initialisation to check
    for group, classes in zip(run.clusters().groups, run.groups()):
        target = specialists.collapse_probs(p_gen, classes)
        fresh = specialists.init_from_generalist(gen.model, classes)
        p_new = specialists.predict_specialist(fresh, x, shift=0.0, device=run.config.device)
        w, b = specialists.dustbin_head(gen.model.head.weight.detach(), gen.model.head.bias.detach(), classes)
        one_row = models.replace_head(copy.deepcopy(gen.model), w, b)  # no random numbers drawn
        p_old = specialists.predict_specialist(one_row, x, shift=0.0, device=run.config.device)
        rows.append(
            {
                "group": group,
                "dustbin_gap": float(np.abs(p_new[:, -1] - target[:, -1]).mean()),
                "special_gap_max": float(np.abs(p_new[:, :-1] - target[:, :-1]).max()),
                "dustbin_gap_one_row_head": float(np.abs(p_old[:, -1] - target[:, -1]).mean()),
            }
        )
    return rows


def _specialist_logits(run: RunView, index: int, split: str) -> np.ndarray:
    folder = run.specialist_dir(index)
    path = folder / f"logits_{split}.npy"
    if path.is_file():
        return runs.load_array(path)
    sp = run.specialists()[index]
    return training.predict_logits(sp.model, run.dataset().split(split)[0], device=run.config.device).numpy()


def correction_comparison(run: RunView, *, split: str = "val") -> dict[str, Any]:
    """Every dustbin correction measured on ``split`` (validation by default, never the test set):
    per specialist the shift, the share sent to the dustbin against the true share, the log-loss on its
    own targets; and the ``kl`` ensemble's top-1 with each correction applied to every specialist."""
    ds = run.dataset()
    y_train = ds.y_train
    y = ds.split(split)[1].numpy()
    sps = run.specialists()
    p_gen = run.generalist().probs(split)
    active = run.activation(split)
    per_spec, ens = [], {}
    shifted: dict[str, list[np.ndarray]] = {}
    for i, (group, sp) in enumerate(zip(run.clusters().groups, sps)):
        z = _specialist_logits(run, i, split)
        target = specialists.target_map(sp.classes, ds.num_classes)[y]
        f = sp.special_fraction if sp.special_fraction is not None else run.config.special_fraction
        for method in specialists.CORRECTIONS:
            shift = specialists.correction_value(
                method, y_train=y_train, classes=sp.classes, special_fraction=f, val_logits=z, y_val=y
            )
            p = specialists.apply_dustbin_shift(z, shift)
            shifted.setdefault(method, []).append(p)
            per_spec.append(
                {
                    "group": group,
                    "correction": method,
                    "shift": shift,
                    "true_dustbin_share": float((target == len(sp.classes)).mean()),
                    "dustbin_share": float((p.argmax(1) == len(sp.classes)).mean()),
                    "log_loss": float(-np.log(np.clip(p[np.arange(len(y)), target], 1e-12, None)).mean()),
                }
            )
    for method, probs in shifted.items():
        outs = [ensemble.SpecialistOutputs(classes=sp.classes, probs=p) for sp, p in zip(sps, probs)]
        q = ensemble.combine_kl(p_gen, outs, active)
        ens[method] = float((q.argmax(1) == y).mean())
    best = max(ens, key=lambda k: ens[k])
    return {
        "split": split,
        "per_specialist": per_spec,
        "kl_top1": ens,
        "best": best,
        "used": run.config.dustbin_correction,
    }


def dustbin_effect(run: RunView, *, split: str = "val") -> pd.DataFrame:
    """Per specialist: share of images sent to the dustbin without and with the run's correction, against
    the true share (``split``: validation by default)."""
    y = run.dataset().split(split)[1].numpy()
    rows = []
    for i, (group, sp) in enumerate(zip(run.clusters().groups, run.specialists())):
        z = _specialist_logits(run, i, split)
        dust = len(sp.classes)
        rows.append(
            {
                "group": group,
                "dustbin_shift": sp.dustbin_shift,
                "true_dustbin_share": float((~np.isin(y, sp.classes)).mean()),
                "dustbin_share_uncorrected": float((z.argmax(1) == dust).mean()),
                "dustbin_share_corrected": float(
                    (specialists.apply_dustbin_shift(z, sp.dustbin_shift).argmax(1) == dust).mean()
                ),
            }
        )
    return pd.DataFrame(rows).set_index("group")


def specialist_rows(run: RunView) -> list[dict[str, Any]]:
    """Per specialist: group, classes, correction, example-passes, train/validation accuracy of its last
    epoch, test accuracy on its own targets (all test images, and those of its classes), parameters, FLOPs."""
    ds = run.dataset()
    y = ds.y_test.numpy()
    shape = (ds.channels, ds.image_size, ds.image_size)
    rows = []
    for group, sp, probs in zip(run.clusters().groups, run.specialists(), run.specialist_probs("test")):
        target = specialists.target_map(sp.classes, ds.num_classes)
        own = np.isin(y, sp.classes)
        pred = probs.argmax(1)
        last = sp.history[-1] if sp.history else {}
        rows.append(
            {
                "group": group,
                "classes": " ".join(sp.class_names),
                "size": len(sp.classes),
                "initialised_from": sp.initialised_from,
                "correction": sp.correction,
                "dustbin_shift": sp.dustbin_shift,
                "examples_seen": sp.examples_seen,
                "train_acc": last.get("train_acc"),
                "val_acc": last.get("val_acc"),
                "test_acc_own_classes": float((pred[own] == target[y[own]]).mean()) if own.any() else None,
                "test_acc_all": float((pred == target[y]).mean()),
                **evaluation.model_cost(sp.model, shape),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------- cost


def stage_seconds(run: RunView) -> dict[str, float]:
    """Wall seconds each stage took when it was computed (from its ``done.json``)."""
    out: dict[str, float] = {}
    for stage in ("generalist", "compute_matched", "distill", "hard_label_student", "student_matched"):
        marker = run.stage_dir(stage) / "done.json"
        if marker.is_file():
            out[stage] = float(runs.read_json(marker).get("seconds", 0.0))
    folder = run.stage_dir("specialists")
    if folder.is_dir():
        markers = [p for p in folder.glob("*/done.json") if ".old-" not in p.parent.name]  # not moved-aside folders
        out["specialists"] = round(sum(float(runs.read_json(p).get("seconds", 0.0)) for p in markers), 2)
    return out


# ----------------------------------------------------------------------------------------- everything


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    df = df.reset_index() if df.index.name else df
    return json.loads(df.to_json(orient="records"))


def correct_of(results: Mapping[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> (N,) bool: each model's or rule's top-1 outcome on each test image."""
    return {name: np.asarray(p).argmax(axis=1) == y for name, p in results.items()}


def _paired(boot: stats.Bootstrap, correct: Mapping[str, np.ndarray], name: str, reference: str) -> dict[str, Any]:
    """``name`` against ``reference`` on the same test images: the gain with its paired-bootstrap interval,
    McNemar's p, the fixed/broken counts and the verdict."""
    test = stats.mcnemar(correct[reference], correct[name])
    ci = list(boot.gain_ci(name, reference))
    return {
        "gain": float(correct[name].mean() - correct[reference].mean()),
        "ci": ci,
        "p": test.p_value,
        "fixed": test.fixed,
        "broken": test.broken,
        "verdict": stats.verdict(ci, test.p_value),
    }


def results_on_test(run: RunView) -> dict[str, np.ndarray]:
    """Name -> (N_test, C) probabilities of every finished model and rule of the run (trains nothing)."""
    require(run, *stages.through("ensembles"))
    out: dict[str, np.ndarray] = {BASELINE: run.generalist().test_probs}
    if run.config.compute_matched and not run.skip_reason(MATCHED):
        require(run, MATCHED)
        out[MATCHED] = run.compute_matched().test_probs
    for rule, q in run.ensembles().items():
        if rule != BASELINE:
            out[rule] = q
    if not run.skip_reason("distill"):
        require(run, "distill")
        out["student"] = run.distill().test_probs
    if not run.skip_reason(CONTROL) and run.is_done(CONTROL):  # the control joins when trained (run_all trains it)
        out[CONTROL] = run.hard_label_student().test_probs
    if not run.skip_reason(STUDENT_MATCHED) and run.is_done(STUDENT_MATCHED):  # likewise
        out[STUDENT_MATCHED] = run.student_matched().test_probs
    return out


def measured_latency(run: RunView, previous: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """(:func:`~specialkit.cost.latency`'s records, :func:`~specialkit.cost.latency_key`): those of ``previous`` (a
    run's earlier metrics) where they were measured under the same key, else measured now."""
    key = cost.latency_key(run)
    before = (previous or {}).get("cost") or {}
    if before.get("latency_key") == key and before.get("latency"):
        return before["latency"], key
    return _records(latency(run)), key


def compute_metrics(
    run: RunView, *, measure_latency: bool = True, previous: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """All numbers of a finished run as a JSON-able dict; a :class:`MissingStageError` if a stage is missing (it reads
    the run through a :class:`~specialkit.view.RunView`, so nothing trains).

    ``previous`` (the run's earlier metrics) lends its latency measurement when it was taken of the same networks and
    routing, on the same machine and thread count (:func:`~specialkit.cost.latency_key`; recorded as
    ``cost.latency_key``): recomputing the metrics after a student stage finishes does not time the ensemble again.
    """
    run = view_of(run)
    results = results_on_test(run)
    ds, cfg = run.dataset(), run.config
    y = ds.y_test.numpy()
    spec = run.clusters()
    groups = spec.indices()
    coverage = spec.coverage()
    gen = run.generalist()
    cs = run.confusion()
    comparison, boot = comparison_rows(results, y, groups=groups, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    shape = (ds.channels, ds.image_size, ds.image_size)
    sps = run.specialists()
    rows = {r["name"]: r for r in comparison}
    gen_cost: dict[str, Any] = {"params": None, "flops": None}  # a predictions-only generalist has no model to count
    flops = None
    if gen.model is not None:
        gen_cost = evaluation.model_cost(gen.model, shape)
        flops = evaluation.ensemble_cost(
            gen_cost, [evaluation.model_cost(s.model, shape) for s in sps], run.activation("test")
        )
    student_cost = evaluation.model_cost(run.distill().model, shape) if "student" in rows else None
    student = {"test_top1": rows["student"]["top1"], **student_cost} if student_cost else None
    if student and "kl" in rows:
        student["share_of_kl_gain"] = (
            (rows["student"]["top1"] - rows[BASELINE]["top1"]) / rows["kl"]["delta_top1"]
            if rows["kl"]["delta_top1"] > 0
            else None
        )
        student["share_of_kl_gain_ci"] = list(boot.share_ci("student", BASELINE, "kl"))
        student["kl_gain_significant"] = rows["kl"]["vs_generalist"] == "better"
    if student and CONTROL in rows:
        correct = correct_of(results, y)
        student["vs_hard_label"] = _paired(boot, correct, "student", CONTROL)
        student["hard_label_vs_generalist"] = _paired(boot, correct, CONTROL, BASELINE)
    if student and STUDENT_MATCHED in rows:
        student["vs_student_matched"] = _paired(boot, correct_of(results, y), "student", STUDENT_MATCHED)
    quality = clusters.quality(spec, cs.cm, coarse_of_class=ds.coarse_of_class)
    m: dict[str, Any] = {
        "run": cfg.name,
        "config": cfg.to_dict(),
        "dataset": {
            "name": ds.name,
            "num_classes": ds.num_classes,
            "train": len(ds.y_train),
            "val": len(ds.y_val),
            "test": len(ds.y_test),
            "fingerprint": ds.fingerprint,
        },
        "generalist": {
            "val_top1": cs.accuracy,
            "test_top1": rows[BASELINE]["top1"],
            **gen_cost,
            "examples_seen": gen.examples_seen,
            "val_acc_by_epoch": [r.get("val_acc") for r in gen.history],
        },
        "top_confused_pairs": _records(cs.top_pairs(10)),
        "clusters": {
            "groups": {k: list(v) for k, v in spec.groups.items()},
            "uncovered": list(spec.uncovered()),
            "quality": quality,
            "all_covered": bool((coverage > 0).all()),
            "coverage_warning": clusters.coverage_warning(spec),
            "methods": _records(
                clusters.quality_table(clusters.method_specs(run), cs.cm, coarse_of_class=ds.coarse_of_class)
            ),
        },
        "specialists": specialist_rows(run),
        "init_check": init_check(run),
        "dustbin_corrections": correction_comparison(run),
        "comparison": comparison,
        "table4": {
            rule: table4_rows(
                gen.test_probs, results[rule], y, coverage, resamples=cfg.bootstrap_resamples, seed=cfg.seed
            )
            for rule in results
            if rule not in NOT_RULES
        },
        "cost": {
            "flops": flops,
            "student": student_cost,
            "specialists_total_examples": int(sum(s.examples_seen for s in sps)),
        },
        "student": student,
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "level": 1 - stats.ALPHA},
        "timings": stage_seconds(run),
    }
    skipped = {stage: run.skip_reason(stage) for stage in (MATCHED, "distill") if run.skip_reason(stage)}
    if skipped:
        m["skipped"] = skipped
    m["convergence"] = convergence(gen.history, comparison, n_val=len(ds.y_val))  # "unknown" without a history
    m["specialist_fit"] = specialist_fit(run)
    if gen.logits.get("train") is not None:  # a predictions-only generalist has none
        m["generalist"]["train_top1"] = float((gen.logits["train"].argmax(1) == ds.y_train.numpy()).mean())
    if cfg.compute_matched and MATCHED not in skipped:
        m["compute_matched"] = {
            "test_top1": rows[MATCHED]["top1"],
            "examples_seen": run.compute_matched().examples_seen,
            "budget": cost.compute_budget(run),
        }
    if STUDENT_MATCHED in rows:
        m[STUDENT_MATCHED] = {
            "test_top1": rows[STUDENT_MATCHED]["top1"],
            "examples_seen": run.student_matched().examples_seen,
            "budget": cost.student_budget(run),
        }
    lat = None
    if measure_latency and gen.model is not None:
        lat, m["cost"]["latency_key"] = measured_latency(run, previous)
        m["cost"]["latency"] = lat
    m["cost"]["summary"] = cost_summary(run, lat, flops=flops) if gen.model is not None else None
    return finite(m)


# ----------------------------------------------------------------------------------------- seeds


def aggregate_seeds(per_seed: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """Across runs that differ only in their seed: for each model/rule, the mean, sample standard deviation
    and every seed's value of top-1 and of the gains over the generalist and the compute-matched generalist.

    Args:
        per_seed: seed -> that run's metrics (``compute_metrics``).

    Returns:
        ``{"seeds": [...], "rows": [{"name", "metric", "mean", "std", "values": {seed: v}}...]}``.
    """
    if not per_seed:
        raise ValueError("no runs to aggregate: pass seed -> metrics of at least one run")
    seeds = sorted(per_seed)
    names = [r["name"] for r in per_seed[seeds[0]]["comparison"]]
    rows = []
    for name in names:
        for metric in ("top1", "delta_top1", "gain_vs_compute_matched"):
            values = {}
            for s in seeds:
                row = next((r for r in per_seed[s]["comparison"] if r["name"] == name), None)
                if row is not None and row.get(metric) is not None:
                    values[s] = float(row[metric])
            if not values:
                continue
            v = np.array(list(values.values()))
            rows.append(
                {
                    "name": name,
                    "metric": metric,
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else None,
                    "values": {str(k): x for k, x in values.items()},
                }
            )
    return {"seeds": seeds, "rows": rows}


def finite(obj: Any) -> Any:
    """Replace NaN/inf with None (recursively) so ``metrics.json`` is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return finite(obj.item())
    return obj


# ----------------------------------------------------------------------------------------- convergence, overfitting

CONVERGENCE_EPOCHS = 3
"""How many of the generalist's last epochs the convergence check reads."""


def convergence(
    history: Sequence[Mapping[str, Any]],
    comparison: Sequence[Mapping[str, Any]],
    *,
    n_val: int,
    last: int = CONVERGENCE_EPOCHS,
) -> dict[str, Any]:
    """Was the generalist still improving when the specialists were built on it?

    Two readings: (1) its validation accuracy over the ``last`` epochs: ``val_rise``, the last epoch's
    accuracy minus the best of the ``last - 1`` epochs before it (so the end of a one-cycle schedule's
    warm-down is not read as progress), against ``val_noise``, the 95% half-width of a difference of two
    accuracies on ``n_val`` images (binomial, treated as independent, so conservative for the same
    images); (2) the
    compute-matched generalist (the same network trained further with the specialists' compute): its
    gain over the generalist with interval, McNemar p and verdict, next to the best rule's gain.
    ``still_improving`` is True when the validation accuracy was still rising beyond the noise or the
    extra training made the generalist significantly better; then a comparison with the generalist
    measures an unfinished generalist.

    Args:
        history: the generalist's per-epoch records (``val_acc`` read).
        comparison: :func:`comparison_rows` of the run.
        n_val: validation images the accuracies were measured on.
        last: epochs read.
    """
    val = [float(r["val_acc"]) for r in history if r.get("val_acc") is not None]
    tail = val[-last:]
    rise = tail[-1] - max(tail[:-1]) if len(tail) >= 2 else None
    noise = 1.96 * math.sqrt(2 * tail[-1] * (1 - tail[-1]) / n_val) if tail and n_val > 0 else None
    rising = bool(rise is not None and noise is not None and rise > noise)
    rows = {r["name"]: r for r in comparison}
    cm = rows.get(MATCHED)
    rules = [r for r in comparison if r["name"] not in NOT_RULES]
    best = max(rules, key=lambda r: r["delta_top1"]) if rules else None
    cm_better = cm is not None and cm.get("vs_generalist") == "better"
    out: dict[str, Any] = {
        "epochs": len(val),
        "last_epochs": list(range(len(val) - len(tail) + 1, len(val) + 1)),
        "val_acc": tail,
        "val_rise": rise,
        "val_noise": noise,
        "val_still_rising": rising,
        "compute_matched_gain": None if cm is None else cm["delta_top1"],
        "compute_matched_gain_ci": None if cm is None else cm["gain_vs_generalist_ci"],
        "compute_matched_p": None if cm is None else cm["p_vs_generalist"],
        "compute_matched_verdict": None if cm is None else cm.get("vs_generalist"),
        "best_rule": None if best is None else best["name"],
        "best_rule_gain": None if best is None else best["delta_top1"],
        "best_rule_gain_ci": None if best is None else best["gain_vs_generalist_ci"],
        "best_rule_vs_compute_matched": None if best is None else best.get("vs_compute_matched"),
        "still_improving": bool(rising or cm_better),
    }
    out["verdict"] = (
        "unknown" if not val else ("still improving" if out["still_improving"] else "no sign of improvement")
    )
    return out


def specialist_fit(run: RunView) -> list[dict[str, Any]]:
    """Overfitting, per specialist: its accuracy on its own classes' training images (no augmentation)
    against their validation images, on its own targets (its classes + dustbin, the run's dustbin shift
    applied), with the soft-target weight it was trained with. ``gap`` = train - validation accuracy.
    Predicts (on the training images of the group only); trains nothing."""
    ds = run.dataset()
    rows = []
    for i, (group, sp) in enumerate(zip(run.clusters().groups, run.specialists())):
        tmap = specialists.target_map(sp.classes, ds.num_classes)
        row: dict[str, Any] = {"group": group, "soft_weight": run.config.specialist_soft_weight}
        for split in ("train", "val"):
            x, y = ds.split(split)
            own = np.isin(y.numpy(), sp.classes)
            if split == "val":
                z = _specialist_logits(run, i, "val")[own]
            else:
                z = training.predict_logits(sp.model, x[torch.from_numpy(own)], device=run.config.device).numpy()
            pred = specialists.apply_dustbin_shift(z, sp.dustbin_shift).argmax(1)
            row[f"{split}_acc"] = float((pred == tmap[y.numpy()[own]]).mean()) if own.any() else None
            row[f"{split}_images"] = int(own.sum())
        row["gap"] = None if row["train_acc"] is None or row["val_acc"] is None else row["train_acc"] - row["val_acc"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- studies


def study_row(
    metrics: Mapping[str, Any], *, settings: Mapping[str, Any], seed: int, run: str, seconds: float | None = None
) -> dict[str, Any]:
    """One flat row of ``study.csv`` from a run's ``metrics.json``: the swept ``settings``, the seed, every
    model's and rule's top-1 with its interval, each rule's gain over the generalist and over the
    compute-matched generalist with intervals, p-values and verdicts, FLOPs/parameter/latency ratios,
    the convergence and overfitting summaries and the stage seconds."""
    row: dict[str, Any] = {**settings, "seed": seed, "run": run}
    for r in metrics["comparison"]:
        n = r["name"]
        row[f"{n}_top1"], (row[f"{n}_top1_lo"], row[f"{n}_top1_hi"]) = r["top1"], r["top1_ci"]
        if n in NOT_RULES:
            continue
        for base, gain, ci, p, word in (
            (BASELINE, "delta_top1", "gain_vs_generalist_ci", "p_vs_generalist", "vs_generalist"),
            (
                MATCHED,
                "gain_vs_compute_matched",
                "gain_vs_compute_matched_ci",
                "p_vs_compute_matched",
                "vs_compute_matched",
            ),
        ):
            if r.get(gain) is None:
                continue
            row[f"{n}_gain_vs_{base}"] = r[gain]
            row[f"{n}_gain_vs_{base}_lo"], row[f"{n}_gain_vs_{base}_hi"] = r[ci]
            row[f"{n}_p_vs_{base}"] = r[p]
            row[f"{n}_{word}"] = r.get(word)
    flops = metrics.get("cost", {}).get("flops", {})
    for key in ("conditional_ratio", "all_ratio", "params_ratio", "mean_active"):
        if key in flops:
            row[f"flops_{key}" if key != "params_ratio" else key] = flops[key]
    for lat in metrics.get("cost", {}).get("latency", []):
        if lat["model"] == "kl conditional":
            row[f"latency_ratio_batch{lat['batch_size']}"] = lat["ratio"]
    conv = metrics.get("convergence", {})
    row["generalist_still_improving"] = conv.get("still_improving")
    row["generalist_val_rise"] = conv.get("val_rise")
    fit = [f for f in metrics.get("specialist_fit", []) if f.get("gap") is not None]
    if fit:
        for key in ("train_acc", "val_acc", "gap"):
            row[f"specialist_{key}"] = float(np.mean([f[key] for f in fit]))
    row["generalist_train_top1"] = metrics.get("generalist", {}).get("train_top1")
    row["stage_seconds"] = float(sum(metrics.get("timings", {}).values()))
    row["seconds"] = seconds
    return row


def seed_interval(values: Sequence[float], *, fallback: Sequence[float] | None = None) -> tuple[float, float]:
    """95% interval of the mean of per-seed ``values``: Student's t (``scipy.stats.t``) with n - 1 degrees
    of freedom; with one seed there is no between-seed spread, so ``fallback`` (that seed's paired-bootstrap
    interval) is returned, else (nan, nan)."""
    from scipy import stats as st

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return (
            (float(fallback[0]), float(fallback[1])) if fallback is not None and len(v) == 1 else (math.nan, math.nan)
        )
    half = float(st.t.ppf(1 - stats.ALPHA / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return (float(v.mean()) - half, float(v.mean()) + half)


def _t_p_value(values: Sequence[float]) -> float:
    """Two-sided one-sample t-test p of a zero mean (nan below 2 values or with no spread)."""
    from scipy import stats as st

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or v.std() == 0:
        return math.nan
    return float(st.ttest_1samp(v, 0.0).pvalue)


def study_summary(
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    *,
    correct: Sequence[Mapping[str, np.ndarray] | None] | None = None,
    tie_margin: float = stats.TIE_MARGIN,
    resamples: int = 2000,
) -> list[dict[str, Any]]:
    """Per study point (the values of ``keys``), rule and baseline (``generalist`` | ``compute_matched``):
    the mean gain across seeds with its 95% interval, its verdict, and in how many seeds the paired test on
    the test images found the rule better / worse.

    The interval is the two-level bootstrap over seeds and test images (:func:`stats.two_level_bootstrap`)
    when ``correct`` gives each run's per-image outcomes, else Student's t over the per-seed gains
    (:func:`seed_interval`; it leaves out the test-set noise the seeds share, so it is marked). The verdict
    (:func:`stats.across_seed_verdict`) needs :data:`stats.MIN_SEEDS` seeds and a p-value that survives Holm's
    correction over every comparison of the study; an interval inside ±``tie_margin`` reads "equivalent".

    Args:
        rows: the study rows (:func:`study_row`), one per point and seed.
        keys: the swept settings.
        correct: aligned with ``rows``: name -> (N,) bool, each model's and rule's outcome per test image.
        tie_margin: the equivalence margin (a proportion; 0.005 = 0.5 points).
        resamples: of the two-level bootstrap.

    Returns:
        rows with the ``keys``, ``rule``, ``baseline``, ``seeds``, ``mean``, ``lo``, ``hi``, ``interval``
        (``two-level bootstrap`` or ``student t``), ``p_value``, ``p_holm``, ``verdict``, ``tie_margin``,
        ``seeds_better``, ``seeds_worse`` and the mean top-1 of the rule and of the baseline.
    """
    points: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        points.setdefault(tuple(json.dumps(r[k]) for k in keys), []).append(i)
    out = []
    for members in points.values():
        group = [rows[i] for i in members]
        first = group[0]
        rules = [c[: -len("_gain_vs_generalist")] for c in first if c.endswith("_gain_vs_generalist")]
        for rule in rules:
            for base in (BASELINE, MATCHED):
                col = f"{rule}_gain_vs_{base}"
                have = [i for i in members if rows[i].get(col) is not None]
                if not have:
                    continue
                vals = [float(rows[i][col]) for i in have]
                outcomes = [correct[i] for i in have] if correct is not None else None
                if outcomes is not None and all(o is not None and rule in o and base in o for o in outcomes):
                    diffs = np.stack([o[rule].astype(np.float64) - o[base].astype(np.float64) for o in outcomes])
                    two = stats.two_level_bootstrap(diffs, resamples=resamples, seed=0)
                    lo, hi, p, kind = two.lo, two.hi, two.p_value, "two-level bootstrap"
                else:
                    lo, hi = seed_interval(vals, fallback=(rows[have[0]][f"{col}_lo"], rows[have[0]][f"{col}_hi"]))
                    p, kind = _t_p_value(vals), "student t"
                word = "vs_generalist" if base == BASELINE else "vs_compute_matched"
                out.append(
                    {
                        **{k: first[k] for k in keys},
                        "rule": rule,
                        "baseline": base,
                        "seeds": len(vals),
                        "mean": float(np.mean(vals)),
                        "lo": lo,
                        "hi": hi,
                        "interval": kind,
                        "p_value": p,
                        "seeds_better": sum(rows[i].get(f"{rule}_{word}") == "better" for i in have),
                        "seeds_worse": sum(rows[i].get(f"{rule}_{word}") == "worse" for i in have),
                        "rule_top1": float(np.mean([rows[i][f"{rule}_top1"] for i in have])),
                        "baseline_top1": float(np.mean([rows[i][f"{base}_top1"] for i in have])),
                    }
                )
    adjusted = stats.holm([r["p_value"] for r in out]) if out else []
    for r, p_holm in zip(out, adjusted):
        r["p_holm"] = None if not np.isfinite(p_holm) else float(p_holm)
        r["p_value"] = None if not np.isfinite(r["p_value"]) else r["p_value"]
        r["tie_margin"] = tie_margin
        r["verdict"] = stats.across_seed_verdict(
            r["lo"], r["hi"], p_holm if np.isfinite(p_holm) else math.nan, r["seeds"], margin=tie_margin
        )
    return out
