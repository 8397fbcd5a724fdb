"""Every number of a run (``metrics.json``) and the self-contained HTML report (``report.html``)."""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from . import clusters, ensemble, evaluation, plots, runs

if TYPE_CHECKING:
    from .pipeline import Run


def method_specs(run: "Run") -> dict[str, Any]:
    from .pipeline import method_specs as specs

    return specs(run)

__all__ = ["compute_metrics", "write_report", "render_report", "reading", "latency"]


def _records(df: pd.DataFrame, index_name: str | None = None) -> list[dict[str, Any]]:
    df = df.reset_index() if index_name or df.index.name else df
    return json.loads(df.to_json(orient="records"))


def results_on_test(run: "Run") -> dict[str, np.ndarray]:
    """name -> (N_test, C) probabilities of every model and rule of the run that is on disk or asked for."""
    out: dict[str, np.ndarray] = {"generalist": run.generalist().test_probs}
    if run.config.compute_matched:
        out["compute_matched"] = run.compute_matched().test_probs
    for rule, q in run.ensembles().items():
        if rule != "generalist":
            out[rule] = q
    out["student"] = run.distill().test_probs
    return out


def latency(run: "Run", *, max_images: int = 512, repeats: int = 3) -> pd.DataFrame:
    """Measured seconds per image at batch 1 and 256: the generalist and the ``kl`` ensemble, all vs conditional."""
    ds = run.dataset()
    x = ds.x_test[:max_images]
    active = run.activation("test")[:max_images]
    sps = run.specialists()

    def kl(p_gen: np.ndarray, probs: list[np.ndarray], act: np.ndarray) -> np.ndarray:
        outs = [ensemble.SpecialistOutputs(classes=s.classes, probs=np.nan_to_num(p, nan=1.0 / p.shape[1])) for s, p in zip(sps, probs)]
        return ensemble.combine_kl(p_gen, outs, act)

    with torch.inference_mode():
        return evaluation.latency_table(run.generalist().model, [s.model for s in sps], x, active,
                                        rules={"kl": kl}, repeats=repeats, max_images={1: min(64, len(x)), 256: len(x)})  # fmt: skip


def compute_metrics(run: "Run", *, measure_latency: bool = True) -> dict[str, Any]:
    """All numbers of a finished run as a JSON-able dict (the stages run first if needed)."""
    ds, cfg = run.dataset(), run.config
    y = ds.y_test.numpy()
    spec = run.clusters()
    coverage = spec.coverage()
    results = results_on_test(run)
    gen = run.generalist()
    covered = np.flatnonzero(coverage > 0)
    table = evaluation.comparison_table(results, y, baseline="generalist", covered_classes=covered)
    cs = run.confusion()
    shape = (ds.channels, ds.image_size, ds.image_size)
    gen_cost = evaluation.model_cost(gen.model, shape)
    sps = run.specialists()
    spec_costs = [evaluation.model_cost(s.model, shape) for s in sps]
    flops = evaluation.ensemble_cost(gen_cost, spec_costs, run.activation("test"))
    student_cost = evaluation.model_cost(run.distill().model, shape)
    m: dict[str, Any] = {
        "run": cfg.name,
        "config": cfg.to_dict(),
        "dataset": {"name": ds.name, "num_classes": ds.num_classes, "train": len(ds.y_train), "val": len(ds.y_val),
                    "test": len(ds.y_test), "fingerprint": ds.fingerprint},  # fmt: skip
        "generalist": {"val_top1": cs.accuracy, "test_top1": evaluation.top1(gen.test_probs, y), **gen_cost,
                       "examples_seen": gen.examples_seen},  # fmt: skip
        "top_confused_pairs": _records(cs.top_pairs(10)),
        "clusters": {"groups": {k: list(v) for k, v in spec.groups.items()}, "uncovered": list(spec.uncovered()),
                     "quality": clusters.quality(spec, cs.cm, coarse_of_class=ds.coarse_of_class),
                     "methods": _records(clusters.quality_table(method_specs(run), cs.cm, coarse_of_class=ds.coarse_of_class))},  # fmt: skip
        "specialists": specialist_rows(run),
        "comparison": _records(table.rename_axis("name")),
        "table4": {rule: _records(evaluation.coverage_breakdown(gen.test_probs, results[rule], y, coverage, add_total=True))
                   for rule in results if rule not in ("generalist", "compute_matched", "student")},  # fmt: skip
        "cost": {"flops": flops, "student": student_cost, "specialists_total_examples": int(sum(s.examples_seen for s in sps))},
        "student": {"test_top1": evaluation.top1(results["student"], y), **student_cost},
        "timings": stage_seconds(run),
    }
    if cfg.compute_matched:
        m["compute_matched"] = {"test_top1": evaluation.top1(results["compute_matched"], y),
                                "examples_seen": run.compute_matched().examples_seen}  # fmt: skip
    if measure_latency:
        m["cost"]["latency"] = _records(latency(run))
    return _finite(m)


def specialist_rows(run: "Run") -> list[dict[str, Any]]:
    """Per specialist: group, classes, dustbin correction, example-passes, test accuracy on its own
    targets (all test images, and those of its classes only), parameters and FLOPs."""
    ds = run.dataset()
    y = ds.y_test.numpy()
    shape = (ds.channels, ds.image_size, ds.image_size)
    rows = []
    for group, sp, probs in zip(run.clusters().groups, run.specialists(), run.specialist_probs("test")):
        target = np.full(ds.num_classes, len(sp.classes))
        target[sp.classes] = np.arange(len(sp.classes))
        own = np.isin(y, sp.classes)
        pred = probs.argmax(1)
        rows.append({
            "group": group, "classes": " ".join(sp.class_names), "size": len(sp.classes),
            "dustbin_correction": sp.dustbin_correction, "examples_seen": sp.examples_seen,
            "test_acc_own_classes": float((pred[own] == target[y[own]]).mean()) if own.any() else float("nan"),
            "test_acc_all": float((pred == target[y]).mean()), **evaluation.model_cost(sp.model, shape),
        })  # fmt: skip
    return rows


def stage_seconds(run: "Run") -> dict[str, float]:
    """Wall seconds each stage took when it was computed (from its ``done.json``)."""
    out: dict[str, float] = {}
    for stage in ("generalist", "compute_matched", "distill"):
        marker = run.stage_dir(stage) / "done.json"
        if marker.is_file():
            out[stage] = float(runs.read_json(marker).get("seconds", 0.0))
    folder = run.stage_dir("specialists")
    if folder.is_dir():
        out["specialists"] = round(sum(float(runs.read_json(p).get("seconds", 0.0)) for p in folder.glob("*/done.json")), 2)
    return out


def _finite(obj: Any) -> Any:
    """Replace NaN/inf with None so ``metrics.json`` is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def cost_points(metrics: dict[str, Any]) -> pd.DataFrame:
    """Accuracy against MFLOPs per image for every model and rule (the ensemble rules run all specialists,
    except ``kl``, shown with conditional execution too)."""
    flops = metrics["cost"]["flops"]
    acc = {r["name"]: r["top1"] for r in metrics["comparison"]}
    cost = {"generalist": flops["generalist_flops"], "compute_matched": flops["generalist_flops"],
            "student": metrics["cost"]["student"]["flops"], "top_confident": flops["all_flops"],
            "moe": flops["all_flops"], "kl": flops["conditional_flops"]}  # fmt: skip
    rows = [{"name": n if n != "kl" else "kl (conditional)", "accuracy": a, "cost": cost[n] / 1e6} for n, a in acc.items() if n in cost]
    if "kl" in acc:
        rows.append({"name": "kl (all specialists)", "accuracy": acc["kl"], "cost": flops["all_flops"] / 1e6})
    return pd.DataFrame(rows)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def reading(metrics: dict[str, Any]) -> str:
    """A short written reading of a run's numbers (markdown), generated from ``metrics`` — never typed by hand."""
    rows = {r["name"]: r for r in metrics["comparison"]}
    gen = rows["generalist"]
    lines = [f"On **{metrics['dataset']['name']}** ({metrics['dataset']['num_classes']} classes, "
             f"{metrics['dataset']['test']} test images) the generalist reaches **{_pct(gen['top1'])}** test top-1."]  # fmt: skip
    best = max((r for n, r in rows.items() if n not in ("generalist", "compute_matched", "student")), key=lambda r: r["top1"], default=None)
    if best is not None:
        rel = best.get("relative_change") or 0.0
        verdict = "beats" if best["top1"] > gen["top1"] else ("ties" if best["top1"] == gen["top1"] else "does not beat")
        lines.append(f"The best ensemble rule, `{best['name']}`, {verdict} it: **{_pct(best['top1'])}** "
                     f"({rel * 100:+.1f}% relative; the paper reports +4.4% on JFT).")  # fmt: skip
    if "compute_matched" in rows:
        cm = rows["compute_matched"]
        lines.append(f"Given the same extra training compute, the generalist alone reaches {_pct(cm['top1'])}; "
                     + ("the specialists still come out ahead." if best and best["top1"] > cm["top1"]
                        else "so the specialists' gain is not more than extra training would give."))  # fmt: skip
    t4 = [r for r in metrics["table4"].get("kl", []) if r["covered_by"] not in ("total",)]
    if t4:
        parts = ", ".join(f"{r['covered_by']}: {r['delta_correct']:+d} of {r['n_examples']}" for r in t4)
        lines.append(f"By the number of specialists covering the true class (change in correct answers): {parts}.")
    f = metrics["cost"]["flops"]
    lines.append(f"Cost: the ensemble needs {f['conditional_ratio']:.2f}× the generalist's FLOPs per image with conditional "
                 f"execution ({f['mean_active']:.2f} specialists per image) and {f['all_ratio']:.2f}× running every specialist; "
                 f"it holds {f['params_ratio']:.1f}× the parameters.")  # fmt: skip
    if "student" in rows:
        lines.append(f"The distilled student, one model of {metrics['student']['params']:,} parameters, reaches "
                     f"{_pct(rows['student']['top1'])}.")  # fmt: skip
    return "\n\n".join(lines)


# ---------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.9em;margin-bottom:.2em} h2{border-bottom:2px solid #eee;padding-bottom:.2em;margin-top:2.2em}
table{border-collapse:collapse;font-size:.9em;margin:.8em 0} th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f6f6f6} td:first-child,th:first-child{text-align:left} .reading{background:#f5f9ff;border-left:4px solid #4a7bd0;padding:.6em 1em}
nav a{margin-right:1em} .muted{color:#777;font-size:.9em} code{background:#f3f3f3;padding:0 .2em}
"""


def _table(df: pd.DataFrame, *, percent: tuple[str, ...] = (), digits: int = 3) -> str:
    df = df.copy()
    for col in df.columns:
        if col in percent:
            df[col] = df[col].map(lambda v: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * 100:.2f}%")
        elif pd.api.types.is_float_dtype(df[col]):
            df[col] = df[col].map(lambda v: "" if not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}")
    return df.to_html(border=0, escape=True)


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>' + "\n".join(parts) + "</section>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _figures(run: "Run", metrics: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the report, by name (pure plots.* calls on the run's arrays)."""
    from . import data as data_mod

    ds, cs, spec = run.dataset(), run.confusion(), run.clusters()
    gen, q = run.generalist(), run.ensembles()["kl"] if "kl" in run.config.rules else None
    y = ds.y_test.numpy()
    order = clusters.order_classes(spec)
    x, lab = data_mod.examples_per_class(ds, per_class=1)
    figs: dict[str, Any] = {
        "samples": plots.sample_grid(x, lab.numpy(), ds.class_names, ncols=min(31, ds.num_classes), title="one training image per class"),
        "generalist_curves": plots.training_curves({"generalist": gen.history}),
        "confusion": plots.confusion_heatmap(cs.F, cs.class_names, order=order, groups=spec.indices(),
                                             group_names=list(spec.groups), hide_diagonal=True,
                                             title="validation confusion, reordered by group (diagonal hidden)"),
        "covariance": plots.covariance_heatmap(cs.covariance, cs.class_names, order=order, groups=spec.indices()),
        "class_map": plots.class_map(run.class_map(), cs.class_names, group_labels=clusters.group_labels(spec),
                                     group_names=list(spec.groups)),
        "specialist_curves": plots.specialist_curves({g: s.history for g, s in zip(spec.groups, run.specialists())}),
        "accuracy": plots.accuracy_bars({r["name"]: r["top1"] for r in metrics["comparison"]}, baseline="generalist", title="test top-1"),
        "cost": plots.accuracy_vs_cost(cost_points(metrics), cost_label="MFLOPs per image"),
    }  # fmt: skip
    if q is not None:
        t4 = pd.DataFrame(metrics["table4"]["kl"])
        figs["table4"] = plots.table4_chart(t4[t4["covered_by"] != "total"].rename(columns={"covered_by": "coverage"}))
        change = evaluation.per_class_change(gen.test_probs, q, y)
        figs["per_class"] = plots.per_class_change(change["delta"].to_numpy(), ds.class_names, order=order, coverage=spec.coverage())
        figs["fixed_broken"] = plots.fixed_broken_grid(ds.x_test, y, gen.test_probs.argmax(1), q.argmax(1), ds.class_names)
    student = run.distill()
    figs["student_curves"] = plots.training_curves({"generalist": gen.history, "student": student.history})
    return figs


def render_report(run: "Run", metrics: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (plotly.js embedded once; works offline)."""
    from .pipeline import dustbin_effect

    figs = _figures(run, metrics)
    names = list(figs)
    frags = dict(zip(names, plots.figures_to_html_fragment([figs[n] for n in names], include_plotlyjs=True)))
    cfg, ds = run.config, metrics["dataset"]
    comparison = pd.DataFrame(metrics["comparison"]).set_index("name")
    t4 = pd.DataFrame(metrics["table4"].get("kl", [])).set_index("covered_by") if metrics["table4"].get("kl") else pd.DataFrame()
    quality = pd.DataFrame([metrics["clusters"]["quality"]])
    groups = pd.DataFrame([{"group": g, "classes": " ".join(c), "size": len(c)} for g, c in metrics["clusters"]["groups"].items()]).set_index("group")
    flops = pd.Series(metrics["cost"]["flops"]).to_frame("value")
    latency_df = pd.DataFrame(metrics["cost"].get("latency", []))
    timings = pd.Series(metrics["timings"]).to_frame("seconds")
    sections = [
        _section("summary", "Summary", f'<div class="reading">{_markdown(reading(metrics))}</div>', _table(comparison, percent=("top1", "delta_top1", "relative_change", "conditional_acc", "conditional_rel_change"))),
        _section("data", "1 · The data", _p(f"{ds['name']}: {ds['num_classes']} classes; train {ds['train']}, validation {ds['val']} (drives the clusters), test {ds['test']} (final numbers only)."), frags["samples"]),
        _section("generalist", "2 · The generalist", _p(f"{cfg.model} (width {cfg.width}, depth {cfg.depth}), {metrics['generalist']['params']:,} parameters, {cfg.epochs} epochs: validation top-1 {metrics['generalist']['val_top1']:.2%}, test top-1 {metrics['generalist']['test_top1']:.2%}."), frags["generalist_curves"]),
        _section("confusion", "3 · The confusion structure", _p("Rows are true classes; classes are reordered so that each group's classes sit together. Confusions concentrate inside the outlined blocks."), frags["confusion"], frags["covariance"], frags["class_map"], "<h3>Most confused pairs (validation)</h3>", _table(pd.DataFrame(metrics["top_confused_pairs"]))),
        _section("clusters", "4 · The groups", _p(f"Method {cfg.method} ({cfg.distance} distance), k = {cfg.k}, overlap {cfg.overlap}. in_group_error_share is the share of the generalist's validation errors whose two classes share a group."), _table(groups), _table(quality), "<h3>Every method at the same k</h3>", _p("One giant group keeps most errors inside groups but leaves that specialist as hard a job as the generalist's: read the share together with size_max."), _table(pd.DataFrame(metrics["clusters"]["methods"]).set_index("spec"))),
        _section("specialists", "5 · The specialists", _p("Each specialist: its classes plus a dustbin, initialised from the generalist, trained on half special / half other examples, dustbin logit corrected by log(oversampling factor)."), _table(pd.DataFrame(metrics["specialists"]).set_index("group"), percent=("test_acc_own_classes", "test_acc_all")), frags["specialist_curves"], "<h3>What the dustbin correction does (validation)</h3>", _table(dustbin_effect(run), percent=("true_dustbin_share", "dustbin_share_uncorrected", "dustbin_share_corrected"))),
        _section("comparison", "6 · Generalist against the ensembles", frags["accuracy"], "<h3>Gain by the number of specialists covering the true class (the paper's Table 4, rule kl)</h3>", _table(t4, percent=("gen_acc", "ens_acc", "relative_gain")) if len(t4) else "", frags.get("table4", ""), frags.get("per_class", ""), frags.get("fixed_broken", "")),
        _section("cost", "7 · Cost", _table(flops), _table(latency_df) if len(latency_df) else "", frags["cost"]),
        _section("student", "8 · Distilling the ensemble into one model", _p(f"A student of the generalist's architecture trained on the kl ensemble's q at T = {cfg.distill_temperature} (soft weight {cfg.distill_soft_weight}) plus hard labels: test top-1 {metrics['student']['test_top1']:.2%}, {metrics['student']['params']:,} parameters."), frags["student_curves"]),
        _section("timings", "9 · Wall time per stage", _table(timings), f'<p class="muted">settings: <code>{html.escape(json.dumps(cfg.to_dict()))}</code></p>'),
    ]  # fmt: skip
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in [("summary", "Summary"), ("data", "Data"), ("generalist", "Generalist"), ("confusion", "Confusions"), ("clusters", "Groups"), ("specialists", "Specialists"), ("comparison", "Comparison"), ("cost", "Cost"), ("student", "Student")])
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specialkit · {html.escape(cfg.name)}</title>"
            f"<style>{_CSS}</style></head><body><h1>specialkit report · {html.escape(cfg.name)}</h1>"
            f"<p class='muted'>Specialist ensembles after Hinton, Vinyals &amp; Dean (2015), §5–6. Every number on this page is computed by the kit from the run folder.</p>"
            f"<nav>{nav}</nav>{''.join(sections)}</body></html>")  # fmt: skip


def _markdown(text: str) -> str:
    """The tiny markdown subset :func:`reading` writes (**bold**, `code`, paragraphs) as HTML."""
    import re

    out = []
    for para in text.split("\n\n"):
        p = html.escape(para)
        p = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", p)
        p = re.sub(r"`(.+?)`", r"<code>\1</code>", p)
        out.append(f"<p>{p}</p>")
    return "".join(out)


def write_report(run: "Run", metrics: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` into the run folder (atomically) and return its path."""
    if metrics is None:
        path = run.folder / "metrics.json"
        metrics = runs.read_json(path) if path.is_file() else run.metrics()
    out = run.folder / "report.html"
    runs.atomic_write_text(out, render_report(run, metrics))
    return out
