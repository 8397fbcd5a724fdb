"""The paper's KL combination: batched EM (``ensemble.solve_kl``: EM for all images at once, damped
Newton steps for the few still unconverged after ``--newton-after`` iterations) against per-image
optimisation of the logits (the paper's way, ``ensemble.combine_kl_gradient``) on the same inputs.

Inputs: C classes split into M overlapping groups (a random partition plus a few extra classes
each, about 8-12 classes per group for C = 62, M = 8); a hidden logit vector per image; the
generalist sees it through noise, each specialist through its own (smaller) noise, collapsed onto
its cells. Activation: the generalist's top-n classes (paper n = 1).

Reports images/s of the batched EM (all ``--images``) and of each per-image baseline (first
``--lbfgs-images`` / ``--torch-images`` / ``--gd-images`` of the same images), the speed ratios,
and the objective gap per image (baseline objective minus EM objective: positive = EM better).
Rates use wall time and, because the machine may be shared, also process CPU time; everything
runs on one BLAS thread by default (``--blas-threads``).

    .venv/bin/python bench/combine.py               # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--classes", type=int, default=62, help="C")
    p.add_argument("--specialists", type=int, default=8, help="M overlapping groups")
    p.add_argument(
        "--extra",
        type=int,
        nargs=2,
        default=[1, 4],
        metavar=("MIN", "MAX"),
        help="extra classes added to each group of the partition (overlap)",
    )
    p.add_argument("--images", type=int, default=2000, help="images for the batched EM")
    p.add_argument("--lbfgs-images", type=int, default=100, help="images for scipy L-BFGS-B per image (0 = skip)")
    p.add_argument("--torch-images", type=int, default=20, help="images for torch LBFGS per image (0 = skip)")
    p.add_argument("--gd-images", type=int, default=5, help="images for plain gradient descent per image (0 = skip)")
    p.add_argument("--gd-steps", type=int, default=20_000, help="step cap of plain gradient descent")
    p.add_argument("--top-n", type=int, default=1, help="generalist classes that activate specialists")
    p.add_argument("--tol", type=float, default=1e-10, help="EM tolerance (change of q and gap bound)")
    p.add_argument(
        "--newton-after", type=int, default=200, help="EM iterations before Newton steps (< 0: plain EM only)"
    )
    p.add_argument(
        "--baseline-tol",
        type=float,
        default=1e-6,
        help="gradient tolerance of the per-image baselines "
        "(1e-6 is the loosest that reaches objective gaps <= 1e-6 here)",
    )
    p.add_argument(
        "--noise",
        type=float,
        nargs=2,
        default=[2.0, 1.5],
        metavar=("GEN", "SPEC"),
        help="logit noise of the generalist and of the specialists",
    )
    p.add_argument("--scale", type=float, default=3.0, help="std of the hidden logits")
    p.add_argument("--repeats", type=int, default=3, help="timed EM passes (best)")
    p.add_argument("--blas-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_inputs(args, np, ensemble):  # noqa: ANN001, ANN201 - numpy imported after the thread settings
    rng = np.random.default_rng(args.seed)
    c, m = args.classes, args.specialists
    perm = rng.permutation(c)
    groups = []
    for k in range(m):
        base = perm[k::m]
        others = np.setdiff1d(np.arange(c), base)
        extra = rng.choice(others, size=int(rng.integers(args.extra[0], args.extra[1] + 1)), replace=False)
        groups.append(np.sort(np.concatenate([base, extra])))

    def softmax(z):  # noqa: ANN001, ANN202
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    hidden = rng.normal(scale=args.scale, size=(args.images, c))
    p_gen = softmax(hidden + rng.normal(scale=args.noise[0], size=hidden.shape))
    specs = [
        ensemble.SpecialistOutputs(
            g, ensemble.collapse(softmax(hidden + rng.normal(scale=args.noise[1], size=hidden.shape)), g)
        )
        for g in groups
    ]
    return p_gen, specs, groups


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.blas_threads)
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from specialkit import ensemble

    p_gen, specs, groups = make_inputs(args, np, ensemble)
    active = ensemble.activation(p_gen, groups, top_n=args.top_n)
    n_act = active.sum(axis=1)
    print(
        f"C={args.classes} M={args.specialists} group sizes {[len(g) for g in groups]} top_n={args.top_n} "
        f"N={args.images}; images by number of active specialists: "
        f"{dict(enumerate(np.bincount(n_act).tolist()))}"
    )

    newton_after = None if args.newton_after < 0 else args.newton_after

    def timed(**options):  # noqa: ANN003, ANN202
        best_wall, best_cpu = np.inf, np.inf
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            sol = ensemble.solve_kl(p_gen, specs, active, tol=args.tol, **options)
            best_wall, best_cpu = min(best_wall, time.perf_counter() - w0), min(best_cpu, time.process_time() - c0)
        return sol, args.images / best_wall, args.images / best_cpu

    if newton_after is not None:
        plain, rate, cpu_rate = timed(newton_after=None)
        print(
            f"plain EM (no Newton phase): {rate:,.0f} images/s wall, {cpu_rate:,.0f} images/s CPU; iterations max "
            f"{plain.iterations.max()}; all converged: {bool(plain.converged.all())}"
        )
    sol, em_rate, em_cpu_rate = timed(newton_after=newton_after)
    f_em = ensemble.kl_objective(sol.q, p_gen, specs, active)
    its = sol.iterations[n_act > 0]
    print(
        f"EM batched (tol {args.tol:g}, Newton after {newton_after}): {em_rate:,.0f} images/s wall, "
        f"{em_cpu_rate:,.0f} images/s CPU; iterations mean {its.mean():.1f}, median {np.median(its):.0f}, "
        f"max {its.max()}; all converged: {bool(sol.converged.all())}; largest gap estimate {sol.gap.max():.1e}"
    )
    for a in np.unique(n_act[n_act > 0]):
        print(
            f"    |A|={a}: {int((n_act == a).sum())} images, EM iterations mean {sol.iterations[n_act == a].mean():.1f}, "
            f"max {sol.iterations[n_act == a].max()}"
        )
    hard = np.flatnonzero(n_act >= 2)
    if hard.size:
        hard_specs = [ensemble.SpecialistOutputs(s.classes, s.probs[hard]) for s in specs]
        w0 = time.perf_counter()
        ensemble.solve_kl(p_gen[hard], hard_specs, active[hard], tol=args.tol, newton_after=newton_after)
        print(
            f"    EM on the {hard.size} images with |A| >= 2 alone (one active specialist has a one-step "
            f"closed form): {hard.size / (time.perf_counter() - w0):,.0f} images/s wall"
        )

    baselines = [
        ("scipy L-BFGS-B per image", "lbfgs", args.lbfgs_images, {"tol": args.baseline_tol}),
        ("torch LBFGS per image", "torch-lbfgs", args.torch_images, {"tol": args.baseline_tol}),
        (
            "plain gradient descent per image",
            "gd",
            args.gd_images,
            {"tol": args.baseline_tol, "max_iter": args.gd_steps},
        ),
    ]
    if args.torch_images:
        import torch

        torch.set_num_threads(args.blas_threads)
    for label, method, n, options in baselines:
        if n <= 0:
            continue
        n = min(n, args.images)
        sub = [ensemble.SpecialistOutputs(s.classes, s.probs[:n]) for s in specs]
        ensemble.combine_kl_gradient(
            p_gen[:1],
            [ensemble.SpecialistOutputs(s.classes, s.probs[:1]) for s in specs],
            active[:1],
            method=method,
            **options,
        )  # warm-up: imports
        w0, c0 = time.perf_counter(), time.process_time()
        q = ensemble.combine_kl_gradient(p_gen[:n], sub, active[:n], method=method, **options)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        gap = ensemble.kl_objective(q, p_gen[:n], sub, active[:n]) - f_em[:n]
        rate, cpu_rate = n / wall, n / cpu
        print(
            f"{label} ({method}, tol {options['tol']:g}, {n} images): {rate:,.1f} images/s wall, "
            f"{cpu_rate:,.1f} images/s CPU; EM is {em_rate / rate:,.0f}x faster (wall), "
            f"{em_cpu_rate / cpu_rate:,.0f}x (CPU)"
        )
        print(
            f"    objective gap baseline - EM: max {gap.max():.2e}, min {gap.min():.2e}, max |gap| {np.abs(gap).max():.2e}; "
            f"max |q_baseline - q_EM| {np.abs(q - sol.q[:n]).max():.1e}; "
            "target (>= 100x and max |gap| <= 1e-6): "
            f"{'met' if em_rate / rate >= 100 and np.abs(gap).max() <= 1e-6 else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
