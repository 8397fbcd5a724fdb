"""Can one call run several specialists' convolutions on their own rows faster than one call each? (issue 22)

At batch 256 the routed rows split into M small batches, one per specialist, and every specialist convolution is a
call of its own. This bench times, for each convolution shape of a specialist, on the same rows:

* ``separate``: M oneDNN convolutions (channels-last), each on its specialist's rows, then ReLU; what
  ``inference.RoutedEnsemble`` does;
* ``grouped_mm``: one im2col of all the rows (9 shifted slices, channels-last) and one
  ``torch.nn.functional.grouped_mm`` with each specialist's weights on its rows, bias and ReLU: one call for M
  weight sets;
* ``packed``: the M convolutions through oneDNN's prepacked convolution with the ReLU fused
  (``torch.ops.mkldnn._convolution_pointwise``, what ``torch.compile`` emits on a CPU), where this build has it;
* ``one_conv``: one convolution with one set of weights on all the rows: no execution of M weight sets can be
  cheaper (the floor any fused kernel aims at).

Each path is checked against ``separate`` (the same outputs to float rounding) before it is timed. The paths are
timed interleaved over ``--rounds`` rounds; each line prints the median microseconds per call and every path's
ratio to ``separate`` (the median of per-round ratios). The default row counts are a batch of 256 glyphs_hard test
images with the confidence skip 0.7 and at most one specialist per image (89 rows routed).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fused_kernels.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/fused_kernels.py --rows 9 14 2 5 4 7 4 3    # route share 0.15
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ((16, 32, 8), (32, 32, 8), (32, 64, 4), (64, 64, 4))
"""(in channels, out channels, side) of the convolutions a specialist sharing 1 of 3 stages runs (width 16, 16 px)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[20, 15, 8, 12, 10, 9, 8, 7], help="rows per specialist")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds (interleaved)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rounds < 2 or any(r < 1 for r in args.rows) or len(args.rows) < 2:
        p.error("need --rounds >= 2 and at least two specialists with at least one row each (--rows)")
    return args


def im2col(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, 9*C) patches of a 3x3 convolution with padding 1, (kh, kw, c) order."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    return torch.cat([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], dim=3).reshape(
        n * h * w, 9 * c
    )


def paths(
    x: torch.Tensor, counts: list[int], convs: list[torch.nn.Conv2d]
) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """name -> a callable giving each specialist's (rows, out, H, W) output on its rows of ``x``."""
    starts = np.cumsum([0, *counts]).tolist()
    parts = [x[starts[m] : starts[m + 1]] for m in range(len(counts))]
    n, c_in, h, w = x.shape
    c_out = convs[0].out_channels
    weights = torch.stack([cv.weight.detach().permute(2, 3, 1, 0).reshape(9 * c_in, c_out) for cv in convs])
    biases = torch.stack([cv.bias.detach() for cv in convs])
    of_row = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    offsets = torch.cumsum(torch.tensor(counts) * h * w, 0).to(torch.int32)

    def separate() -> list[torch.Tensor]:
        return [torch.relu_(cv(part)) for cv, part in zip(convs, parts)]

    def grouped() -> list[torch.Tensor]:
        out = F.grouped_mm(im2col(x), weights.contiguous(), offs=offsets).view(n, h * w, c_out)
        out.add_(biases.index_select(0, of_row).unsqueeze(1)).relu_()
        out = out.view(n, h, w, c_out).permute(0, 3, 1, 2)
        return [out[starts[m] : starts[m + 1]] for m in range(len(counts))]

    def one_conv() -> list[torch.Tensor]:
        return [torch.relu_(convs[0](x))]

    out = {"separate": separate, "grouped_mm": grouped, "one_conv": one_conv}
    pointwise = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    reorder = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
    if pointwise is not None and reorder is not None and torch.backends.mkldnn.is_available() and not x.is_cuda:
        packed_w = [
            reorder(cv.weight.detach(), [1, 1], [1, 1], [1, 1], 1, list(p.shape)) for cv, p in zip(convs, parts)
        ]

        def packed() -> list[torch.Tensor]:
            return [
                pointwise(p, pw, cv.bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
                for p, pw, cv in zip(parts, packed_w, convs)
            ]

        out["packed"] = packed
    return out


def time_paths(fns: dict[str, Callable[[], list[torch.Tensor]]], rounds: int) -> dict[str, np.ndarray]:
    """name -> (rounds,) seconds per call, every round timing each path once, in turn (after one untimed round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return {name: np.asarray(v) for name, v in times.items()}


def main(argv: list[str] | None = None) -> dict[tuple[int, int, int], dict[str, float]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n = sum(args.rows)
    print(
        f"{len(args.rows)} specialists, rows {args.rows} ({n} in all), {args.threads} thread(s), {args.rounds} rounds"
    )
    results = {}
    with torch.no_grad():
        for c_in, c_out, side in SHAPES:
            x = torch.randn(n, c_in, side, side).contiguous(memory_format=torch.channels_last)
            convs = [
                torch.nn.Conv2d(c_in, c_out, 3, padding=1).eval().to(memory_format=torch.channels_last)
                for _ in args.rows
            ]
            fns = paths(x, args.rows, convs)
            ref = fns["separate"]()
            for name in ("grouped_mm", "packed"):
                if name in fns:
                    for got, want in zip(fns[name](), ref):
                        torch.testing.assert_close(got.contiguous(), want.contiguous(), rtol=1e-4, atol=1e-4)
            t = time_paths(fns, args.rounds)
            ratios = {name: float(np.median(v / t["separate"])) for name, v in t.items()}
            results[(c_in, c_out, side)] = ratios
            print(
                f"{c_in:>3}->{c_out:<3} {side}x{side}: "
                + " | ".join(f"{name} {np.median(v) * 1e6:.0f} us ({ratios[name]:.2f}x)" for name, v in t.items())
            )
    print("ratios are each path's time over separate's (median of per-round ratios); below 1 is faster")
    return results


if __name__ == "__main__":
    main()
