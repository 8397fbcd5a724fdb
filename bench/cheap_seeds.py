"""Cheap specialist kinds against whole specialists across seeds (issue 22): is the accuracy really the same?

Takes the finished runs of a study (one folder per seed, whole specialists, e.g. ``specialkit study
configs/study.json``'s ``dataset-glyphs_hard/seed-*``) and, for each seed, trains only the specialists again as
variant runs next to them (the generalist and groups are copied): shared-trunk specialists (dense) and shared-trunk
specialists stored as rank-r deltas, whose learning rate is chosen per seed on the validation images among
``--delta-lrs`` (the test images choose nothing); with ``--small-heads`` also the whole specialists with their heads
collapsed to |S|+1 rows (``specialists.collapsed_probs``: the dustbin row least-squares fitted, or trained on the full
head's probabilities; nothing retrained); with ``--confidence-skip`` also the chosen delta specialists with the
confidence skip (``ensemble.activation``'s ``confident``: no specialist runs for an image whose generalist top-1
probability exceeds it), its value chosen per seed on the validation images by ``frontier.choose_confident`` (the
lowest of ``frontier.CONFIDENTS`` that changes at most 0.1% of the validation answers; no labels read); with
``--max-active n`` also those delta specialists (with that skip) running at most n specialists per image, the ones
whose group holds the most generalist mass (``ensemble.activation``'s ``max_active``); with ``--route-share s``
also the delta specialists routing a share s of the images, a cost budget (the skip set per seed on the validation
images by ``frontier.confident_for_share``, no labels read; with ``--max-active`` when given). Then, on the
test images, every kind's ``kl`` ensemble against the
whole specialists' ``kl``: per seed the difference with its paired-bootstrap interval and McNemar's p; across seeds
the mean difference with the two-level bootstrap interval (seeds and test images), Holm-adjusted over the kinds,
and the across-seed verdict (at least 5 seeds, equivalence within ±0.5 points).

    OMP_NUM_THREADS=1 .venv/bin/python bench/cheap_seeds.py /tmp/study/regimes/dataset-glyphs_hard --out /tmp/cheap
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialkit import ensemble, frontier, runner, specialists, stats  # noqa: E402
from specialkit.pipeline import Run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study_folder", help="a folder holding seed-*/ finished runs with whole specialists")
    p.add_argument("--out", default="runs/cheap_seeds", help="where the variant runs go (reused when finished)")
    p.add_argument("--shared-stages", type=int, default=2)
    p.add_argument("--delta-rank", type=int, default=16)
    p.add_argument("--delta-lrs", type=float, nargs="+", default=[0.02, 0.1, 0.3])
    p.add_argument(
        "--small-heads",
        action="store_true",
        help="also the whole specialists with heads collapsed to |S|+1 rows, the dustbin row fitted (lstsq) or trained",
    )
    p.add_argument(
        "--confidence-skip",
        action="store_true",
        help="also the delta specialists with the confidence skip chosen on the validation images",
    )
    p.add_argument(
        "--max-active",
        type=int,
        default=0,
        help="also the delta specialists (with the chosen confidence skip when --confidence-skip) routing each image "
        "to at most this many specialists, those whose group holds the most generalist mass",
    )
    p.add_argument(
        "--route-share",
        type=float,
        default=None,
        help="also the delta specialists routing at most this share of the images (a cost budget): the confidence "
        "skip set per seed on the validation images by frontier.confident_for_share (no labels read), with "
        "--max-active when given",
    )
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def kl_correct(run: Run, split: str) -> np.ndarray:
    """Per image of ``split``, whether the run's ``kl`` ensemble is right."""
    ds = run.dataset()
    y = (ds.y_val if split == "val" else ds.y_test).numpy()
    return run.combine("kl", split).argmax(1) == y


def small_head_correct(run: Run, fit: str) -> np.ndarray:
    """Per test image, whether ``kl`` is right with every specialist's head collapsed to |S|+1 rows (``fit``)."""
    ds = run.dataset()
    x = ds.split("test")[0]
    outs = [
        ensemble.SpecialistOutputs(g, specialists.collapsed_probs(ds, s, x, fit=fit))
        for g, s in zip(run.groups(), run.specialists())
    ]
    q = ensemble.combine_kl(run.generalist().probs("test"), outs, run.activation("test"))
    return q.argmax(1) == ds.y_test.numpy()


def confidence_skip_correct(run: Run) -> tuple[np.ndarray, dict[str, float], float]:
    """Per test image, whether ``kl`` is right with the confidence skip ``frontier.choose_confident`` picks on the
    validation images; the share of test images routed and specialists per image; the value."""
    groups, c = run.groups(), run.config

    def outs(split: str) -> list[ensemble.SpecialistOutputs]:
        return [ensemble.SpecialistOutputs(g, p) for g, p in zip(groups, run.specialist_probs(split))]

    chosen = frontier.choose_confident(run.generalist().probs("val"), outs("val"), top_n=c.top_n)
    return *capped_correct(run, chosen, 0), chosen


def capped_correct(run: Run, confident: float, max_active: int) -> tuple[np.ndarray, dict[str, float]]:
    """Per test image, whether ``kl`` is right with the confidence skip ``confident`` and at most ``max_active``
    specialists per image (0: no limit); the share of test images routed and specialists per image."""
    groups, c = run.groups(), run.config
    p = run.generalist().probs("test")
    active = ensemble.activation(
        p, groups, top_n=c.top_n, threshold=c.skip_threshold, confident=confident, max_active=max_active
    )
    outs = [ensemble.SpecialistOutputs(g, q) for g, q in zip(groups, run.specialist_probs("test"))]
    q = ensemble.combine_kl(p, outs, active)
    return q.argmax(1) == run.dataset().y_test.numpy(), ensemble.fraction_routed(active)


def _say_routed(folder: Path, what: str, routed: dict[str, float]) -> None:
    print(
        f"  {folder.name}: {what}: {routed['fraction_routed']:.1%} of test images routed, "
        f"{routed['specialists_per_image']:.2f} specialists/image",
        flush=True,
    )


def seed_kinds(base: Run, out: Path, args: argparse.Namespace) -> tuple[dict[str, np.ndarray], float]:
    """Test-image correctness of the whole, dense shared and delta specialists of one seed; the delta's chosen lr."""
    s, r, out_dir = args.shared_stages, args.delta_rank, out
    dense = runner.variant_run(base, out / f"shared{s}", specialist_shared_stages=s)
    tried = []
    for lr in args.delta_lrs:
        extra = {} if lr == base.config.specialist_lr else {"specialist_lr": lr}
        run = runner.variant_run(
            base, out / f"delta{r}-lr{lr:g}", specialist_shared_stages=s, specialist_delta_rank=r, **extra
        )
        tried.append((float(kl_correct(run, "val").mean()), -len(tried), lr, run))
    _, _, lr, delta = max(tried, key=lambda t: t[:2])
    out = {"whole": kl_correct(base, "test"), "dense": kl_correct(dense, "test"), "delta": kl_correct(delta, "test")}
    if args.small_heads:
        out.update({f"small_{fit}": small_head_correct(base, fit) for fit in specialists.HEAD_FITS})
    chosen = 1.0
    if args.confidence_skip:
        out["delta_skip"], routed, chosen = confidence_skip_correct(delta)
        _say_routed(out_dir, f"confidence skip {chosen:g} (chosen on validation)", routed)
    if args.route_share is not None:
        budget = frontier.confident_for_share(delta.generalist().probs("val"), args.route_share)
        out["delta_share"], routed = capped_correct(delta, budget, args.max_active)
        _say_routed(
            out_dir, f"route share {args.route_share:g} (confidence skip {budget:.3f}, set on validation)", routed
        )
    if args.max_active:
        out["delta_max"], routed = capped_correct(delta, chosen, args.max_active)
        _say_routed(out_dir, f"at most {args.max_active} specialist(s) per image", routed)
    return out, lr


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    folders = sorted(Path(args.study_folder).glob("seed-*"), key=lambda p: int(p.name.split("-")[1]))
    if not folders:
        raise SystemExit(f"no seed-*/ runs in {args.study_folder}: run a study first (specialkit study ...)")
    per_seed = []
    for folder in folders:
        base = Run.open(folder, log=lambda s: None)
        correct, lr = seed_kinds(base, Path(args.out) / folder.name, args)
        boot = stats.paired_bootstrap(correct, resamples=base.config.bootstrap_resamples, seed=base.config.seed)
        line = [f"{folder.name}: whole {correct['whole'].mean():.4f}"]
        for kind in [k for k in correct if k != "whole"]:
            lo, hi = boot.gain_ci(kind, "whole")
            mc = stats.mcnemar(correct["whole"], correct[kind])
            d = correct[kind].mean() - correct["whole"].mean()
            line.append(f"{kind} {d * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}] p={mc.p_value:.3g}")
        print("; ".join(line) + f" (delta lr {lr:g}, chosen on validation)", flush=True)
        per_seed.append(correct)
    results = {}
    for kind in [k for k in per_seed[0] if k != "whole"]:
        diffs = np.stack([c[kind].astype(float) - c["whole"].astype(float) for c in per_seed])
        results[kind] = stats.two_level_bootstrap(diffs, resamples=2000, seed=0)
    adjusted = stats.holm([results[k].p_value for k in results])
    label = {
        "dense": f"shared {args.shared_stages} stages, dense",
        "delta": f"shared {args.shared_stages} stages, rank-{args.delta_rank} deltas",
        "small_lstsq": "whole specialists, heads collapsed to |S|+1 rows, dustbin row fitted (lstsq)",
        "small_trained": "whole specialists, heads collapsed to |S|+1 rows, dustbin row trained",
        "delta_skip": f"shared {args.shared_stages} stages, rank-{args.delta_rank} deltas, confidence skip "
        "(chosen on validation)",
        "delta_max": f"shared {args.shared_stages} stages, rank-{args.delta_rank} deltas"
        + (", confidence skip" if args.confidence_skip else "")
        + f", at most {args.max_active} specialist(s) per image",
        "delta_share": f"shared {args.shared_stages} stages, rank-{args.delta_rank} deltas, at most "
        f"{args.route_share} of the images routed (the skip set on validation)"
        + (f", at most {args.max_active} specialist(s) per image" if args.max_active else ""),
    }
    print(f"\nacross {len(per_seed)} seeds, kl against kl with whole specialists (points, two-level bootstrap 95%):")
    for (kind, tl), p_adj in zip(results.items(), adjusted):
        verdict = stats.across_seed_verdict(tl.lo, tl.hi, p_adj, tl.seeds)
        print(
            f"{label[kind]}: {tl.mean * 100:+.2f} [{tl.lo * 100:+.2f}, {tl.hi * 100:+.2f}], Holm p {p_adj:.3g}: {verdict}"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
