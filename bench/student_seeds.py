"""Issue 20 part 2 across seeds: does a distillation recipe beat its hard-label control on every seed of a study point?

Takes the finished runs of one study point (``<study>/<point>/seed-*``) and, for each seed and each recipe
``student_epochs:distill_mixup``, trains only a student and its hard-label control in a variant run next to them (the
generalist, groups, specialists and ensembles are copied from the seed's run, so the teacher is that seed's). Then,
on the test images: per seed the student against its control (paired bootstrap, McNemar); across seeds the mean
difference with the two-level bootstrap interval (seeds and test images), Holm-adjusted over every comparison printed,
and the across-seed verdict (at least 5 seeds, equivalence within ±0.5 points): the student against its control (what
distillation adds), the control against the generalist (what the extra training gives) and the student against the
generalist and the compute-matched generalist.

    OMP_NUM_THREADS=1 .venv/bin/python bench/student_seeds.py runs/regimes/dataset-glyphs_hard --recipes 6:0 6:0.2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialkit import runner, stats  # noqa: E402
from specialkit.pipeline import Run  # noqa: E402

PAIRS = (
    ("student", "control"),
    ("control", "generalist"),
    ("student", "generalist"),
    ("student", "compute_matched"),
)
"""(name, reference) read for each recipe."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("point_folder", help="a study point's folder holding seed-*/ finished runs")
    p.add_argument("--out", default="runs/student_seeds", help="where the variant runs go (reused when finished)")
    p.add_argument("--recipes", nargs="+", default=["6:0", "6:0.2"], help="student_epochs:distill_mixup")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def recipe_correct(base: Run, folder: Path, epochs: int, alpha: float) -> dict[str, np.ndarray]:
    """Per test image, whether the recipe's student, its control, the generalist and the compute-matched generalist
    of one seed are right."""
    run = runner.variant_run(
        base, folder, from_stage="distill", student_epochs=epochs, distill_mixup=alpha, progress=False
    )
    y = base.dataset().y_test.numpy()
    probs = {
        "student": run.distill().test_probs,
        "control": run.hard_label_student().test_probs,
        "generalist": base.generalist().test_probs,
        "compute_matched": base.compute_matched().test_probs,
    }
    return {name: np.asarray(p).argmax(1) == y for name, p in probs.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folders = sorted(Path(args.point_folder).glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    if not folders:
        raise SystemExit(f"no seed-*/ runs in {args.point_folder}: run a study first (specialkit study ...)")
    recipes = [(int(e), float(a)) for e, a in (r.split(":") for r in args.recipes)]
    per_recipe: dict[tuple[int, float], list[dict[str, np.ndarray]]] = {r: [] for r in recipes}
    for folder in folders:
        base = Run.open(folder, log=lambda s: None)
        for epochs, alpha in recipes:
            correct = recipe_correct(base, Path(args.out) / folder.name / f"st{epochs}-mix{alpha:g}", epochs, alpha)
            per_recipe[(epochs, alpha)].append(correct)
            boot = stats.paired_bootstrap(correct, resamples=base.config.bootstrap_resamples, seed=base.config.seed)
            vs = stats.mcnemar(correct["control"], correct["student"])
            lo, hi = boot.gain_ci("student", "control")
            gain = correct["student"].mean() - correct["control"].mean()
            print(
                f"{folder.name} {epochs}:{alpha:g}: student {correct['student'].mean():.4f} control "
                f"{correct['control'].mean():.4f}; student - control {gain * 100:+.2f} [{lo * 100:+.2f}, "
                f"{hi * 100:+.2f}] p={vs.p_value:.3g}",
                flush=True,
            )
    rows = []
    for recipe, seeds in per_recipe.items():
        for name, ref in PAIRS:
            diffs = np.stack([c[name].astype(float) - c[ref].astype(float) for c in seeds])
            two = stats.two_level_bootstrap(diffs, resamples=2000, seed=0)
            alone = sum(stats.mcnemar(c[ref], c[name]).p_value < stats.ALPHA for c in seeds)
            rows.append((recipe, name, ref, two, alone))
    adjusted = stats.holm([r[3].p_value for r in rows])
    print(
        f"\nacross {len(folders)} seeds (points, two-level bootstrap 95%, Holm over {len(rows)}; then the seeds in "
        "which McNemar's test alone found a difference):"
    )
    print("| student_epochs:mixup | comparison | gain [95% CI] | Holm p | verdict | seeds |")
    print("| --- | --- | --- | ---: | --- | ---: |")
    for ((epochs, alpha), name, ref, two, alone), p_adj in zip(rows, adjusted):
        verdict = stats.across_seed_verdict(two.lo, two.hi, p_adj, two.seeds)
        print(
            f"| {epochs}:{alpha:g} | {name} − {ref} | {two.mean * 100:+.2f} [{two.lo * 100:+.2f}, {two.hi * 100:+.2f}]"
            f" | {p_adj:.3g} | {verdict} | {alone}/{len(folders)} |"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
