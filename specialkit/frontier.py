"""The accuracy-versus-cost frontier (issue 12): every model of a study on one picture.

Points, all scored on the same test images (one paired bootstrap, ``stats.py``, gives every accuracy its
95% interval):

* ``generalist`` and the ``compute_matched`` generalist of the base run;
* generalists of other widths, each trained for the same total training FLOPs as the base run's generalist
  plus its specialists (:func:`budget_flops`, :func:`matched_epochs`);
* the ensemble (rule ``kl``, conditional execution) with whole, shared-trunk and smaller specialists
  (one run folder each, the base run's generalist and groups copied in, so only the specialists differ);
* the distilled ``student``.

Costs per image: parameters stored, FLOPs (counted; a shared trunk once) and latency measured at batch 1
and 256 (best of repeats, one thread, one process). :func:`run_points` gives the points of one finished
run from its ``metrics.json`` alone (no training, no timing), for the report and notebook 05.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from . import cost, dataset, ensemble, evaluation, models, runs, stats
from .view import RunView, view_of

__all__ = [
    "FrontierError",
    "budget_flops",
    "matched_epochs",
    "measure_points",
    "run_points",
    "points_of",
    "COLUMNS",
    "PAIRED",
    "FILE",
    "THRESHOLDS",
    "threshold_curve",
    "run_threshold_curve",
    "CONFIDENTS",
    "confidence_curve",
    "run_confidence_curve",
    "choose_confident",
    "confident_for_share",
]

FILE = "frontier.json"
"""Name of the file :func:`measure_points` results are saved under in the base run's folder (``bench/frontier.py``)."""
COLUMNS = ("name", "kind", "accuracy", "lo", "hi", "params_stored", "mflops", "ms_b1", "ms_b256", "train_flops")
"""Columns of a frontier table; ``kind`` is generalist | ensemble | student."""
PAIRED = ("reference", "delta", "delta_lo", "delta_hi", "p_value", "verdict")
"""Extra columns of :func:`measure_points`: each point against its reference (the base generalist; a specialist
variant against the whole specialists), the difference in accuracy with its 95% paired-bootstrap interval, McNemar's
exact p and ``stats.verdict``."""


THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
"""Default skip thresholds of :func:`threshold_curve` (0 = the paper's rule: every switched-on specialist runs)."""
CONFIDENTS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
"""Default confidence skips of :func:`confidence_curve` and :func:`choose_confident` (1 = the paper's rule: every
image is routed)."""


FrontierError = cost.FrontierError
budget_flops = cost.budget_flops
matched_epochs = cost.matched_epochs


def _latency(model: torch.nn.Module, x: torch.Tensor, *, repeats: int) -> dict[int, float]:
    with torch.inference_mode():
        return {
            bs: evaluation.measure_latency(
                model.eval(), x[: 64 if bs == 1 else len(x)], batch_size=bs, repeats=repeats, best=True
            )
            * 1e3
            for bs in (1, 256)
        }


def _ensemble_latency(run: RunView, x_uint8: torch.Tensor, *, repeats: int) -> dict[int, float]:
    sps = run.specialists()
    active = run.activation("test")[: len(x_uint8)]

    def kl(p_gen: np.ndarray, probs: list[np.ndarray], act: np.ndarray) -> np.ndarray:
        outs = [
            ensemble.SpecialistOutputs(classes=s.classes, probs=np.nan_to_num(p, nan=1.0 / p.shape[1]))
            for s, p in zip(sps, probs)
        ]
        return ensemble.combine_kl(p_gen, outs, act)

    with torch.inference_mode():
        df = evaluation.latency_table(
            run.generalist().model,
            [models.merge_deltas(s.model) for s in sps],  # delta specialists run as dense layers (what a loader builds)
            x_uint8,
            active,
            rules={"kl": kl},
            repeats=repeats,
            best=True,
            max_images={1: min(64, len(x_uint8)), 256: len(x_uint8)},
        )
    row = df[df["model"] == "kl conditional"].set_index("batch_size")["seconds_per_image"]
    return {1: float(row[1]) * 1e3, 256: float(row[256]) * 1e3}


def measure_points(
    base: RunView,
    *,
    widths: Mapping[int, RunView] | None = None,
    variants: Mapping[str, RunView] | None = None,
    rule: str = "kl",
    latency: bool = True,
    repeats: int = 5,
    latency_images: int = 512,
) -> pd.DataFrame:
    """The frontier table (:data:`COLUMNS` and :data:`PAIRED`, one row per point) of a base run, generalists of other
    widths and specialist variants; accuracy intervals and paired differences from one bootstrap over the shared test
    images.

    Args:
        base: the finished base run (generalist, compute-matched generalist, specialists, student).
        widths: width -> a :func:`width_run`.
        variants: label (e.g. ``"shared 2"``) -> a :func:`variant_run`.
        rule: the combination rule of every ensemble point.
        latency: measure latency (else ``ms_b1``/``ms_b256`` are NaN).
        repeats: timed passes per measurement (the best is kept).
        latency_images: test images timed at batch 256 (64 at batch 1).
    """
    base = view_of(base)  # measures finished runs: nothing trains here
    widths = {w: view_of(r) for w, r in (widths or {}).items()}
    variants = {label: view_of(r) for label, r in (variants or {}).items()}
    ds = base.dataset()
    y = ds.y_test.numpy()
    shape = (1, ds.channels, ds.image_size, ds.image_size)
    x8 = ds.x_test[:latency_images]
    xf = dataset.to_float(x8)
    rows, correct = [], {}

    def single(name: str, result: Any, train_flops: float) -> None:
        m = result.model.eval()
        correct[name] = result.test_probs.argmax(1) == y
        lat = _latency(m, xf, repeats=repeats) if latency else {1: np.nan, 256: np.nan}
        rows.append(
            {
                "name": name,
                "kind": "student" if name == "student" else "generalist",
                "params_stored": models.count_parameters(m),
                "mflops": models.count_flops(m, shape) / 1e6,
                "ms_b1": lat[1],
                "ms_b256": lat[256],
                "train_flops": train_flops,
            }
        )

    def ens(name: str, run: RunView) -> None:
        q = run.combine(rule, "test")
        correct[name] = q.argmax(1) == y
        spec_costs = [evaluation.model_cost(s.model, shape) for s in run.specialists()]
        cost = evaluation.ensemble_cost(
            evaluation.model_cost(run.generalist().model, shape), spec_costs, run.activation("test")
        )
        lat = _ensemble_latency(run, x8, repeats=repeats) if latency else {1: np.nan, 256: np.nan}
        rows.append(
            {
                "name": name,
                "kind": "ensemble",
                "params_stored": cost["ensemble_params"],
                "mflops": cost["conditional_flops"] / 1e6,
                "ms_b1": lat[1],
                "ms_b256": lat[256],
                "train_flops": budget_flops(run),
            }
        )

    gen_train = cost.train_flops(base.generalist().model, shape, base.generalist().examples_seen)
    single(f"generalist w{base.config.width}", base.generalist(), gen_train)
    if base.config.compute_matched:
        cm = base.compute_matched()
        single(
            f"compute-matched w{base.config.width}", cm, gen_train + cost.train_flops(cm.model, shape, cm.examples_seen)
        )
    for w, run in sorted((widths or {}).items()):
        g = run.generalist()
        single(f"generalist w{w}", g, cost.train_flops(g.model, shape, g.examples_seen))
    ens(f"{rule}, whole specialists", base)
    for label, run in (variants or {}).items():
        ens(f"{rule}, {label}", run)
    st = base.distill()
    single("student", st, float("nan"))
    boot = stats.paired_bootstrap(correct, resamples=base.config.bootstrap_resamples, seed=base.config.seed)
    gen_name, whole = rows[0]["name"], f"{rule}, whole specialists"
    for r in rows:
        r["accuracy"] = float(correct[r["name"]].mean())
        r["lo"], r["hi"] = boot.top1_ci(r["name"])
        ref = whole if r["kind"] == "ensemble" and r["name"] != whole else gen_name
        if r["name"] == gen_name:
            r.update(reference=None, delta=np.nan, delta_lo=np.nan, delta_hi=np.nan, p_value=np.nan, verdict=None)
            continue
        ci = boot.gain_ci(r["name"], ref)
        p = stats.mcnemar(correct[ref], correct[r["name"]]).p_value
        r.update(
            reference=ref,
            delta=r["accuracy"] - float(correct[ref].mean()),
            delta_lo=ci[0],
            delta_hi=ci[1],
            p_value=p,
            verdict=stats.verdict(ci, p),
        )
    return pd.DataFrame(rows)[list(COLUMNS + PAIRED)]


def run_points(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The frontier points of one finished run from its ``metrics.json`` (no training, no timing): the generalist,
    the compute-matched generalist, the ensembles of ``kl`` and ``kl_calibrated`` (conditional execution, when the run
    computed them) and the student, with the
    accuracies' intervals and the costs of ``metrics["cost"]["summary"]``."""
    summary = {r["model"]: r for r in metrics["cost"].get("summary", [])}
    if not summary:
        raise FrontierError("metrics.json has no cost summary: recompute it with this specialkit (run.metrics())")
    rows_by = {r["name"]: r for r in metrics["comparison"]}
    which = {
        "generalist": "generalist",
        "compute_matched": "generalist",
        "kl": "ensemble, conditional",
        "kl_calibrated": "ensemble, conditional",
        "student": "student",
    }
    rows = []
    for name, cost_row in which.items():
        if name not in rows_by:
            continue
        r, c = rows_by[name], summary[cost_row]
        rows.append(
            {
                "name": f"{name} (conditional)" if name in ("kl", "kl_calibrated") else name,
                "kind": "ensemble" if name.startswith("kl") else "student" if name == "student" else "generalist",
                "accuracy": r["top1"],
                "lo": r["top1_ci"][0],
                "hi": r["top1_ci"][1],
                "params_stored": c["params_stored"],
                "mflops": c["mflops_per_image"],
                "ms_b1": c.get("ms_per_image_b1"),
                "ms_b256": c.get("ms_per_image_b256"),
                "train_flops": np.nan,
            }
        )
    return pd.DataFrame(rows)[list(COLUMNS)]


def points_of(folder: str | Path, metrics: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """The frontier table to show for a run folder: the one ``bench/frontier.py`` measured (``frontier.json``)
    when the folder has it, else the run's own points (:func:`run_points`); with a line saying which."""
    path = Path(folder) / FILE
    if path.is_file():
        saved = runs.read_json(path)
        table = pd.DataFrame(saved["points"])
        table = table[[c for c in COLUMNS + PAIRED if c in table.columns]]
        for col in (*COLUMNS[2:], "delta", "delta_lo", "delta_hi", "p_value"):
            if col in table.columns:
                table[col] = pd.to_numeric(table[col], errors="coerce")
        return table, (
            f"measured by bench/frontier.py ({path.name}): generalists of other widths each trained for "
            f"{saved['budget_flops']:.3g} FLOPs, the base run's generalist + specialists"
        )
    return run_points(
        metrics
    ), "this run's own models (bench/frontier.py adds generalists of other widths and cheaper specialists)"


def _skip_curve(
    p_gen: np.ndarray,
    outputs: list[ensemble.SpecialistOutputs],
    y: np.ndarray,
    column: str,
    values: list[float],
    activate: Callable[[float], np.ndarray],
    *,
    resamples: int,
    seed: int,
) -> pd.DataFrame:
    """The ``kl`` ensemble's accuracy and routed fraction per skip setting, each against ``values[0]`` (no skip)."""
    y = np.asarray(y)
    rows, correct = [], {}
    for v in values:
        active = activate(v)
        correct[v] = ensemble.combine_kl(p_gen, outputs, active).argmax(1) == y
        rows.append({column: v, **ensemble.fraction_routed(active), "accuracy": float(correct[v].mean())})
    ref = values[0]
    boot = stats.paired_bootstrap({str(v): c for v, c in correct.items()}, resamples=resamples, seed=seed)
    for r in rows:
        v = r[column]
        r["lo"], r["hi"] = boot.top1_ci(str(v))
        ci = boot.gain_ci(str(v), str(ref))
        p = stats.mcnemar(correct[ref], correct[v]).p_value
        r.update(
            delta=r["accuracy"] - rows[0]["accuracy"],
            delta_lo=ci[0],
            delta_hi=ci[1],
            p_value=p,
            verdict=stats.verdict(ci, p) if v != ref else None,
        )
    return pd.DataFrame(rows)


def threshold_curve(
    p_gen: np.ndarray,
    outputs: list[ensemble.SpecialistOutputs],
    y: np.ndarray,
    thresholds: tuple[float, ...] = THRESHOLDS,
    *,
    top_n: int = 1,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy of the ``kl`` ensemble against the fraction of images routed to a specialist, one row per skip
    threshold (HD-CNN's conditional execution, ``ensemble.activation``'s ``threshold``), each against ``t = 0`` (the
    paper's rule) with a paired-bootstrap interval and McNemar's exact test.

    Args:
        p_gen: (N, C) generalist probabilities.
        outputs: one :class:`specialkit.ensemble.SpecialistOutputs` per specialist, every row filled.
        y: (N,) true labels.
        thresholds: the skip thresholds, each in [0, 1]; 0 is added when missing (the reference).
        top_n: the generalist's top-n classes that switch specialists on.
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        Columns ``threshold``, ``fraction_routed``, ``specialists_per_image``, ``accuracy``, ``lo``, ``hi``,
        ``delta``, ``delta_lo``, ``delta_hi``, ``p_value``, ``verdict`` (against ``t = 0``), sorted by threshold.
    """
    groups = [o.classes for o in outputs]
    return _skip_curve(
        p_gen,
        outputs,
        y,
        "threshold",
        sorted({0.0, *map(float, thresholds)}),
        lambda t: ensemble.activation(p_gen, groups, top_n=top_n, threshold=t),
        resamples=resamples,
        seed=seed,
    )


def confidence_curve(
    p_gen: np.ndarray,
    outputs: list[ensemble.SpecialistOutputs],
    y: np.ndarray,
    confidents: tuple[float, ...] = CONFIDENTS,
    *,
    top_n: int = 1,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Accuracy of the ``kl`` ensemble against the fraction of images routed to a specialist, one row per
    confidence skip (``ensemble.activation``'s ``confident``: the generalist answers alone for an image whose top-1
    probability exceeds it), each against ``confident = 1`` (every image routed, the paper's rule) with a
    paired-bootstrap interval and McNemar's exact test.

    Args:
        p_gen: (N, C) generalist probabilities.
        outputs: one :class:`specialkit.ensemble.SpecialistOutputs` per specialist, every row filled.
        y: (N,) true labels.
        confidents: the values, each in (0, 1]; 1 is added when missing (the reference).
        top_n: the generalist's top-n classes that switch specialists on.
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        Columns ``confident``, ``fraction_routed``, ``specialists_per_image``, ``accuracy``, ``lo``, ``hi``,
        ``delta``, ``delta_lo``, ``delta_hi``, ``p_value``, ``verdict`` (against ``confident = 1``), from 1 down.
    """
    groups = [o.classes for o in outputs]
    return _skip_curve(
        p_gen,
        outputs,
        y,
        "confident",
        sorted({1.0, *map(float, confidents)}, reverse=True),
        lambda c: ensemble.activation(p_gen, groups, top_n=top_n, confident=c),
        resamples=resamples,
        seed=seed,
    )


def choose_confident(
    p_gen: np.ndarray,
    outputs: list[ensemble.SpecialistOutputs],
    confidents: tuple[float, ...] = CONFIDENTS,
    *,
    top_n: int = 1,
    max_changed: float = 0.001,
) -> float:
    """The lowest confidence skip whose ``kl`` predictions differ from routing every image on at most
    ``max_changed`` of the images given (the validation images: the test images choose nothing).

    No labels are read: the rule asks how often skipping changes the ensemble's answer, not whether the change
    helps, so it cannot be tuned towards a hoped-for accuracy. Lower values route fewer images (cheaper).

    Args:
        p_gen: (N, C) generalist probabilities on the choosing images.
        outputs: the specialists' outputs on the same images, every row filled.
        confidents: the candidates, each in (0, 1].
        top_n: the generalist's top-n classes that switch specialists on.
        max_changed: the largest share of changed predictions allowed, in [0, 1) (default 0.1%).

    Returns:
        The chosen value (1.0 when no candidate below 1 keeps the answers).
    """
    if not 0.0 <= max_changed < 1.0:
        raise FrontierError(f"max_changed must be in [0, 1) (a share of images), got {max_changed!r}")
    groups = [o.classes for o in outputs]

    def answers(c: float) -> np.ndarray:
        active = ensemble.activation(p_gen, groups, top_n=top_n, confident=c)
        return ensemble.combine_kl(p_gen, outputs, active).argmax(1)

    full = answers(1.0)
    chosen = 1.0
    for c in sorted({float(v) for v in confidents if v < 1}, reverse=True):
        if float(np.mean(answers(c) != full)) > max_changed:
            break
        chosen = c
    return chosen


def confident_for_share(p_gen: np.ndarray, share: float) -> float:
    """The confidence skip that routes ``share`` of the given images (the validation images: the test images choose
    nothing) to the specialists: the generalist top-1 probability of the k-th least confident image, k = floor(share
    x N), so that ``ensemble.activation``'s ``confident = c`` (which routes the images whose top-1 probability is <=
    ``c``) routes those k images.

    A budget, not a search: the value follows from what the specialists may cost (share of images routed), before
    any accuracy is seen. No labels are read. Ties at ``c`` all route, so the share routed can exceed ``share`` only
    where several images share one top-1 probability.

    Args:
        p_gen: (N, C) generalist probabilities on the choosing images.
        share: the share of images to route, in (0, 1]; 1 routes every image.

    Returns:
        The value, in (0, 1] (1.0 for ``share = 1``).

    Raises:
        FrontierError: ``share`` out of range, or too small to route one of the N images.
    """
    p_gen = np.asarray(p_gen)
    if p_gen.ndim != 2 or not len(p_gen):
        raise FrontierError(f"p_gen must be (N, C) probabilities of at least one image, got shape {p_gen.shape}")
    if not (isinstance(share, (int, float, np.floating)) and 0.0 < float(share) <= 1.0):
        raise FrontierError(f"share must be in (0, 1] (the share of images routed), got {share!r}")
    if float(share) >= 1.0:
        return 1.0
    top = np.sort(p_gen.max(axis=1))
    k = int(np.floor(float(share) * len(top) + 1e-9))
    if k < 1:
        raise FrontierError(
            f"share={share:g} routes none of {len(top)} images: give a share of at least 1/{len(top)} "
            f"({1 / len(top):.2g}) or more images"
        )
    return float(top[k - 1])


def run_threshold_curve(run: RunView, thresholds: tuple[float, ...] = THRESHOLDS) -> pd.DataFrame:
    """:func:`threshold_curve` of a finished run on its test images (its saved outputs; nothing trains or runs).

    Args:
        run: a run whose specialists are finished.
        thresholds: the skip thresholds.

    Returns:
        The curve.
    """
    run = view_of(run)
    y = run.dataset().y_test.numpy()
    outs = [ensemble.SpecialistOutputs(classes=g, probs=p) for g, p in zip(run.groups(), run.specialist_probs("test"))]
    c = run.config
    return threshold_curve(
        run.generalist().probs("test"),
        outs,
        y,
        thresholds,
        top_n=c.top_n,
        resamples=c.bootstrap_resamples,
        seed=c.seed,
    )


def run_confidence_curve(run: RunView, confidents: tuple[float, ...] = CONFIDENTS) -> pd.DataFrame:
    """:func:`confidence_curve` of a finished run on its test images (its saved outputs; nothing trains or runs),
    with the value :func:`choose_confident` picks on its validation images in column ``chosen`` (bool).

    Args:
        run: a run whose specialists are finished.
        confidents: the confidence skips.

    Returns:
        The curve.
    """
    run = view_of(run)
    y = run.dataset().y_test.numpy()
    c = run.config

    def outs(split: str) -> list[ensemble.SpecialistOutputs]:
        return [
            ensemble.SpecialistOutputs(classes=g, probs=p) for g, p in zip(run.groups(), run.specialist_probs(split))
        ]

    chosen = choose_confident(run.generalist().probs("val"), outs("val"), confidents, top_n=c.top_n)
    curve = confidence_curve(
        run.generalist().probs("test"),
        outs("test"),
        y,
        (*confidents, chosen),
        top_n=c.top_n,
        resamples=c.bootstrap_resamples,
        seed=c.seed,
    )
    curve["chosen"] = curve["confident"] == chosen
    return curve
