"""Issue 20 part 2: can distillation itself pay? Student recipes against their hard-label controls on one run.

Each variant ``(student_epochs, distill_mixup)`` of a finished run trains only its student and its control (the
generalist, specialists and ensembles are the run's own); each is read against its control, the generalist and the
compute-matched generalist on the same test images (paired bootstrap, McNemar). One JSON line per variant is
printed and appended to ``--out``.

    python bench/student_recipes.py /tmp/st/demo --variants 6:0 6:0.2 18:0.2 --out /tmp/st/recipes.jsonl
    python bench/student_recipes.py /tmp/st/demo --out /tmp/st/recipes.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from specialkit import stats
from specialkit.pipeline import Run


def _paired(boot: stats.Bootstrap, correct: dict[str, np.ndarray], name: str, reference: str) -> dict[str, Any]:
    """``name`` minus ``reference``: the gain, its paired-bootstrap interval, McNemar's p and the verdict."""
    test = stats.mcnemar(correct[reference], correct[name])
    ci = boot.gain_ci(name, reference)
    return {
        "gain": float(correct[name].mean() - correct[reference].mean()),
        "ci": list(ci),
        "p": test.p_value,
        "fixed": test.fixed,
        "broken": test.broken,
        "verdict": stats.verdict(ci, test.p_value),
    }


def measure(run: Run) -> dict[str, Any]:
    """The student and its control of ``run`` (trained here when missing) against each other and the baselines.

    Args:
        run: a run whose generalist, specialists, compute-matched generalist and ensembles are finished.

    Returns:
        Top-1 with 95% intervals and the paired comparisons, as a JSON-able dict.
    """
    y = run.dataset().y_test.numpy()
    started = time.perf_counter()
    trained = {s: not run.is_done(s) for s in ("distill", "hard_label_student")}
    probs = {
        "student": run.distill().test_probs,
        "control": run.hard_label_student().test_probs,
        "generalist": run.generalist().test_probs,
        "compute_matched": run.compute_matched().test_probs,
    }
    seconds = time.perf_counter() - started
    correct = {name: np.asarray(p).argmax(axis=1) == y for name, p in probs.items()}
    boot = stats.paired_bootstrap(correct, resamples=run.config.bootstrap_resamples, seed=run.config.seed)
    return {
        "student_epochs": run.config.student_epochs,
        "distill_mixup": run.config.distill_mixup,
        "n_test": int(len(y)),
        "top1": {name: float(c.mean()) for name, c in correct.items()},
        "top1_ci": {name: list(boot.top1_ci(name)) for name in correct},
        "student_vs_control": _paired(boot, correct, "student", "control"),
        "student_vs_generalist": _paired(boot, correct, "student", "generalist"),
        "student_vs_compute_matched": _paired(boot, correct, "student", "compute_matched"),
        "control_vs_generalist": _paired(boot, correct, "control", "generalist"),
        "trained_here": trained,
        "seconds": round(seconds, 1),
        "keys": {s: run.key(s) for s in ("distill", "hard_label_student")},
    }


def _pts(d: dict[str, Any]) -> str:
    """A paired comparison in points: gain [interval], p, verdict."""
    lo, hi = d["ci"]
    return f"{100 * d['gain']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}], p {d['p']:.2g}: {d['verdict']}"


def _top1(row: dict[str, Any], name: str) -> str:
    lo, hi = row["top1_ci"][name]
    return f"{100 * row['top1'][name]:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}]"


def table(rows: list[dict[str, Any]]) -> str:
    """The variants as a markdown table (top-1 with 95% intervals; differences in points with McNemar's p).

    Args:
        rows: what :func:`measure` returned, one per variant.

    Returns:
        The table, one line per variant.
    """
    lines = [
        "| student_epochs | distill_mixup | student | control | student − control | student − generalist"
        " | student − compute-matched |",
        "| ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['student_epochs']} | {r['distill_mixup']:g} | {_top1(r, 'student')} | {_top1(r, 'control')}"
            f" | {_pts(r['student_vs_control'])} | {_pts(r['student_vs_generalist'])}"
            f" | {_pts(r['student_vs_compute_matched'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure each variant in turn (one process, the run's folder reused: a variant's stages move the last aside)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run's folder (a copy: its student stages are retrained)")
    ap.add_argument("--variants", nargs="+", default=["6:0", "6:0.2", "18:0.2"], help="student_epochs:distill_mixup")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines file, one line per variant (appended)")
    ap.add_argument("--table", action="store_true", help="print --out as a markdown table and train nothing")
    args = ap.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]))
        return
    base = Run.open(args.run, log=print)
    for variant in args.variants:
        epochs, alpha = variant.split(":")
        run = base.with_settings(student_epochs=int(epochs), distill_mixup=float(alpha), progress=False)
        row = measure(run)
        line = json.dumps(row)
        print(line, flush=True)
        with args.out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
