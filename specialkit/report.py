"""The self-contained HTML report (``report.html``): renders ``metrics.json`` and the run's arrays.

Nothing here computes a new number or trains a model (that is :mod:`specialkit.metrics`); a run
whose stages are not finished is a ``metrics.MissingStageError`` naming the stage.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from . import clusters, dataset, evaluation, frontier, plots, runs, stages, stats, store
from .metrics import NOT_RULES, compute_metrics, cost_points, dustbin_effect, require
from .view import RunView, view_of

__all__ = [
    "write_report",
    "render_report",
    "reading",
    "seeds_reading",
    "render_seeds_report",
    "write_seeds_report",
    "comparison_frame",
    "table4_frame",
    "convergence_reading",
    "fit_reading",
    "study_reading",
    "study_table",
    "render_study_report",
    "write_study_report",
]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.2f}%"


def _ci(ci: list[float] | None, *, points: bool = False) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "[n/a]"
    if points:
        return f"[{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"
    return f"[{ci[0] * 100:.2f}, {ci[1] * 100:.2f}]%"


def _pval(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-4 else "< 1e-4")


_WORDS = {
    "better": "significantly better than",
    "worse": "significantly worse than",
    "indistinguishable": "indistinguishable from",
}


def _versus(row: dict[str, Any], baseline: str) -> str:
    """'+0.21 points [−0.10, +0.52], McNemar p = 0.3 (7 fixed, 2 broken): indistinguishable from the generalist'."""
    if baseline == "generalist":
        gain, ci, p, word = (
            row["delta_top1"],
            row["gain_vs_generalist_ci"],
            row["p_vs_generalist"],
            row.get("vs_generalist"),
        )
        counts = f" ({row['fixed']} fixed, {row['broken']} broken)"
        who = "the generalist"
    else:
        gain, ci, p, word = (
            row["gain_vs_compute_matched"],
            row["gain_vs_compute_matched_ci"],
            row["p_vs_compute_matched"],
            row.get("vs_compute_matched"),
        )
        counts, who = "", "the compute-matched generalist"
    return f"{gain * 100:+.2f} points {_ci(ci, points=True)}, McNemar p = {_pval(p)}{counts}: {_WORDS.get(word or '', 'compared with')} {who}"


def reading(metrics: dict[str, Any]) -> str:
    """A written reading of a run's numbers (markdown), generated from ``metrics`` — never typed by hand.

    Every accuracy comes with its 95% paired-bootstrap interval, every difference with its interval and
    McNemar's exact p-value, and a difference whose interval holds 0 (or whose p >= 0.05) is called
    indistinguishable, never a gain.
    """
    rows = {r["name"]: r for r in metrics["comparison"]}
    gen = rows["generalist"]
    ds = metrics["dataset"]
    lines = [
        f"On **{ds['name']}** ({ds['num_classes']} classes, {ds['test']} test images) the generalist reaches "
        f"**{_pct(gen['top1'])}** test top-1 {_ci(gen['top1_ci'])} (95% paired-bootstrap intervals throughout)."
    ]
    rules = [n for n in rows if n not in NOT_RULES]
    for name in rules:
        r = rows[name]
        line = f"`{name}`: **{_pct(r['top1'])}** {_ci(r['top1_ci'])}; {_versus(r, 'generalist')}"
        if r.get("p_vs_compute_matched") is not None:
            line += f"; {_versus(r, 'compute_matched')}"
        lines.append(line + ".")
    if "compute_matched" in rows:
        cm = rows["compute_matched"]
        budget = metrics.get("compute_matched", {}).get("budget", {})
        how = (
            f" ({budget['compute_matched_passes']:,} extra example-passes, matched by {budget['match']})"
            if budget
            else ""
        )
        lines.append(
            f"Given the specialists' extra training compute{how}, the generalist alone reaches **{_pct(cm['top1'])}** "
            f"{_ci(cm['top1_ci'])}: {_versus(cm, 'generalist')}."
        )
        better_cm = [n for n in rules if rows[n].get("vs_compute_matched") == "worse"]
        beat_cm = [n for n in rules if rows[n].get("vs_compute_matched") == "better"]
        if beat_cm:
            lines.append(
                f"**Specialists pay off here:** {', '.join(f'`{n}`' for n in beat_cm)} beat the compute-matched generalist significantly."
            )
        elif better_cm:
            lines.append(
                f"**The compute-matched generalist is significantly better** than {', '.join(f'`{n}`' for n in better_cm)}: "
                f"here the extra compute is worth more as more generalist training than as specialists."
            )
        else:
            lines.append(
                "**No rule is distinguishable from the compute-matched generalist:** on this run the specialists' gain, "
                "if any, is not more than the same extra training of the generalist gives."
            )
    t4 = [r for r in metrics["table4"].get("kl", []) if r["covered_by"] != "total"]
    if t4:
        parts = []
        for r in t4:
            rel = "n/a" if r["relative_gain"] is None else f"{r['relative_gain'] * 100:+.1f}%"
            tail = " — too few to read" if r["too_small"] else ""
            parts.append(
                f"{r['covered_by']}: {r['delta_correct']:+d} of {r['n_examples']} ({rel} relative {_ci(r['relative_gain_ci'])}{tail})"
            )
        lines.append(
            "By the number of specialists covering the true class (`kl`, change in correct answers): "
            + "; ".join(parts)
            + "."
        )
    if metrics["clusters"].get("all_covered"):
        lines.append(
            "Every class is covered by some specialist, so the paper's conditional accuracy (Table 3) equals top-1 here; "
            "the within-group accuracy in the table restricts each prediction to the groups covering the true class."
        )
    f = metrics["cost"]["flops"]
    if f is not None:
        lines.append(
            f"Cost: the ensemble needs {f['conditional_ratio']:.2f}× the generalist's FLOPs per image with conditional "
            f"execution ({f['mean_active']:.2f} specialists per image) and {f['all_ratio']:.2f}× running every specialist; "
            f"it holds {f['params_ratio']:.1f}× the parameters."
        )
    for stage, why in metrics.get("skipped", {}).items():
        lines.append(f"No {stage.replace('_', '-')} result: {why}.")
    if "student" in rows:
        st = metrics["student"]
        line = (
            f"The distilled student, one model of {st['params']:,} parameters, reaches **{_pct(rows['student']['top1'])}** "
            f"{_ci(rows['student']['top1_ci'])}; {_versus(rows['student'], 'generalist')}"
        )
        if st.get("kl_gain_significant") and st.get("share_of_kl_gain") is not None:
            line += (
                f"; it keeps {st['share_of_kl_gain'] * 100:.0f}% {_ci(st.get('share_of_kl_gain_ci'))} of `kl`'s gain"
            )
        elif "share_of_kl_gain_ci" in st:
            line += "; `kl`'s own gain is not significant, so the share of it the student keeps is not read"
        lines.append(line + ".")
        if st.get("vs_hard_label"):
            lines.append(control_reading(st))
    if metrics.get("convergence"):
        lines.append(convergence_reading(metrics["convergence"]))
    if metrics.get("specialist_fit"):
        lines.append(fit_reading(metrics["specialist_fit"]))
    return "\n\n".join(lines)


def convergence_reading(conv: dict[str, Any]) -> str:
    """One paragraph: was the generalist still improving (``metrics.convergence``), and what the comparison then measures."""
    if conv.get("verdict") == "unknown":
        return "**Convergence:** the generalist's history holds no validation accuracy, so whether it had converged is not known."
    accs = ", ".join(f"{a * 100:.2f}" for a in conv["val_acc"])
    first, last = conv["last_epochs"][0], conv["last_epochs"][-1]
    text = f"**Convergence:** validation top-1 over epochs {first}–{last}: {accs}%"
    if conv.get("val_rise") is not None:
        text += (
            f" (last epoch against the best before it: {conv['val_rise'] * 100:+.2f} points; "
            f"noise ±{conv['val_noise'] * 100:.2f})"
        )
    if conv.get("compute_matched_gain") is not None:
        text += (
            f"; the compute-matched generalist gained {conv['compute_matched_gain'] * 100:+.2f} points "
            f"{_ci(conv['compute_matched_gain_ci'], points=True)} (p = {_pval(conv['compute_matched_p'])}) from the extra training"
        )
        if conv.get("best_rule"):
            text += (
                f", the best rule (`{conv['best_rule']}`) {conv['best_rule_gain'] * 100:+.2f} points "
                f"{_ci(conv['best_rule_gain_ci'], points=True)}"
            )
    text += ". "
    if conv["still_improving"]:
        why = []
        if conv["val_still_rising"]:
            why.append("its validation accuracy was still rising beyond the noise")
        if conv.get("compute_matched_verdict") == "better":
            why.append("more training alone made it significantly better")
        text += (
            "**The generalist was still improving** ("
            + " and ".join(why)
            + "): a gain over the generalist here partly "
            "measures an unfinished generalist; read the comparison with the compute-matched generalist, or train it longer."
        )
    else:
        text += "No sign the generalist was still improving: its last epochs and the extra training changed it by no more than the noise."
    return text


def fit_reading(fit: list[dict[str, Any]]) -> str:
    """One paragraph on overfitting (``metrics.specialist_fit``): the specialists' own-class accuracy, train against validation."""
    rows = [r for r in fit if r.get("gap") is not None]
    if not rows:
        return ""
    gaps = [r["gap"] for r in rows]
    worst = max(rows, key=lambda r: r["gap"])
    mean_train = sum(r["train_acc"] for r in rows) / len(rows)
    mean_val = sum(r["val_acc"] for r in rows) / len(rows)
    return (
        f"**Overfitting:** on their own classes' images the specialists reach {mean_train * 100:.1f}% on training images and "
        f"{mean_val * 100:.1f}% on validation images (mean gap {sum(gaps) / len(gaps) * 100:+.1f} points; largest "
        f"{worst['gap'] * 100:+.1f} for `{worst['group']}`), trained with soft-target weight {rows[0]['soft_weight']:g} "
        "(a study over `specialist_soft_weight` compares with and without the generalist's soft targets)."
    )


def seeds_reading(summary: dict[str, Any]) -> str:
    """The between-seed reading (markdown) of :func:`metrics.aggregate_seeds`' table."""
    seeds = summary["seeds"]
    lines = [
        f"Across {len(seeds)} seeds ({', '.join(map(str, seeds))}; same data and test images, different training randomness):"
    ]
    for r in summary["rows"]:
        if r["metric"] == "top1":
            sd = "" if r["std"] is None else f" ± {r['std'] * 100:.2f}"
            vals = ", ".join(f"{v * 100:.2f}" for v in r["values"].values())
            lines.append(f"- `{r['name']}` top-1 {r['mean'] * 100:.2f}{sd}% (each seed: {vals})")
    for r in summary["rows"]:
        if r["metric"] in ("delta_top1", "gain_vs_compute_matched") and r["name"] not in (
            "generalist",
            "compute_matched",
        ):
            who = "the generalist" if r["metric"] == "delta_top1" else "the compute-matched generalist"
            sd = "" if r["std"] is None else f" ± {r['std'] * 100:.2f}"
            lines.append(f"- `{r['name']}` vs {who}: {r['mean'] * 100:+.2f}{sd} points")
    return "\n".join(lines)


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
            df[col] = df[col].map(
                lambda v: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * 100:.2f}%"
            )
        elif pd.api.types.is_float_dtype(df[col]):
            df[col] = df[col].map(
                lambda v: "" if not math.isfinite(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"
            )
    return df.to_html(border=0, escape=True)


def _section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>' + "\n".join(parts) + "</section>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _figures(run: RunView, metrics: dict[str, Any], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the report, by name (pure plots.* calls on the run's arrays)."""
    ds, cs, spec = run.dataset(), run.confusion(), run.clusters()
    gen, q = run.generalist(), run.ensembles()["kl"] if "kl" in run.config.rules else None
    y = ds.y_test.numpy()
    order = clusters.order_classes(spec)
    x, lab = dataset.examples_per_class(ds, per_class=1)
    figs: dict[str, Any] = {
        "samples": plots.sample_grid(
            x, lab.numpy(), ds.class_names, ncols=min(31, ds.num_classes), title="one training image per class"
        ),
        "confusion": plots.confusion_heatmap(
            cs.F,
            cs.class_names,
            order=order,
            groups=spec.indices(),
            group_names=list(spec.groups),
            hide_diagonal=True,
            title="validation confusion, reordered by group (diagonal hidden)",
        ),
        "covariance": plots.covariance_heatmap(cs.covariance, cs.class_names, order=order, groups=spec.indices()),
        "class_map": plots.class_map(
            run.class_map(), cs.class_names, group_labels=clusters.group_labels(spec), group_names=list(spec.groups)
        ),
        "specialist_curves": plots.specialist_curves({g: s.history for g, s in zip(spec.groups, run.specialists())}),
        "accuracy": plots.accuracy_bars(
            {r["name"]: r["top1"] for r in metrics["comparison"]},
            baseline="generalist",
            title="test top-1 with 95% paired-bootstrap intervals",
            intervals={r["name"]: r["top1_ci"] for r in metrics["comparison"]},
        ),
    }
    if gen.history:  # a generalist brought with generalist_from was not trained here
        figs["generalist_curves"] = plots.training_curves({"generalist": gen.history})
    if metrics["cost"]["flops"] is not None:
        figs["cost"] = plots.accuracy_vs_cost(cost_points(metrics), cost_label="MFLOPs per image")
    if metrics["cost"].get("summary"):
        table, source = frontier.points_of(run.folder, metrics)
        figs["frontier"] = plots.frontier(table, title=f"Accuracy against inference cost: {source}")
    if q is not None:
        t4 = pd.DataFrame(metrics["table4"]["kl"])
        figs["table4"] = plots.table4_chart(t4[t4["covered_by"] != "total"].rename(columns={"covered_by": "coverage"}))
        change = evaluation.per_class_change(gen.test_probs, q, y)
        figs["per_class"] = plots.per_class_change(
            change["delta"].to_numpy(), ds.class_names, order=order, coverage=spec.coverage()
        )
        figs["fixed_broken"] = plots.fixed_broken_grid(
            ds.x_test, y, gen.test_probs.argmax(1), q.argmax(1), ds.class_names
        )
    for key in manifest["keys"] if manifest else ():  # the study this run belongs to, if any
        figs[f"study:{key}"] = plots.study_gains(
            manifest["summary"], key, title=f"study {manifest.get('name', '')}: gain against {key}"
        )
    if metrics.get("student"):
        figs["student_curves"] = plots.training_curves(
            {**({"generalist": gen.history} if gen.history else {}), "student": run.distill().history}
        )
    return figs


def control_reading(student: dict[str, Any]) -> str:
    """Which effect carries the student's gain: the hard-label control (same start, epochs and learning rate, no
    teacher) against the generalist measures the extra training; the student against the control, distillation."""
    vs, ctl = student["vs_hard_label"], student["hard_label_vs_generalist"]

    def gap(d: dict[str, Any]) -> str:
        return f"{d['gain'] * 100:+.2f} points {_ci(d['ci'], points=True)}, McNemar p = {_pval(d['p'])} ({d['fixed']} fixed, {d['broken']} broken)"

    words = {"better": "better than", "worse": "worse than", "indistinguishable": "indistinguishable from"}
    text = (
        f"**The student against its hard-label control** (the same start, epochs and learning rate on the hard labels "
        f"alone): the control is {words[ctl['verdict']]} the generalist ({gap(ctl)}): that is what the extra training "
        f"alone gives; the student is {words[vs['verdict']]} the control ({gap(vs)}): that is what distillation adds."
    )
    if vs["verdict"] != "better":
        text += (
            " So the ensemble's soft targets add nothing detectable here: any gain of the student over the generalist "
            "is the extra training's, not distillation's."
        )
    sm = student.get("vs_student_matched")
    if sm:
        text += (
            f" Against the generalist trained further for the student's whole budget (the specialists' training, the "
            f"teacher's forward passes and the student's own passes) the student is {words[sm['verdict']]} it "
            f"({gap(sm)}): "
            + (
                "the specialists and distillation beat spending the same compute on the generalist."
                if sm["verdict"] == "better"
                else "the same compute spent on the generalist does as well."
                if sm["verdict"] != "worse"
                else "the same compute spent on the generalist does better."
            )
        )
    return text


def comparison_frame(metrics: dict[str, Any]) -> pd.DataFrame:
    """The comparison as a readable table: every accuracy with its interval, every difference with its
    interval, McNemar's p and the verdict (strings, for display)."""
    out = []
    for r in metrics["comparison"]:
        row = {"model / rule": r["name"], "top-1 [95% CI]": f"{_pct(r['top1'])} {_ci(r['top1_ci'])}"}
        row["vs generalist, points [CI]"] = (
            ""
            if r["name"] == "generalist"
            else f"{r['delta_top1'] * 100:+.2f} {_ci(r['gain_vs_generalist_ci'], points=True)}"
        )
        row["p (McNemar)"] = "" if r["p_vs_generalist"] is None else _pval(r["p_vs_generalist"])
        row["fixed / broken"] = "" if r["name"] == "generalist" else f"{r['fixed']} / {r['broken']}"
        row["reading"] = r.get("vs_generalist") or ""
        row["vs compute-matched, points [CI]"] = (
            ""
            if r.get("gain_vs_compute_matched") is None
            else f"{r['gain_vs_compute_matched'] * 100:+.2f} {_ci(r['gain_vs_compute_matched_ci'], points=True)}"
        )
        row["p vs compute-matched"] = "" if r.get("p_vs_compute_matched") is None else _pval(r["p_vs_compute_matched"])
        row["reading vs compute-matched"] = r.get("vs_compute_matched") or ""
        row["conditional acc. (paper's Table 3)"] = _pct(r.get("conditional_acc"))
        row["within-group acc."] = _pct(r.get("within_group_acc"))
        row["NLL (nats)"] = "" if r.get("nll") is None else f"{r['nll']:.3f}"
        row["ECE"] = "" if r.get("ece") is None else f"{r['ece'] * 100:.2f}%"
        out.append(row)
    return pd.DataFrame(out).set_index("model / rule")


def table4_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The paper's Table 4 for display: counts, change, relative gain with its interval, small rows marked."""
    out = []
    for r in rows:
        rel = "n/a" if r["relative_gain"] is None else f"{r['relative_gain'] * 100:+.2f}%"
        out.append(
            {
                "specialists covering the true class": r["covered_by"],
                "test examples": r["n_examples"],
                "Δ correct": r["delta_correct"],
                "relative gain [95% CI]": f"{rel} {_ci(r['relative_gain_ci'])}",
                "note": "too few examples to read" if r["too_small"] else "",
            }
        )
    return pd.DataFrame(out).set_index("specialists covering the true class")


def _cost_summary(metrics: dict[str, Any]) -> str:
    """The cost of every configuration (``metrics["cost"]["summary"]``) with a one-line heading."""
    rows = metrics["cost"].get("summary")
    if not rows:
        return ""
    s = rows[1].get("shared_stages", 0)
    how = (
        f"the specialists share the generalist's first {s} stage(s), run once per image and stored once"
        if s
        else "every specialist is a whole network"
    )
    return _p(
        f"Cost of inference per configuration ({how}); latency measured at batch 1 and 256, peak memory of the "
        f"tensors alive at once over one batch of 256 test images. Every network runs as trained, in PyTorch's "
        f"default memory layout, on both sides: a like-for-like comparison, not each side at its fastest. On a CPU "
        f"the layout alone can change the generalist's batch-256 latency about threefold, and the ratio with it. "
        f"The times are one build's, the median of a few passes, with no interval: two builds of the same networks "
        f"can differ by more than their passes do (up to 15% on a 2-core CPU). bench/inference_cost.py times each "
        f"side in its fastest layout, with intervals over rounds and fresh builds."
    ) + _table(pd.DataFrame(rows).set_index("model"))


study_of = store.study_of


def _study_section(manifest: dict[str, Any] | None, frags: dict[str, str]) -> str:
    """Section 10: the study this run is a point of (:func:`study_of`), with its figure per swept key; empty when there is none."""
    names = [n for n in frags if n.startswith("study:")]
    if manifest is None or not names:
        return ""
    text = (
        f"This run is one point of the study `{manifest.get('name', '')}` (swept: {', '.join(manifest['keys'])}); "
        "each figure shows the gain over the generalist and over the compute-matched generalist across the study's "
        "points, mean across seeds with its 95% interval. The study's own page is report.html in its folder."
    )
    return _section("study", "10 · The study this run belongs to", _p(text), *(frags[n] for n in names))


def render_report(run: RunView, metrics: dict[str, Any]) -> str:
    """The report as one self-contained HTML page (plotly.js embedded once; works offline).
    Trains nothing: a stage that is not finished is a ``MissingStageError`` naming it."""
    run = view_of(run)
    require(run, *stages.through("ensembles"), *(() if run.skip_reason("distill") else ("distill",)))
    manifest = study_of(run.folder)
    figs = _figures(run, metrics, manifest)
    names = list(figs)
    frags = dict(zip(names, plots.figures_to_html_fragment([figs[n] for n in names], include_plotlyjs=True)))
    cfg, ds = run.config, metrics["dataset"]
    comparison = comparison_frame(metrics)
    t4 = table4_frame(metrics["table4"]["kl"]) if metrics["table4"].get("kl") else pd.DataFrame()
    corr = metrics.get("dustbin_corrections", {})
    corr_table = pd.DataFrame(corr.get("per_specialist", []))
    init = pd.DataFrame(metrics.get("init_check", []))
    budget = metrics.get("compute_matched", {}).get("budget")
    budget_text = (
        (
            f"Specialists used {budget['specialist_passes']:,} example-passes ({budget['specialist_train_flops']:.3g} training FLOPs, "
            f"forward and backward as run, a shared trunk forward only, the generalist's forward where it teaches); the compute-matched generalist was trained {budget['compute_matched_passes']:,} further "
            f"example-passes ({budget['compute_matched_train_flops']:.3g} FLOPs), matched by {budget['match']}."
        )
        if budget
        else ""
    )
    student = metrics["student"] or {}
    kept = ""
    if student.get("share_of_kl_gain_ci") is not None:
        kept = (
            f" It keeps {student['share_of_kl_gain'] * 100:.0f}% {_ci(student['share_of_kl_gain_ci'])} of kl's gain over the generalist."
            if student.get("kl_gain_significant") and student.get("share_of_kl_gain") is not None
            else " kl's own gain over the generalist is not significant, so the share the student keeps is not read."
        )
    if student.get("vs_hard_label"):
        kept += " " + control_reading(student).replace("**", "")
    quality = pd.DataFrame([metrics["clusters"]["quality"]])
    groups = pd.DataFrame(
        [{"group": g, "classes": " ".join(c), "size": len(c)} for g, c in metrics["clusters"]["groups"].items()]
    ).set_index("group")
    flops = pd.Series(
        metrics["cost"]["flops"] or {"flops": "not counted: a predictions-only generalist has no model"}
    ).to_frame("value")
    latency_df = pd.DataFrame(metrics["cost"].get("latency", []))
    timings = pd.Series(metrics["timings"]).to_frame("seconds")
    sections = [
        _section(
            "summary",
            "Summary",
            f'<div class="reading">{_markdown(reading(metrics))}</div>',
            _table(comparison),
            _p(budget_text),
        ),
        _section(
            "data",
            "1 · The data",
            _p(
                f"{ds['name']}: {ds['num_classes']} classes; train {ds['train']}, validation {ds['val']} (drives the clusters), test {ds['test']} (final numbers only)."
            ),
            frags["samples"],
        ),
        _section(
            "generalist",
            "2 · The generalist",
            _p(
                (
                    f"{cfg.model} (width {cfg.width}, depth {cfg.depth}), {metrics['generalist']['params']:,} parameters, {cfg.epochs} epochs"
                    if not cfg.generalist_from
                    else f"brought from {cfg.generalist_from} (generalist_from; not trained by the kit)"
                )
                + f": validation top-1 {metrics['generalist']['val_top1']:.2%}, test top-1 {metrics['generalist']['test_top1']:.2%}."
            ),
            frags.get("generalist_curves", ""),
            _p(_strip_md(convergence_reading(metrics["convergence"]))) if metrics.get("convergence") else "",
        ),
        _section(
            "confusion",
            "3 · The confusion structure",
            _p(
                "Rows are true classes; classes are reordered so that each group's classes sit together. Confusions concentrate inside the outlined blocks."
            ),
            frags["confusion"],
            frags["covariance"],
            frags["class_map"],
            "<h3>Most confused pairs (validation)</h3>",
            _table(pd.DataFrame(metrics["top_confused_pairs"])),
        ),
        _section(
            "clusters",
            "4 · The groups",
            _p("Warning: " + metrics["clusters"]["coverage_warning"])
            if metrics["clusters"].get("coverage_warning")
            else "",
            _p(
                f"Method {cfg.method} ({cfg.distance} distance), k = {cfg.k}, overlap {cfg.overlap}. in_group_error_share is the share of the generalist's validation errors whose two classes share a group."
            ),
            _table(groups),
            _table(quality),
            "<h3>Every method at the same k</h3>",
            _p(
                "One giant group keeps most errors inside groups but leaves that specialist as hard a job as the generalist's: read the share together with size_max."
            ),
            _table(pd.DataFrame(metrics["clusters"]["methods"]).set_index("spec")),
        ),
        _section(
            "specialists",
            "5 · The specialists",
            _p(
                f"Each specialist: its classes plus a dustbin, initialised from the generalist (its full head kept, the dustbin logit the log-sum-exp of the other classes' logits, so it starts as the generalist exactly), trained on {cfg.special_fraction:.0%} special / {1 - cfg.special_fraction:.0%} other examples, dustbin logit shifted by the '{cfg.dustbin_correction}' correction. train_acc/val_acc of the last epoch show overfitting."
            ),
            _table(
                pd.DataFrame(metrics["specialists"]).set_index("group"),
                percent=("test_acc_own_classes", "test_acc_all", "train_acc", "val_acc"),
            ),
            "<h3>Overfitting: own classes, training against validation images</h3>",
            _p(
                fit_reading(metrics.get("specialist_fit", []))
                or "not computed for this run (rerun `specialkit report`)"
            ),
            _table(pd.DataFrame(metrics["specialist_fit"]).set_index("group"), percent=("train_acc", "val_acc", "gap"))
            if metrics.get("specialist_fit")
            else "",
            frags["specialist_curves"],
            "<h3>Initialisation check (validation)</h3>",
            _p(
                "Mean |specialist dustbin probability − generalist mass outside the group| for a freshly initialised specialist: the kit's head against the one-row head (mean of the other rows) it replaced."
            ),
            _table(init.set_index("group"))
            if len(init)
            else _p("specialists trained from scratch: no initialisation to check."),
            "<h3>What the dustbin correction does (validation)</h3>",
            _table(
                dustbin_effect(run),
                percent=("true_dustbin_share", "dustbin_share_uncorrected", "dustbin_share_corrected"),
            ),
            "<h3>Every correction on validation images</h3>",
            _p(
                "kl's validation top-1 with each correction applied to every specialist: "
                + ", ".join(f"{k} {v:.2%}" for k, v in corr.get("kl_top1", {}).items())
                + f" (best: {corr.get('best')}; this run uses {corr.get('used')})."
            ),
            _table(corr_table.set_index(["group", "correction"]), percent=("true_dustbin_share", "dustbin_share"))
            if len(corr_table)
            else "",
        ),
        _section(
            "comparison",
            "6 · Generalist against the ensembles",
            frags["accuracy"],
            "<h3>Gain by the number of specialists covering the true class (the paper's Table 4, rule kl)</h3>",
            _table(t4) if len(t4) else "",
            frags.get("table4", ""),
            frags.get("per_class", ""),
            frags.get("fixed_broken", ""),
        ),
        _section(
            "cost",
            "7 · Cost",
            _cost_summary(metrics),
            frags.get("frontier", ""),
            _table(flops),
            _table(latency_df) if len(latency_df) else "",
            frags.get("cost", ""),
        ),
        _section(
            "student",
            "8 · Distilling the ensemble into one model",
            _p(
                f"A student of the generalist's architecture trained on the kl ensemble's q at T = {cfg.distill_temperature} (soft weight {cfg.distill_soft_weight}) (computed on the same augmented batch the student sees) plus hard labels: test top-1 {student['test_top1']:.2%}, {student['params']:,} parameters.{kept}"
                if student
                else f"No student: {metrics.get('skipped', {}).get('distill')}."
            ),
            frags.get("student_curves", ""),
        ),
        _section(
            "timings",
            "9 · Wall time per stage",
            _table(timings),
            f'<p class="muted">settings: <code>{html.escape(json.dumps(cfg.to_dict()))}</code></p>',
        ),
        _study_section(manifest, frags),
    ]
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("summary", "Summary"),
            ("data", "Data"),
            ("generalist", "Generalist"),
            ("confusion", "Confusions"),
            ("clusters", "Groups"),
            ("specialists", "Specialists"),
            ("comparison", "Comparison"),
            ("cost", "Cost"),
            ("student", "Student"),
        ]
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specialkit · {html.escape(cfg.name)}</title>"
        f"<style>{_CSS}</style></head><body><h1>specialkit report · {html.escape(cfg.name)}</h1>"
        f"<p class='muted'>Specialist ensembles after Hinton, Vinyals &amp; Dean (2015), §5–6. Every number on this page is computed by the kit from the run folder.</p>"
        f"<nav>{nav}</nav>{''.join(sections)}</body></html>"
    )


def render_seeds_report(summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> str:
    """The multi-seed page: the between-seed table (mean, sd, every seed) and each seed's intervals."""
    agg = summary["seeds"]
    table = pd.DataFrame(
        [
            {
                "model / rule": r["name"],
                "metric": r["metric"],
                "mean": f"{r['mean'] * 100:.2f}",
                "sd": "" if r["std"] is None else f"{r['std'] * 100:.2f}",
                **{f"seed {k}": f"{v * 100:.2f}" for k, v in r["values"].items()},
            }
            for r in agg["rows"]
        ]
    )
    per = pd.concat(
        {
            f"seed {s}": comparison_frame(m)[
                [
                    "top-1 [95% CI]",
                    "vs generalist, points [CI]",
                    "p (McNemar)",
                    "vs compute-matched, points [CI]",
                    "p vs compute-matched",
                ]
            ]
            for s, m in per_seed.items()
        }
    )
    links = "".join(f'<li><a href="seed-{s}/report.html">seed {s}</a></li>' for s in per_seed)
    body = _section(
        "seeds",
        "Between seeds",
        _p(
            "Values in percent (top-1) or percentage points (gains); sd is the sample standard deviation across seeds: the between-seed half of the uncertainty."
        ),
        f'<div class="reading">{_markdown(seeds_reading(agg))}</div>',
        _table(table.set_index(["model / rule", "metric"])),
    ) + _section(
        "per-seed", "Each seed, with its paired intervals on the test images", _table(per), f"<ul>{links}</ul>"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specialkit · {html.escape(summary['run'])} · seeds</title>"
        f"<style>{_CSS}</style></head><body><h1>specialkit · {html.escape(summary['run'])} · {len(per_seed)} seeds</h1>{body}</body></html>"
    )


def write_seeds_report(parent: Path, summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> Path:
    """Write the multi-seed ``report.html`` into ``parent`` (atomically) and return its path."""
    out = parent / "report.html"
    runs.atomic_write_text(out, render_seeds_report(summary, per_seed))
    return out


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


def write_report(run: RunView, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``report.html`` into the run folder (atomically) and return its path (``metrics``: default the run's
    ``metrics.json``, else computed and written; the run is read through a view, so nothing trains)."""
    run = view_of(run)
    if metrics is None:
        path = run.folder / "metrics.json"
        if path.is_file():
            metrics = runs.read_json(path)
        else:
            metrics = compute_metrics(run, measure_latency=run.config.latency)
            runs.atomic_write_json(path, metrics)
    out = run.folder / "report.html"
    runs.atomic_write_text(out, render_report(run, metrics))
    return out


def _strip_md(text: str) -> str:
    return text.replace("**", "").replace("`", "")


# ---------------------------------------------------------------------- studies
_RULE_WORDS = {
    "better": "significantly better than",
    "worse": "significantly worse than",
    "indistinguishable": "indistinguishable from",
    "equivalent": "equivalent (within the tie margin) to",
    "too few seeds": "not judged (too few seeds) against",
}


def study_reading(
    manifest: dict[str, Any], *, rules: tuple[str, ...] = ("kl", "kl_calibrated", "top_confident", "moe")
) -> str:
    """The study's reading (markdown), per swept key and point: for each rule, its mean gain over the generalist
    and over the compute-matched generalist across seeds with the 95% interval, the verdict of that interval
    and in how many seeds the paired test on the test images found it better or worse."""
    summary = manifest["summary"]
    keys = manifest["keys"]
    seeds = manifest["definition"]["seeds"]
    kinds = sorted({r.get("interval", "student t") for r in summary}) or ["two-level bootstrap"]
    margin = next((r.get("tie_margin") for r in summary if r.get("tie_margin") is not None), stats.TIE_MARGIN)
    lines = [
        f"Study `{manifest.get('name', '')}`: {len(manifest['rows'])} runs ({len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
        f"per point; swept: {', '.join(f'`{k}`' for k in keys)}). Each gain is the mean across seeds with its 95% interval "
        f"({' / '.join(kinds)}: the two-level bootstrap resamples seeds and test images together, so it holds the test-set "
        f"noise every seed shares); a verdict needs at least {stats.MIN_SEEDS} seeds and a p-value that survives Holm's "
        f"correction over the study's {len(summary)} comparisons; an interval inside ±{margin * 100:.2g} points reads "
        "'equivalent'. In brackets, the seeds in which McNemar's paired test on the test images found the rule significantly "
        "better / worse."
    ]
    points: dict[str, list[dict[str, Any]]] = {}
    for r in summary:
        points.setdefault(", ".join(f"{k}={r[k]}" for k in keys), []).append(r)
    any_better_cm = False
    for label, group in points.items():
        parts = []
        for rule in rules:
            for base, who in (("generalist", "the generalist"), ("compute_matched", "the compute-matched generalist")):
                r = next((x for x in group if x["rule"] == rule and x["baseline"] == base), None)
                if r is None:
                    continue
                any_better_cm |= base == "compute_matched" and r["verdict"] == "better"
                parts.append(
                    f"`{rule}` {_RULE_WORDS[r['verdict']]} {who} ({r['mean'] * 100:+.2f} points {_ci([r['lo'], r['hi']], points=True)}; "
                    f"{r['seeds_better']}/{r['seeds']} better, {r['seeds_worse']}/{r['seeds']} worse)"
                )
        gen = next((x for x in group if x["baseline"] == "generalist"), None)
        head = f"**{label}** (generalist {gen['baseline_top1'] * 100:.2f}%)" if gen else f"**{label}**"
        lines.append(head + ": " + "; ".join(parts) + ".")
    weak = [
        r
        for r in summary
        if r["rule"] in rules
        and (r["verdict"] == "better" and r["seeds_better"] == 0 or r["verdict"] == "worse" and r["seeds_worse"] == 0)
    ]
    if weak:
        shown = "; ".join(
            f"`{r['rule']}` vs {r['baseline'].replace('_', '-')} at {', '.join(f'{k}={r[k]}' for k in keys)}"
            for r in weak
        )
        lines.append(
            f"**Weak evidence:** {shown}: significant across seeds but in none of the seeds' own paired tests; "
            f"with {len(seeds)} seeds the spread is estimated from {len(seeds)} values, so more seeds should confirm it."
        )
    improving = [r for r in manifest["rows"] if r.get("generalist_still_improving")]
    if improving:
        lines.append(
            f"**Convergence:** in {len(improving)} of {len(manifest['rows'])} runs the generalist was still improving "
            "(see each run's report): there a gain over the generalist partly measures an unfinished generalist."
        )
    if len(seeds) < stats.MIN_SEEDS:
        lines.append(
            f"**Answer:** too few seeds ({len(seeds)} < {stats.MIN_SEEDS}) for an across-seed verdict; read each seed's own "
            "paired test above, and rerun the study with more seeds (`--seeds 0 1 2 3 4`) to judge across seeds."
        )
        return "\n\n".join(lines)
    lines.append(
        "**Answer:** "
        + (
            "in at least one tested regime a rule beats the compute-matched generalist significantly across seeds."
            if any_better_cm
            else "in no tested regime does a rule beat the compute-matched generalist significantly across seeds."
        )
    )
    return "\n\n".join(lines)


def study_table(
    manifest: dict[str, Any], *, rules: tuple[str, ...] = ("kl", "kl_calibrated", "moe", "top_confident")
) -> pd.DataFrame:
    """Every point x seed for display: generalist, compute-matched and each rule's top-1 with its interval."""
    out = []
    for r in manifest["rows"]:
        row = {k: r[k] for k in manifest["keys"]}
        row["seed"] = r["seed"]
        for name in ("generalist", "compute_matched", *rules):
            if f"{name}_top1" in r:
                row[name] = f"{r[f'{name}_top1'] * 100:.2f}% {_ci([r[f'{name}_top1_lo'], r[f'{name}_top1_hi']])}"
        out.append(row)
    return pd.DataFrame(out)


def render_study_report(manifest: dict[str, Any]) -> str:
    """The study's page: the reading, a figure per swept key, the summary and every run's row (trains nothing)."""
    keys = manifest["keys"]
    figs = [
        plots.study_gains(manifest["summary"], k, title=f"gain against {k} (mean across seeds, 95% interval)")
        for k in keys
    ]
    frags = plots.figures_to_html_fragment(figs, include_plotlyjs=True)
    summary = pd.DataFrame(manifest["summary"])
    for col in ("mean", "lo", "hi"):
        summary[col] = summary[col].map(lambda v: "" if v is None else f"{v * 100:+.2f}")
    links = "".join(
        f'<li><a href="{html.escape(r["run"])}/report.html">{html.escape(r["run"])}</a></li>' for r in manifest["rows"]
    )
    name = html.escape(str(manifest.get("name", "")))
    body = (
        _section("reading", "Reading", f'<div class="reading">{_markdown(study_reading(manifest))}</div>', *frags)
        + _section(
            "table", "Every point and seed (test top-1, 95% paired-bootstrap interval)", _table(study_table(manifest))
        )
        + _section(
            "summary", "Gains across seeds (points)", _table(summary.drop(columns=["rule_top1", "baseline_top1"]))
        )
        + _section(
            "runs",
            "Run reports",
            f"<ul>{links}</ul>",
            f'<p class="muted">definition: <code>{html.escape(json.dumps(manifest["definition"]))}</code></p>',
        )
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>specialkit · study {name}</title>"
        f"<style>{_CSS}</style></head><body><h1>specialkit · study {name}</h1>{body}</body></html>"
    )


def write_study_report(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write the study's ``report.html`` into ``folder`` (atomically) and return its path."""
    out = Path(folder) / "report.html"
    runs.atomic_write_text(out, render_study_report(manifest))
    return out
