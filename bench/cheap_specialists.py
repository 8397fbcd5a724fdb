"""Accuracy of cheaper specialists (issue 22): small heads and the skip threshold, against whole-head specialists.

Trains (or reuses) one run with shared-trunk specialists (``--shared-stages``), then, on its test images and without
training anything more:

* ``kl, small heads``: every specialist's C-row head collapsed to |S|+1 rows (``specialists.collapse_head``, the
  dustbin row fitted on the validation images; the dustbin correction the full head was given is kept), combined with
  the paper's rule, against ``kl, full heads`` (the run's own specialists): accuracy, 95% paired-bootstrap intervals,
  the difference with its interval, McNemar's exact p and the verdict;
* the skip-threshold curve (``frontier.threshold_curve``): accuracy against the fraction of images routed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cheap_specialists.py --folder /tmp/cheap_run   # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialkit import ensemble, frontier, models, pipeline, specialists, stats, training  # noqa: E402
from specialkit.config import PipelineConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", default="runs/cheap_specialists", help="the run's folder (reused when finished)")
    p.add_argument("--dataset", default="glyphs_hard")
    p.add_argument("--preset", default="quick", help="tiny | quick | demo")
    p.add_argument("--shared-stages", type=int, default=2)
    p.add_argument("--thresholds", type=float, nargs="+", default=list(frontier.THRESHOLDS))
    p.add_argument("--delta-rank", type=int, default=8, help="rank of the low-rank delta specialists (0: skip them)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def collapsed_probs(ds: object, trained: specialists.TrainedSpecialist, x: torch.Tensor) -> np.ndarray:
    """:func:`specialkit.specialists.collapsed_probs` with the least-squares dustbin row."""
    return specialists.collapsed_probs(ds, trained, x)


def small_head_probs(run: pipeline.Run, split: str) -> list[np.ndarray]:
    """Per specialist of ``run``, its probabilities on ``split`` with the head collapsed (:func:`collapsed_probs`)."""
    ds = run.dataset()
    return [collapsed_probs(ds, s, ds.split(split)[0]) for s in run.specialists()]


def delta_probs(run: pipeline.Run, rank: int, split: str) -> tuple[list[np.ndarray], list[np.ndarray], float, float]:
    """Per specialist, probabilities on ``split`` of a specialist trained as rank-``rank`` deltas (the run's recipe and
    seeds otherwise), then the same with its head collapsed (:func:`collapsed_probs`); and the stored parameters of
    each kind over the generalist's (the generalist counted once)."""
    ds, gen = run.dataset(), run.generalist().model.cpu().eval()
    cfg = dataclasses.replace(specialists.run_config(run), delta_rank=rank)
    x = ds.split(split)[0]
    dense, small, params, params_small = [], [], 0, 0
    for index, classes in enumerate(run.groups()):
        training.seed_everything(cfg.train.seed + index)
        trained = specialists.train_specialist(ds, classes, config=cfg, generalist=gen, desc=f"delta {index}")
        dense.append(specialists.predict_specialist(trained.model, x, shift=trained.dustbin_shift, device="cpu"))
        small.append(collapsed_probs(ds, trained, x))
        params += models.count_parameters(trained.model)
        head = trained.model.head
        params_small += models.count_parameters(trained.model) - (head.linear.out_features - len(classes) - 1) * (
            head.in_features + 1
        )
    n = models.count_parameters(gen)
    return dense, small, 1 + params / n, 1 + params_small / n


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = PipelineConfig.preset(
        args.preset,
        name=Path(args.folder).name,
        dataset=args.dataset,
        specialist_shared_stages=args.shared_stages,
        compute_matched=False,
        rules=("generalist", "kl"),
        latency=False,
        html_report=False,
        progress=False,
        device="cpu",
    )
    if (Path(args.folder) / "config.json").is_file():  # reuse a finished run as it is (its own settings are printed)
        run = pipeline.Run.open(args.folder, log=lambda s: None)
    else:
        run = pipeline.Run(args.folder, cfg, log=lambda s: None)
    cfg = run.config
    run.specialists()
    ds = run.dataset()
    y = ds.y_test.numpy()
    p_gen = run.generalist().probs("test")
    groups = run.groups()
    active = run.activation("test")
    full = [ensemble.SpecialistOutputs(g, p) for g, p in zip(groups, run.specialist_probs("test"))]
    small = [ensemble.SpecialistOutputs(g, p) for g, p in zip(groups, small_head_probs(run, "test"))]
    correct = {
        "generalist": p_gen.argmax(1) == y,
        "kl, full heads": ensemble.combine_kl(p_gen, full, active).argmax(1) == y,
        "kl, small heads": ensemble.combine_kl(p_gen, small, active).argmax(1) == y,
    }
    delta_ratio = None
    if args.delta_rank:
        dense_d, small_d, delta_ratio, delta_small_ratio = delta_probs(run, args.delta_rank, "test")
        for name, probs in (
            (f"kl, rank-{args.delta_rank} deltas", dense_d),
            (f"kl, rank-{args.delta_rank} + small", small_d),
        ):
            outs = [ensemble.SpecialistOutputs(g, p) for g, p in zip(groups, probs)]
            correct[name] = ensemble.combine_kl(p_gen, outs, active).argmax(1) == y
    boot = stats.paired_bootstrap(correct, resamples=cfg.bootstrap_resamples, seed=cfg.seed)
    sp = run.specialists()
    gen_params = models.count_parameters(run.generalist().model)
    full_params = sum(models.count_parameters(s.model) for s in sp)
    small_params = full_params - sum(
        (specialists.head_rows(s.model) - len(s.classes) - 1) * (s.model.head.in_features + 1) for s in sp
    )
    print(
        f"{cfg.dataset}, per_class {cfg.per_class}, epochs {cfg.epochs}/{cfg.specialist_epochs}, k={len(groups)}, "
        f"shared stages {cfg.specialist_shared_stages}; "
        f"{len(y)} test images; {args.threads} thread(s)"
    )
    print(
        f"params stored / generalist: full heads {1 + full_params / gen_params:.3f}x, "
        f"small heads {1 + small_params / gen_params:.3f}x"
    )
    for name, c in correct.items():
        lo, hi = boot.top1_ci(name)
        print(f"{name:18s} top-1 {c.mean():.4f} [{lo:.4f}, {hi:.4f}]")
    if delta_ratio is not None:
        print(
            f"params stored / generalist: rank-{args.delta_rank} deltas {delta_ratio:.3f}x, "
            f"with small heads {delta_small_ratio:.3f}x"
        )
    for name in [n for n in correct if n not in ("generalist", "kl, full heads")]:
        ci = boot.gain_ci(name, "kl, full heads")
        mc = stats.mcnemar(correct["kl, full heads"], correct[name])
        diff = correct[name].mean() - correct["kl, full heads"].mean()
        print(
            f"{name} - full heads: {diff:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}], McNemar fixed {mc.fixed} broken "
            f"{mc.broken} p={mc.p_value:.3g}: {stats.verdict(ci, mc.p_value)}"
        )
    dust_full = np.concatenate([o.probs[:, -1] for o in full])
    dust_small = np.concatenate([o.probs[:, -1] for o in small])
    print(f"dustbin probability, small vs full heads: mean |difference| {np.abs(dust_small - dust_full).mean():.4f}")
    print("\nskip threshold (kl, full heads): accuracy vs fraction of test images routed, each against t = 0")
    curve = frontier.threshold_curve(
        p_gen, full, y, tuple(args.thresholds), resamples=cfg.bootstrap_resamples, seed=cfg.seed
    )
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
