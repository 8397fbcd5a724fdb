"""Every rule and the student of a study point against three baselines, across seeds (issue 20).

A study (``specialkit study``) reads each rule against the generalist and the compute-matched generalist. This adds
the third control issue 20 asks for, the hard-label student (same start, epochs and learning rate as the student, no
teacher), and the student itself, also against the generalist trained further for the student's whole budget
(``student_matched``, where the runs have it), from the finished runs of one study point (``<study>/<point>/seed-*``): per rule and
baseline, the mean gain across seeds with the two-level bootstrap interval (seeds and test images), Holm's correction
over all the comparisons printed, the across-seed verdict, and in how many seeds McNemar's test alone found a
difference.

    OMP_NUM_THREADS=1 .venv/bin/python bench/study_baselines.py runs/regimes/dataset-glyphs_hard
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialkit import stats  # noqa: E402
from specialkit.pipeline import Run  # noqa: E402

BASELINES = ("generalist", "compute_matched", "hard_label_student")
STUDENT_BASELINES = (*BASELINES, "student_matched")
"""The student is also read against the generalist trained further for its own whole budget (when the runs have it)."""


def correctness(run: Run) -> dict[str, np.ndarray]:
    """Per test image, whether each rule, baseline and the student of ``run`` is right."""
    y = run.dataset().y_test.numpy()
    out = {rule: run.combine(rule, "test").argmax(1) == y for rule in run.config.rules}
    for stage in ("compute_matched", "hard_label_student", "student_matched"):
        if stage != "student_matched" or run.is_done(stage):  # older runs have no student-matched generalist
            out[stage] = run.get(stage).test_probs.argmax(1) == y
    out["student"] = run.get("distill").test_probs.argmax(1) == y
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("point_folder", help="a study point's folder, holding seed-*/ finished runs")
    p.add_argument("--resamples", type=int, default=2000)
    args = p.parse_args(argv)
    folders = sorted(Path(args.point_folder).glob("seed-*"), key=lambda f: int(f.name.split("-")[1]))
    if not folders:
        raise SystemExit(f"no seed-*/ runs in {args.point_folder}: give a study point's folder")
    per_seed = [correctness(Run.open(f, log=lambda s: None)) for f in folders]
    names = [n for n in per_seed[0] if n not in STUDENT_BASELINES]
    rows = []
    for name in names:
        for base in STUDENT_BASELINES if name == "student" else BASELINES:
            if any(base not in c for c in per_seed):
                continue
            diffs = np.stack([c[name].astype(float) - c[base].astype(float) for c in per_seed])
            two = stats.two_level_bootstrap(diffs, resamples=args.resamples, seed=0)
            alone = sum(stats.mcnemar(c[base], c[name]).p_value < stats.ALPHA for c in per_seed)
            rows.append((name, base, two, alone))
    adjusted = stats.holm([r[2].p_value for r in rows])
    print(
        f"{args.point_folder}: {len(per_seed)} seeds; gain in points, two-level bootstrap 95% interval, Holm over "
        f"{len(rows)} comparisons; then the seeds in which McNemar's test alone found a difference"
    )
    print("| rule | baseline | gain [95% CI] | Holm p | verdict | seeds |\n| --- | --- | --- | ---: | --- | ---: |")
    for (name, base, two, alone), p_adj in zip(rows, adjusted):
        verdict = stats.across_seed_verdict(two.lo, two.hi, p_adj, two.seeds)
        print(
            f"| {name} | {base} | {two.mean * 100:+.2f} [{two.lo * 100:+.2f}, {two.hi * 100:+.2f}] | {p_adj:.3g} | "
            f"{verdict} | {alone}/{len(per_seed)} |"
        )


if __name__ == "__main__":
    main()
