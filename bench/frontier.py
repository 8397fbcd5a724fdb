"""The accuracy-versus-cost frontier (issue 12): does a bigger generalist beat generalist + specialists at equal cost?

Trains (or reuses, every stage is cached in ``--folder``) a base run (generalist, whole specialists, compute-matched
generalist, student), generalists of other ``--widths`` each given the base run's total training FLOPs (generalist +
specialists), and the same ensemble with shared-trunk specialists, with shared-trunk specialists stored as rank-r deltas
on the generalist's later stages (``--delta-rank``) and with smaller ones; then measures every point
(``specialkit.frontier.measure_points``: accuracy with its 95% paired-bootstrap interval, parameters stored, FLOPs,
latency at batch 1 and 256, best of repeats, one thread) and writes ``frontier.json`` into the base run (the report
and notebook 05 show it) and ``frontier.html`` (the figure) into ``--folder``.

    .venv/bin/python bench/frontier.py --quick                       # smoke check, about a minute
    .venv/bin/python bench/frontier.py --dataset glyphs_hard         # the note's table (demo settings otherwise)
    .venv/bin/python bench/frontier.py --dataset glyphs_hard --widths 16 --small-init   # specialist kinds only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from specialkit import frontier, plots, runner, runs  # noqa: E402
from specialkit.config import PipelineConfig, parse_overrides  # noqa: E402
from specialkit.metrics import finite  # noqa: E402
from specialkit.pipeline import Run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny settings: a smoke check of the whole bench, numbers meaningless"
    )
    p.add_argument("--dataset", default="glyphs", help="dataset of every run")
    p.add_argument("--folder", default="runs/frontier", help="folder of the runs (cached: a rerun only measures)")
    p.add_argument(
        "--widths", type=int, nargs="+", default=None, help="other generalist widths (default: half, 1.5x, 2x the base)"
    )
    p.add_argument(
        "--shared-stages", type=int, default=None, help="stages the shared specialists share (default: depth - 1)"
    )
    p.add_argument(
        "--small-width", type=int, default=None, help="width of the smaller specialists (default: half the base)"
    )
    p.add_argument(
        "--small-init",
        nargs="*",
        default=["scratch", "distill"],
        choices=["scratch", "distill"],
        help="smaller specialists to add (none: give the flag alone)",
    )
    p.add_argument(
        "--delta-rank",
        type=int,
        default=16,
        help="add shared-trunk specialists stored as rank-r deltas on the generalist's later stages (0: none)",
    )
    p.add_argument(
        "--delta-lrs",
        type=float,
        nargs="+",
        default=[0.02, 0.1, 0.3],
        help="learning rates tried for the delta specialists; the one whose ensemble is most accurate on the "
        "validation images is kept (the test images choose nothing)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed passes per latency (the best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and timing")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="other settings of the base run, e.g. per_class=100"
    )
    return p.parse_args(argv)


def base_config(args: argparse.Namespace) -> PipelineConfig:
    extra = parse_overrides(args.set, source="--set")
    if args.quick:
        cfg = PipelineConfig.quick(
            name="base",
            dataset=args.dataset,
            per_class=6,
            epochs=1,
            specialist_epochs=1,
            student_epochs=1,
            k=2,
            width=4,
            depth=2,
            bootstrap_resamples=1000,
        )
    else:
        cfg = PipelineConfig(name="base", dataset=args.dataset, progress=False)
    return cfg.replace(**extra)


def delta_variant(base: Run, folder: Path, rank: int, shared: int, lrs: list[float]) -> tuple[float, Run]:
    """The delta-specialist variant of ``base`` at each learning rate of ``lrs``; returns the one whose ``kl`` ensemble
    is most accurate on the validation images (ties: the first), and its learning rate. Each is printed."""
    y_val = base.dataset().y_val.numpy()
    tried = []
    for lr in lrs:
        settings = dict(specialist_shared_stages=shared, specialist_delta_rank=rank)
        if lr != base.config.specialist_lr:
            settings["specialist_lr"] = lr
        run = runner.variant_run(base, folder / f"delta{rank}-shared{shared}-lr{lr:g}", **settings)
        acc = float((run.combine("kl", "val").argmax(1) == y_val).mean())
        print(f"rank-{rank} deltas, specialist_lr {lr:g}: kl on the validation images {acc:.4f}")
        tried.append((acc, -len(tried), lr, run))
    acc, _, lr, run = max(tried, key=lambda t: t[:2])
    print(f"kept specialist_lr {lr:g} (best on validation)")
    return lr, run


def markdown(df) -> str:
    """A markdown table of ``df`` (numbers to 4 significant digits)."""

    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + " --- |" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    folder = Path(args.folder) / ("quick" if args.quick else args.dataset)
    cfg = base_config(args)
    base = Run(folder / "base", cfg, overwrite=True, log=print)
    base.run_all()
    w = cfg.width
    widths = args.widths or ([2 * w] if args.quick else [w // 2, 3 * w // 2, 2 * w])
    s = cfg.depth - 1 if args.shared_stages is None else args.shared_stages
    small = args.small_width or max(1, w // 2)
    width_runs = {v: runner.width_run(base, v, folder / f"width{v}") for v in widths if v != w}
    variants = {
        f"shared trunk ({s} of {cfg.depth} stages)": runner.variant_run(
            base, folder / f"shared{s}", specialist_shared_stages=s
        )
    }
    if args.delta_rank:
        lr, delta = delta_variant(base, folder, args.delta_rank, s, args.delta_lrs)
        variants[f"rank-{args.delta_rank} deltas (shared {s} of {cfg.depth} stages, lr {lr:g})"] = delta
    for init in args.small_init:
        variants[f"width-{small} specialists ({init})"] = runner.variant_run(
            base, folder / f"small{small}-{init}", specialist_width=small, specialist_init=init
        )
    print(
        f"training done in {time.perf_counter() - t0:.0f} s; measuring ({args.threads} thread(s), best of {args.repeats})"
    )
    table = frontier.measure_points(base, widths=width_runs, variants=variants, repeats=args.repeats)
    saved = {
        "points": table.to_dict("records"),
        "budget_flops": frontier.budget_flops(base.view()),
        "settings": cfg.to_dict(),
        "threads": args.threads,
    }
    runs.atomic_write_json(base.folder / frontier.FILE, finite(saved))
    plots.frontier(table).write_html(folder / "frontier.html", include_plotlyjs="cdn")
    shown = table.assign(
        accuracy=table["accuracy"] * 100,
        lo=table["lo"] * 100,
        hi=table["hi"] * 100,
        delta=table["delta"] * 100,
        delta_lo=table["delta_lo"] * 100,
        delta_hi=table["delta_hi"] * 100,
        train_gflops=table["train_flops"] / 1e9,
    ).drop(columns="train_flops")
    print(
        f"\nbase: {cfg.dataset}, {cfg.model} width {w} depth {cfg.depth}, {cfg.epochs} epochs, k={cfg.k}, per_class={cfg.per_class}; "
        f"budget {frontier.budget_flops(base.view()):.3g} training FLOPs; load average {os.getloadavg()[0]:.2f}"
    )
    print(markdown(shown))
    print(
        f"\nwrote {base.folder / frontier.FILE} and {folder / 'frontier.html'}; total {time.perf_counter() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
