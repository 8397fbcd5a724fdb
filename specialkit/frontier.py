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

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pandas as pd
import torch

from . import data, ensemble, evaluation, models, specialists, stats

if TYPE_CHECKING:
    from .pipeline import Run

__all__ = ["FrontierError", "budget_flops", "matched_epochs", "width_run", "variant_run", "measure_points", "run_points",
           "points_of", "COLUMNS", "FILE"]

FILE = "frontier.json"
"""Name of the file :func:`measure_points` results are saved under in the base run's folder (``bench/frontier.py``)."""
COLUMNS = ("name", "kind", "accuracy", "lo", "hi", "params_stored", "mflops", "ms_b1", "ms_b256", "train_flops")
"""Columns of a frontier table; ``kind`` is generalist | ensemble | student."""


class FrontierError(ValueError):
    """A frontier point cannot be made; the message names the problem and the fix."""


def budget_flops(run: "Run") -> float:
    """Training FLOPs of the run's generalist plus all its specialists (3 x forward FLOPs per example-pass;
    a shared trunk forward only)."""
    ds, gen = run.dataset(), run.generalist()
    shape = (1, ds.channels, ds.image_size, ds.image_size)
    gen_train = 3.0 * models.count_flops(gen.model, shape) * gen.examples_seen
    shape3 = (1, ds.channels, ds.image_size, ds.image_size)
    spec_train = float(sum(s.examples_seen * specialists.train_flops_per_example(s.model, shape3) for s in run.specialists()))
    return gen_train + spec_train


def matched_epochs(budget: float, forward_flops: float, n_train: int) -> int:
    """Whole epochs (>= 1) of a model with ``forward_flops`` per image closest to ``budget`` training FLOPs."""
    if budget <= 0 or forward_flops <= 0 or n_train < 1:
        raise FrontierError(f"budget={budget}, forward_flops={forward_flops}, n_train={n_train}: all must be positive")
    return max(1, int(round(budget / (3.0 * forward_flops * n_train))))


def width_run(base: "Run", width: int, folder: str | Path) -> "Run":
    """A generalist of ``width`` (the base run's architecture otherwise) trained for the base run's total training
    budget (:func:`budget_flops`), in its own run folder; trained here unless already done."""
    from .pipeline import Run

    ds = base.dataset()
    cfg = base.model_config(num_classes=ds.num_classes, width=width)
    fwd = models.count_flops(models.build_model(cfg), (1, ds.channels, ds.image_size, ds.image_size))
    epochs = matched_epochs(budget_flops(base), fwd, len(ds.y_train))
    run = Run(Path(folder), base.config.replace(name=f"width{width}", width=width, epochs=epochs, compute_matched=False),
              overwrite=True, log=base.log)  # fmt: skip
    run.share_dataset(ds)
    run.generalist()
    return run


def variant_run(base: "Run", folder: str | Path, **settings: Any) -> "Run":
    """The base run with other specialist ``settings`` (e.g. ``specialist_shared_stages=2``) in its own folder: the
    base run's generalist and groups are copied there, so only the specialists are trained (and the ensembles made)."""
    from .pipeline import Run

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("generalist", "clusters"):
        if (base.folder / name).is_dir() and not (folder / name).exists():
            shutil.copytree(base.folder / name, folder / name)
    for name in ("clusters.json",):
        if (base.folder / name).is_file() and not (folder / name).exists():
            shutil.copy2(base.folder / name, folder / name)
    run = Run(folder, base.config.replace(name=folder.name, **settings), overwrite=True, log=base.log)
    run.share_dataset(base.dataset())
    run.ensembles()
    return run


def _latency(model: torch.nn.Module, x: torch.Tensor, *, repeats: int) -> dict[int, float]:
    with torch.inference_mode():
        return {bs: evaluation.measure_latency(model.eval(), x[: 64 if bs == 1 else len(x)], batch_size=bs, repeats=repeats,
                                               best=True) * 1e3 for bs in (1, 256)}  # fmt: skip


def _ensemble_latency(run: "Run", x_uint8: torch.Tensor, *, repeats: int) -> dict[int, float]:
    sps = run.specialists()
    active = run.activation("test")[: len(x_uint8)]

    def kl(p_gen: np.ndarray, probs: list[np.ndarray], act: np.ndarray) -> np.ndarray:
        outs = [ensemble.SpecialistOutputs(classes=s.classes, probs=np.nan_to_num(p, nan=1.0 / p.shape[1])) for s, p in zip(sps, probs)]
        return ensemble.combine_kl(p_gen, outs, act)

    with torch.inference_mode():
        df = evaluation.latency_table(run.generalist().model, [s.model for s in sps], x_uint8, active, rules={"kl": kl},
                                      repeats=repeats, best=True, max_images={1: min(64, len(x_uint8)), 256: len(x_uint8)})  # fmt: skip
    row = df[df["model"] == "kl conditional"].set_index("batch_size")["seconds_per_image"]
    return {1: float(row[1]) * 1e3, 256: float(row[256]) * 1e3}


def measure_points(base: "Run", *, widths: Mapping[int, "Run"] | None = None, variants: Mapping[str, "Run"] | None = None,
                   rule: str = "kl", latency: bool = True, repeats: int = 5, latency_images: int = 512) -> pd.DataFrame:
    """The frontier table (:data:`COLUMNS`, one row per point) of a base run, generalists of other widths and
    specialist variants; accuracy intervals from one paired bootstrap over the shared test images.

    Args:
        base: the finished base run (generalist, compute-matched generalist, specialists, student).
        widths: width -> a :func:`width_run`.
        variants: label (e.g. ``"shared 2"``) -> a :func:`variant_run`.
        rule: the combination rule of every ensemble point.
        latency: measure latency (else ``ms_b1``/``ms_b256`` are NaN).
        repeats: timed passes per measurement (the best is kept).
        latency_images: test images timed at batch 256 (64 at batch 1).
    """
    ds = base.dataset()
    y = ds.y_test.numpy()
    shape = (1, ds.channels, ds.image_size, ds.image_size)
    x8 = ds.x_test[:latency_images]
    xf = data.to_float(x8)
    rows, correct = [], {}

    def single(name: str, result: Any, train_flops: float) -> None:
        m = result.model.eval()
        correct[name] = result.test_probs.argmax(1) == y
        lat = _latency(m, xf, repeats=repeats) if latency else {1: np.nan, 256: np.nan}
        rows.append({"name": name, "kind": "student" if name == "student" else "generalist",
                     "params_stored": models.count_parameters(m), "mflops": models.count_flops(m, shape) / 1e6,
                     "ms_b1": lat[1], "ms_b256": lat[256], "train_flops": train_flops})  # fmt: skip

    def ens(name: str, run: "Run") -> None:
        q = run.combine(rule, "test")
        correct[name] = q.argmax(1) == y
        spec_costs = [evaluation.model_cost(s.model, shape) for s in run.specialists()]
        cost = evaluation.ensemble_cost(evaluation.model_cost(run.generalist().model, shape), spec_costs, run.activation("test"))
        lat = _ensemble_latency(run, x8, repeats=repeats) if latency else {1: np.nan, 256: np.nan}
        rows.append({"name": name, "kind": "ensemble", "params_stored": cost["ensemble_params"], "mflops": cost["conditional_flops"] / 1e6,
                     "ms_b1": lat[1], "ms_b256": lat[256], "train_flops": budget_flops(run)})  # fmt: skip

    gen_train = 3.0 * models.count_flops(base.generalist().model, shape) * base.generalist().examples_seen
    single(f"generalist w{base.config.width}", base.generalist(), gen_train)
    if base.config.compute_matched:
        cm = base.compute_matched()
        single(f"compute-matched w{base.config.width}", cm, gen_train + 3.0 * models.count_flops(cm.model, shape) * cm.examples_seen)
    for w, run in sorted((widths or {}).items()):
        g = run.generalist()
        single(f"generalist w{w}", g, 3.0 * models.count_flops(g.model, shape) * g.examples_seen)
    ens(f"{rule}, whole specialists", base)
    for label, run in (variants or {}).items():
        ens(f"{rule}, {label}", run)
    st = base.distill()
    single("student", st, float("nan"))
    boot = stats.paired_bootstrap(correct, resamples=base.config.bootstrap_resamples, seed=base.config.seed)
    for r in rows:
        r["accuracy"] = float(correct[r["name"]].mean())
        r["lo"], r["hi"] = boot.top1_ci(r["name"])
    return pd.DataFrame(rows)[list(COLUMNS)]


def run_points(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The frontier points of one finished run from its ``metrics.json`` (no training, no timing): the generalist,
    the compute-matched generalist, the ensemble of ``kl`` (conditional execution) and the student, with the
    accuracies' intervals and the costs of ``metrics["cost"]["summary"]``."""
    summary = {r["model"]: r for r in metrics["cost"].get("summary", [])}
    if not summary:
        raise FrontierError("metrics.json has no cost summary: recompute it with this specialkit (run.metrics())")
    rows_by = {r["name"]: r for r in metrics["comparison"]}
    which = {"generalist": "generalist", "compute_matched": "generalist", "kl": "ensemble, conditional", "student": "student"}
    rows = []
    for name, cost_row in which.items():
        if name not in rows_by:
            continue
        r, c = rows_by[name], summary[cost_row]
        rows.append({"name": name if name != "kl" else "kl (conditional)", "kind": "ensemble" if name == "kl" else
                     "student" if name == "student" else "generalist", "accuracy": r["top1"], "lo": r["top1_ci"][0],
                     "hi": r["top1_ci"][1], "params_stored": c["params_stored"], "mflops": c["mflops_per_image"],
                     "ms_b1": c.get("ms_per_image_b1"), "ms_b256": c.get("ms_per_image_b256"), "train_flops": np.nan})  # fmt: skip
    return pd.DataFrame(rows)[list(COLUMNS)]


def points_of(folder: str | Path, metrics: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """The frontier table to show for a run folder: the one ``bench/frontier.py`` measured (``frontier.json``)
    when the folder has it, else the run's own points (:func:`run_points`); with a line saying which."""
    path = Path(folder) / FILE
    if path.is_file():
        from .runs import read_json

        saved = read_json(path)
        table = pd.DataFrame(saved["points"])[list(COLUMNS)]
        for col in COLUMNS[2:]:
            table[col] = pd.to_numeric(table[col], errors="coerce")
        return table, (f"measured by bench/frontier.py ({path.name}): generalists of other widths each trained for "
                       f"{saved['budget_flops']:.3g} FLOPs, the base run's generalist + specialists")
    return run_points(metrics), "this run's own models (bench/frontier.py adds generalists of other widths and cheaper specialists)"
