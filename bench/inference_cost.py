"""Inference cost of a specialist ensemble, as ratios to the generalist alone.

Builds a generalist (``cnn`` on 1x32x32 images, 62 classes, as for ``glyphs``) and M specialists of
about C/M classes each, five kinds: with the generalist's architecture (initialised from it, as in the paper:
"full"); sharing the generalist's first ``--shared-stages`` stages (the trunk runs once per image, each specialist
only its own later stages: "dense"); shared, with each head collapsed from C to |S|+1 rows
(``specialists.collapse_head``, dustbin row fitted on 256 images: "smallhead"); shared, with the later stages stored
as rank-``--delta-rank`` deltas on the generalist's (``models.low_rank_delta``: "delta"); and smaller
(``--small-width``/``--small-depth``, from scratch: "scratch"). Per image it reports:

* FLOPs (counted; a shared trunk once) and parameters stored, of the generalist, of the ensemble running
  every specialist, and with conditional execution (only the specialists that the routing activates);
* measured latency at batch 1 and batch 256 of the generalist alone and of the ensemble, all specialists
  vs conditional execution, for the networks alone (``nets``: generalist, routing, the active
  specialists) and with each combination rule (``kl`` = the paper's, ``top_confident`` = option (a),
  ``moe`` = option (b) with HD-CNN style skipping);
* for the shared kinds, conditional execution three ways: ``eager`` (``evaluation.ensemble_forward``), ``fused``
  (``evaluation.routed_forward``: routing in torch, deltas merged) and ``prepared`` (``inference.RoutedEnsemble``:
  batch norm folded into the convolutions, layers called directly, a delta specialist reuses the generalist's first
  later layer, dustbin heads in two operations) and ``grouped`` (the same, the specialists of one image in one
  grouped call: ``inference.FusedSpecialists``); the prepared paths also over the generalist prepared the same way
  (``inference.PreparedClassifier``; the ``_fair`` lines), since folding and direct calls speed the generalist up
  too; with ``--compile`` also the target kind's prepared routing at batch 1 with every network
  ``torch.compile``-d, against the compiled generalist (``compiled``).

For the target kind (``--target-kind``) it then times the generalist (``inference.PreparedClassifier``) in each
memory layout of ``inference.LAYOUTS`` (NCHW, channels-last, oneDNN's blocked tensors) and the prepared ensemble in
each pair of layouts (the generalist's parts, the specialists), and takes the fastest of each side at each batch size:
on a CPU the layout can change the generalist's batch-256 latency about threefold, so a ratio over a generalist
left in a slow layout flatters the ensemble. The fastest are chosen on rounds of their own and timed again, built
afresh in ``--blocks`` blocks, for the ratio and its interval (``layout_ratios``).

It ends with ratio lines, conditional execution over the generalist's latency, in the same process and threads,
best of ``--repeats`` repeats: ``ratio_b{1,256}_{kind}_{eager,fused,prepared,grouped}`` (and
``_prepared_fair``, ``_grouped_fair``), ``ratio_b{1,256}_full`` and
``_scratch`` (networks and routing; the ``_kl`` lines add the ``kl`` combination) and ``params_ratio_{kind}``
(stored parameters over the generalist's); then issue 22's three target lines for ``--target-kind`` (default
``delta``): ``ratio_b1_shared``, ``ratio_b256_shared`` (that kind, prepared, in its fastest layouts over the
prepared generalist in its fastest layout: the ``_best`` lines; with ``--no-layouts`` both in NCHW, the
``_prepared_fair`` lines) and ``params_ratio_small``.

The networks are untrained, so the routing uses a random generalist-like distribution instead of
the generalist's own output (``softmax(3 * randn)`` per image; top-1 activation for ``kl`` and
``top_confident``, group mass >= ``--moe-threshold`` for ``moe``); the generalist still runs in every
timed pass. With ``--data glyphs`` the images are real glyphs instead of random pixels.

With ``--run FOLDER`` (a finished run) the generalist is the run's trained one, the groups are the run's, the
images its test images, and the routing is the generalist's own output on them, so the share of images routed and
the specialists per image are the real ones (groups may overlap: more than one specialist per image). The
specialists of every kind are still made from the generalist with the run's groups (their weights do not change
their cost). ``--skip-confident c`` routes no image whose generalist top-1 probability exceeds ``c``
(``ensemble.activation``'s ``confident``; pick it on validation images with ``frontier.choose_confident``, as
``bench/cheap_seeds.py`` does); it needs real routing, so ``--run``. ``--route-share s`` sets ``c`` from a cost
budget instead: the value that routes a share ``s`` of the run's validation images (``frontier.confident_for_share``).

The layout section also times a *fusion bound*: the generalist plus one specialist run once on all the routed rows,
with no routing. Running M specialists with their own weights cannot cost less, so it tells how much fusing their
calls could gain at best (``fusion_bound_b*``).

    .venv/bin/python bench/inference_cost.py            # about 3.5 minutes on 2 CPU cores (--no-layouts: 2)
    .venv/bin/python bench/inference_cost.py --device cuda --images-large 2048
    .venv/bin/python bench/inference_cost.py --run runs/demo --shared-stages 1 --delta-rank 8 --skip-confident 0.7
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialkit import ensemble, evaluation, frontier, inference, models, specialists, stats  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--classes", type=int, default=62, help="C, classes of the generalist")
    p.add_argument("--specialists", type=int, default=8, help="M, disjoint groups of about C/M classes")
    p.add_argument("--width", type=int, default=16, help="cnn width of the generalist")
    p.add_argument("--depth", type=int, default=3, help="cnn depth of the generalist")
    p.add_argument("--delta-rank", type=int, default=16, help="rank of the low-rank delta specialists' layers")
    p.add_argument("--small-width", type=int, default=8, help="cnn width of the small specialists")
    p.add_argument("--small-depth", type=int, default=3, help="cnn depth of the small specialists")
    p.add_argument("--images-small", type=int, default=128, help="images timed at batch 1 (fewer: noisier ratios)")
    p.add_argument("--images-large", type=int, default=256, help="images timed at the large batch size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--repeats", type=int, default=5, help="timed passes (the best is kept)")
    p.add_argument(
        "--blocks",
        type=int,
        default=3,
        help="latency ratios are timed in this many blocks, every network built afresh for each (the intervals "
        "resample blocks and rounds): blocks of --repeats rounds, and of 2 x --repeats in the layout section's "
        "measure phase",
    )
    p.add_argument(
        "--shared-stages", type=int, default=None, help="stages the shared specialists share (default depth - 1)"
    )
    p.add_argument("--rules", nargs="+", default=["kl", "top_confident", "moe"], choices=["kl", "top_confident", "moe"])
    p.add_argument("--moe-threshold", type=float, default=0.1, help="moe: skip a specialist whose group mass is lower")
    p.add_argument("--top-confident-n", type=int, default=2)
    p.add_argument("--data", choices=["random", "glyphs"], default="random")
    p.add_argument(
        "--run",
        default=None,
        help="a finished run: its trained generalist, groups and test images, routed by the generalist's own output "
        "(--classes, --specialists, --width, --depth and --data then come from the run)",
    )
    p.add_argument(
        "--skip-confident",
        type=float,
        default=1.0,
        help="route no image whose generalist top-1 probability exceeds this (1 = every image; needs --run)",
    )
    p.add_argument(
        "--route-share",
        type=float,
        default=None,
        help="route at most this share of the images, a cost budget: sets --skip-confident from the run's validation "
        "images (frontier.confident_for_share; no labels read; needs --run)",
    )
    p.add_argument(
        "--max-active",
        type=int,
        default=0,
        help="route each image to at most this many specialists, those whose group holds the most generalist mass "
        "(0 = every one its top class switches on; overlapping groups switch on several)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the target kind's prepared routing at batch 1 with torch.compile (a minute or more of "
        "compilation), against the compiled generalist",
    )
    p.add_argument(
        "--no-layouts",
        action="store_true",
        help="skip timing the target kind and the generalist in every memory layout (inference.LAYOUTS); the target "
        "lines then compare both in NCHW, which on a CPU can be far from either's fastest",
    )
    p.add_argument(
        "--target-kind",
        default="delta",
        choices=["dense", "smallhead", "delta"],
        help="the shared-trunk kind whose prepared ratios are printed as ratio_b1_shared / ratio_b256_shared / "
        "params_ratio_small (issue 22's target lines)",
    )
    args = p.parse_args(argv)
    if args.route_share is not None and (args.run is None or args.skip_confident < 1):
        p.error("--route-share sets the confidence skip from a finished run: pass --run FOLDER and no --skip-confident")
    if args.blocks < 1 or args.repeats < 1 or args.blocks * args.repeats < 2:
        p.error(
            f"--blocks and --repeats must be at least 1, with 2 rounds or more in all; got {args.blocks} and {args.repeats}"
        )
    return args


def finished_run(args: argparse.Namespace) -> dict:
    """The trained generalist, groups, test images (and 256 training images for fitting small heads) and the
    generalist's saved test probabilities of ``--run``; ``args`` gets the run's classes, specialists, width and depth.
    """
    from specialkit.pipeline import Run

    run = Run.open(args.run, log=lambda s: None)
    if run.config.model != "cnn":
        raise SystemExit(f"--run {args.run}: its generalist is {run.config.model!r}; this bench cuts cnn trunks only")
    ds = run.dataset()
    groups = [np.sort(np.asarray(g)) for g in run.groups()]
    args.classes, args.specialists, args.width, args.depth = (
        ds.num_classes,
        len(groups),
        run.config.width,
        run.config.depth,
    )
    return {
        "generalist": run.generalist().model.eval(),
        "groups": groups,
        "x": ds.x_test,
        "x_fit": ds.x_train[:256],
        "p_gen": run.generalist().probs("test"),
        "p_val": run.generalist().probs("val"),
        "channels": ds.channels,
        "size": ds.image_size,
    }


def images(args: argparse.Namespace, n: int) -> torch.Tensor:
    if args.data == "glyphs":
        from specialkit import data

        ds = data.load("glyphs", per_class=max(2, -(-n // args.classes) + 1), seed=args.seed)
        x = ds.x_train
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:n]]
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(args.seed))


class _Batches:
    """Images and the routing distributions of the same rows (and any more tensors with a row per image), sliced
    together for ``evaluation.measure_latency``."""

    def __init__(self, x: torch.Tensor, p: torch.Tensor, *more: torch.Tensor) -> None:
        self.x, self.p, self.more, self.is_cuda, self.device = x, p, more, x.is_cuda, x.device

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, s: slice) -> tuple[torch.Tensor, ...]:
        return (self.x[s], self.p[s], *(t[s] for t in self.more))


def fused_ratios(
    args: argparse.Namespace,
    generalist: torch.nn.Module,
    specs: list[torch.nn.Module],
    x: torch.Tensor,
    p_route: np.ndarray,
    groups: list[np.ndarray],
) -> dict[int, dict[str, stats.LatencyRatio]]:
    """Batch size -> conditional latency of each path over the generalist's, every path and both generalists timed
    interleaved (``evaluation.measure_latency_rounds``) in ``--blocks`` blocks of ``--repeats`` rounds, every network
    built afresh (copied) for each block: the median of the per-round ratios with a bootstrap 95% interval over blocks
    and rounds (``stats.latency_ratio``).

    Eager is ``evaluation.ensemble_forward`` with ``ensemble.activation`` (what the tables time); fused is
    ``evaluation.routed_forward`` (the routing in torch, no numpy round trip; low-rank deltas merged into dense
    layers); prepared is ``inference.RoutedEnsemble`` (batch norm folded, layers called directly, deltas reuse the
    generalist's first later layer, dustbin heads in two operations) and grouped the same with ``fuse=True`` (the
    specialists of one image in one grouped call). Each is over the generalist as trained (``{path}``) and, for the
    prepared paths, over the generalist prepared the same way (``inference.PreparedClassifier``:
    ``{path}_fair``), so a speed-up any network gets is not counted as the ensemble's. Networks only, top-1 routing.
    """
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x
    member = evaluation.group_membership(groups, args.classes, xf.device)
    p_t = torch.as_tensor(p_route, dtype=torch.float32, device=xf.device)
    sure = args.skip_confident
    most = args.max_active

    def build() -> dict:  # every path over networks copied afresh (one deepcopy keeps the specialists' shared trunk)
        g, *sp = copy.deepcopy([generalist, *specs])
        merged = [models.merge_deltas(s) for s in sp]
        prepared = inference.RoutedEnsemble(g, sp, groups, confident=sure, max_active=most)
        grouped = inference.RoutedEnsemble(g, sp, groups, confident=sure, max_active=most, fuse=True)
        g_prepared = inference.PreparedClassifier(g)

        def eager(b: tuple[torch.Tensor, torch.Tensor]) -> None:
            evaluation.ensemble_forward(
                g,
                sp,
                b[0],
                lambda p: ensemble.activation(p, groups, confident=sure, max_active=most),
                routing_probs=b[1].cpu().numpy(),
            )

        def fused(b: tuple[torch.Tensor, torch.Tensor]) -> None:
            evaluation.routed_forward(g, merged, b[0], member, confident=sure, max_active=most, routing_probs=b[1])

        return {
            "generalist": lambda b: g(b[0]),
            "generalist_prepared": lambda b: g_prepared(b[0]),
            "eager": eager,
            "fused": fused,
            "prepared": lambda b: prepared(b[0], routing_probs=b[1]),
            "grouped": lambda b: grouped(b[0], routing_probs=b[1]),
        }

    out = {}
    ratio = functools.partial(stats.latency_ratio, blocks=np.repeat(np.arange(args.blocks), args.repeats))
    for bs in args.batch_sizes:
        n = args.images_small if bs == 1 else args.images_large
        batches = _Batches(xf[:n], p_t[:n])
        parts = [
            evaluation.measure_latency_rounds(build(), batches, batch_size=bs, rounds=args.repeats)
            for _ in range(args.blocks)
        ]
        t = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        out[bs] = {name: ratio(t[name], t["generalist"]) for name in ("eager", "fused", "prepared", "grouped")}
        out[bs].update({f"{name}_fair": ratio(t[name], t["generalist_prepared"]) for name in ("prepared", "grouped")})
        out[bs]["generalist_prepared"] = ratio(t["generalist_prepared"], t["generalist"])
    return out


ENSEMBLE_LAYOUTS = [(g, o) for g in inference.LAYOUTS for o in inference.LAYOUTS]
"""(generalist's parts, specialists) memory layouts the target kind's ensemble is timed in (unless ``--no-layouts``)."""


def layout_ratios(
    args: argparse.Namespace,
    generalist: torch.nn.Module,
    specs: list[torch.nn.Module],
    x: torch.Tensor,
    p_route: np.ndarray,
    groups: list[np.ndarray],
) -> dict[int, dict]:
    """Batch size -> the generalist (``inference.PreparedClassifier``) and the prepared ensemble
    (``inference.RoutedEnsemble``) each in its fastest memory layout, and their ratio: ``{"ms": name -> median ms per
    image, "best_generalist", "best_ensemble", "ratio", "nchw"}``.

    Two phases per batch size. *Choose*: the generalist in each layout and the ensemble in each (generalist's parts,
    specialists) pair, timed interleaved over ``--repeats`` rounds (``ms``); the fastest of each side is the one with
    the lowest median. *Measure*: in each of ``--blocks`` blocks the chosen two and both in NCHW are built afresh and
    timed interleaved over 2 x ``--repeats`` rounds; ``ratio`` (the chosen pair) and ``nchw`` are
    ``stats.latency_ratio`` over those rounds, resampling blocks and rounds. Choosing on other rounds than those
    measured keeps the choice's luck (the lowest of nine noisy medians) out of the ratio, and the blocks put the
    variation between builds (where the tensors land in memory) into its interval. Both sides get the same choice, so
    ``ratio`` is that of the ensemble and the generalist each run as fast as this machine runs them.

    ``bound`` (timed in the same rounds) is the chosen generalist plus *one* specialist (the first) run once on all
    the batch's routed rows of the trunk's output, computed beforehand: what running every routed row in one call
    would cost if all the specialists had one set of weights, with no routing. That specialist is timed in every
    layout and each round keeps the fastest, which errs low. No execution of M specialists with their own weights
    can be cheaper, so it bounds what fusing their calls could gain."""
    xf = x.float().div(255.0) if x.dtype == torch.uint8 else x
    p_t = torch.as_tensor(p_route, dtype=torch.float32, device=xf.device)
    layouts = [lay for lay in inference.LAYOUTS if lay != "blocked" or xf.device.type == "cpu"]
    routed = torch.as_tensor(
        ensemble.activation(p_route, groups, confident=args.skip_confident, max_active=args.max_active).any(axis=1),
        device=xf.device,
    )
    with torch.no_grad():
        h_trunk = specs[0].shared_trunk(xf)  # the trunk's output of every image (NCHW), for the bound

    def build(name: str):  # a fresh callable for "generalist <layout>", "ensemble <layout> / <layout>" or "bound ..."
        kind, _, rest = name.partition(" ")
        if kind == "generalist":
            g = inference.PreparedClassifier(generalist, layout=rest)
            return lambda b: g(b[0])
        if kind == "bound":
            lay, own = rest.split(" / ")
            g = inference.PreparedClassifier(generalist, layout=lay)
            one = inference.FastSpecialist(specs[0], None, dustbin_shift=0.0, layout=own)

            def bound(b: tuple[torch.Tensor, ...]) -> None:
                g(b[0])
                if bool(b[3].any()):
                    one.forward(b[2][b[3]])

            return bound
        lay, own = rest.split(" / ")
        ens = inference.RoutedEnsemble(
            generalist,
            specs,
            groups,
            confident=args.skip_confident,
            max_active=args.max_active,
            layout=lay,
            specialist_layout=own,
        )
        return lambda b: ens(b[0], routing_probs=b[1])

    names = [f"generalist {lay}" for lay in layouts]
    names += [f"ensemble {lay} / {own}" for lay, own in ENSEMBLE_LAYOUTS if lay in layouts and own in layouts]
    nchw = ("ensemble nchw / nchw", "generalist nchw")
    out = {}
    for bs in args.batch_sizes:
        n = args.images_small if bs == 1 else args.images_large
        batches = _Batches(*(t[:n] for t in (xf, p_t, h_trunk, routed)))
        chosen = evaluation.measure_latency_rounds(
            {name: build(name) for name in names}, batches, batch_size=bs, rounds=args.repeats
        )
        ms = {name: float(np.median(v)) * 1e3 for name, v in chosen.items()}
        best = (
            min((k for k in ms if k.startswith("ensemble")), key=ms.__getitem__),
            min((k for k in ms if k.startswith("generalist")), key=ms.__getitem__),
        )
        lower = [f"bound {best[1].split(' ')[1]} / {own}" for own in layouts]
        timed: dict[str, list[np.ndarray]] = {name: [] for name in {*best, *nchw, *lower}}
        for _ in range(args.blocks):
            t = evaluation.measure_latency_rounds(
                {name: build(name) for name in timed}, batches, batch_size=bs, rounds=2 * args.repeats
            )
            for name, v in t.items():
                timed[name].append(v)
        blocks = np.repeat(np.arange(args.blocks), 2 * args.repeats)
        joined = {name: np.concatenate(v) for name, v in timed.items()}
        out[bs] = {
            "ms": ms,
            "best_ensemble": best[0],
            "best_generalist": best[1],
            "ratio": stats.latency_ratio(joined[best[0]], joined[best[1]], blocks=blocks),
            "nchw": stats.latency_ratio(joined[nchw[0]], joined[nchw[1]], blocks=blocks),
            "bound": stats.latency_ratio(
                np.min([joined[name] for name in lower], axis=0), joined[best[1]], blocks=blocks
            ),
            "routed": float(routed[:n].float().mean()),
        }
    return out


def compiled_ratio(
    args: argparse.Namespace,
    generalist: torch.nn.Module,
    specs: list[torch.nn.Module],
    x: torch.Tensor,
    p_route: np.ndarray,
    groups: list[np.ndarray],
) -> tuple[float, float]:
    """Batch 1, ``torch.compile``: (prepared routing with every network compiled over the compiled generalist, the
    seconds the compilation took). The trunk, the generalist's later stages and each specialist's prepared forward
    (``inference.FastSpecialist``) are compiled separately, since the routing between them is data-dependent."""
    xf = (x.float().div(255.0) if x.dtype == torch.uint8 else x)[: args.images_small]
    p_t = torch.as_tensor(p_route[: args.images_small], dtype=torch.float32, device=xf.device)
    prepared = inference.RoutedEnsemble(
        generalist, specs, groups, confident=args.skip_confident, max_active=args.max_active
    )
    gen_c = torch.compile(generalist, dynamic=False)
    trunk_c = torch.compile(prepared.trunk, dynamic=False)
    later_c = torch.compile(prepared._generalist_later, dynamic=False)
    own_c = [torch.compile(s.forward, dynamic=False) for s in prepared.specialists]
    member = prepared.member

    def routed(b: tuple[torch.Tensor, torch.Tensor]) -> None:
        h = trunk_c(b[0])
        logits, first_out = later_c(h)
        torch.softmax(logits, dim=1)
        for m in (
            evaluation.routed_activation(b[1], member, confident=args.skip_confident, max_active=args.max_active)[0]
            .nonzero()
            .flatten()
            .tolist()
        ):
            own_c[m](h, first_out)

    data = _Batches(xf, p_t)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(xf)):  # every specialist the routing reaches gets compiled here, outside the clock
            gen_c(xf[i : i + 1])
            routed(data[i : i + 1])
    seconds = time.perf_counter() - t0
    fns = {"generalist": lambda b: gen_c(b[0]), "compiled": routed}
    t = evaluation.measure_latencies(fns, data, batch_size=1, rounds=3 * args.repeats)
    return t["compiled"] / t["generalist"], seconds


def rules(args: argparse.Namespace, groups: list[np.ndarray]) -> dict:
    def outs(o: list[np.ndarray]) -> list[ensemble.SpecialistOutputs]:
        return [ensemble.SpecialistOutputs(g, p) for g, p in zip(groups, o)]

    def kl(p, o, act):
        return ensemble.combine_kl(p, outs(o), act)

    def top_confident(p, o, act):
        return ensemble.combine_top_confident(p, outs(o), n=min(args.top_confident_n, len(groups)), active=act)

    def moe(p, o, act):
        return ensemble.combine_moe(p, outs(o), threshold=args.moe_threshold)

    def moe_run(p):
        return ensemble.moe_gates(p, groups, threshold=args.moe_threshold).run

    table = {"kl": kl, "top_confident": top_confident, "moe": (moe, moe_run)}
    return {name: table[name] for name in args.rules}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)

    if args.skip_confident < 1 and args.run is None:
        raise SystemExit("--skip-confident needs real routing: pass --run FOLDER (a finished run)")
    channels, size, real = 1, 32, None
    if args.run is not None:
        real = finished_run(args)
        generalist, groups = real["generalist"].to(device), real["groups"]
        channels, size = real["channels"], real["size"]
        if args.route_share is not None:
            args.skip_confident = frontier.confident_for_share(real["p_val"], args.route_share)
            print(
                f"route share {args.route_share:g}: confidence skip {args.skip_confident:.4f}, set on the run's "
                "validation images (frontier.confident_for_share)"
            )
    else:
        gen_cfg = models.ModelConfig(
            name="cnn", num_classes=args.classes, in_channels=1, image_size=32, width=args.width, depth=args.depth
        )
        generalist = models.build_model(gen_cfg).eval().to(device)
        groups = [np.sort(g) for g in np.array_split(rng.permutation(args.classes), args.specialists)]
    same = [specialists.init_from_generalist(generalist, g).eval() for g in groups]
    s_shared = args.depth - 1 if args.shared_stages is None else args.shared_stages
    trunk = generalist.trunk(s_shared)
    shared = [
        models.share_trunk(specialists.init_from_generalist(generalist, g), trunk).eval().to(device) for g in groups
    ]
    scratch = [
        models.build_model(
            models.ModelConfig(
                name="cnn",
                num_classes=len(g) + 1,
                in_channels=channels,
                image_size=size,
                width=args.small_width,
                depth=args.small_depth,
            )
        )
        .eval()
        .to(device)
        for g in groups
    ]

    n = max(args.images_small, args.images_large)
    if real is not None:  # a random sample of the test images (they may be stored sorted by class)
        pick = rng.permutation(len(real["x"]))[:n]
        real["p_gen"] = real["p_gen"][pick]
        x, x_fit = real["x"][torch.as_tensor(pick)], real["x_fit"].float().div(255.0).to(device)
    else:
        x = images(args, n)
        x_fit = images(args, 256).float().div(255.0).to(device)  # the small heads' dustbin rows are fitted on these
    small = [specialists.collapse_head(s, x_fit) for s in shared]
    delta = [
        models.low_rank_delta(
            models.share_trunk(specialists.init_from_generalist(generalist, g), trunk), generalist, args.delta_rank
        )
        .eval()
        .to(device)
        for g in groups
    ]

    if real is not None:
        p_route = real["p_gen"]
        n = len(p_route)
    else:
        z = 3.0 * rng.standard_normal((n, args.classes))
        p_route = np.exp(z - z.max(1, keepdims=True))
        p_route /= p_route.sum(1, keepdims=True)
    active = ensemble.activation(p_route, groups, top_n=1, confident=args.skip_confident, max_active=args.max_active)
    moe_active = ensemble.moe_gates(p_route, groups, threshold=args.moe_threshold).run

    shape = (1, channels, size, size)
    gen_cost = evaluation.model_cost(generalist, shape)
    print(
        f"generalist: cnn width {args.width} depth {args.depth}, {args.classes} classes: "
        f"{gen_cost['params']:,} params, {gen_cost['flops'] / 1e6:.2f} MFLOPs/image"
        + ("" if real is None else f" (trained, from {args.run})")
    )
    routing = "random generalist distribution" if real is None else "the generalist's own output"
    skip = "" if args.skip_confident >= 1 else f", skipped where its top-1 probability > {args.skip_confident:g}"
    skip += "" if args.max_active == 0 else f", at most {args.max_active} per image (the most group mass)"
    timed = active[: args.images_small]
    print(
        f"{args.specialists} specialists of {min(map(len, groups))}-{max(map(len, groups))} classes (+ dustbin); "
        f"routing: {routing}, top-1 activation{skip} ({active.sum(1).mean():.2f} specialists/image, "
        f"{active.any(1).mean():.1%} of images routed; the {len(timed)} images timed at batch 1: "
        f"{timed.sum(1).mean():.2f}/image), moe threshold {args.moe_threshold} ({moe_active.sum(1).mean():.2f}/image); "
        f"images: {'the run' + chr(39) + 's test images' if real is not None else args.data}; "
        f"device {args.device}, {args.threads} thread(s)\n"
    )

    ratios: dict[str, float] = {}
    intervals: dict[str, stats.LatencyRatio] = {}
    sets = (
        ("full", "same size as the generalist (initialised from it)", same),
        ("dense", f"sharing the generalist's first {s_shared} of {args.depth} stages (initialised from it)", shared),
        (
            "smallhead",
            f"sharing the first {s_shared} stages, heads collapsed to |S|+1 rows (specialists.collapse_head)",
            small,
        ),
        (
            "delta",
            f"sharing the first {s_shared} stages, the rest rank-{args.delta_rank} deltas on the generalist's "
            "(models.low_rank_delta)",
            delta,
        ),
        ("scratch", f"small (cnn width {args.small_width} depth {args.small_depth}, from scratch)", scratch),
    )
    for key, label, specs in sets:
        costs = [evaluation.model_cost(s, shape) for s in specs]
        ec = evaluation.ensemble_cost(gen_cost, costs, active)
        ec_moe = evaluation.ensemble_cost(gen_cost, costs, moe_active)
        ratios[f"params_ratio_{key}"] = ec["params_ratio"]
        print(f"== specialists {label}: {costs[0]['params']:,} params, {costs[0]['flops'] / 1e6:.2f} MFLOPs each")
        print(
            f"FLOPs/image vs generalist: all {ec['all_ratio']:.2f}x | conditional top-1 {ec['conditional_ratio']:.2f}x"
            f" | conditional moe {ec_moe['conditional_ratio']:.2f}x | parameters stored {ec['params_ratio']:.2f}x"
        )
        df = evaluation.latency_table(
            generalist,
            specs,
            x.to(device),
            active,
            batch_sizes=args.batch_sizes,
            rules={"nets": None, **rules(args, groups)},
            repeats=args.repeats,
            warmup=1,
            routing_probs=p_route,
            best=True,
            max_images={bs: (args.images_small if bs == 1 else args.images_large) for bs in args.batch_sizes},
        )
        if key in ("dense", "smallhead", "delta"):
            fused = fused_ratios(args, generalist, specs, x.to(device), p_route, groups)
            for bs, r in fused.items():
                for path, value in r.items():
                    if path != "generalist_prepared":
                        ratios[f"ratio_b{bs}_{key}_{path}"] = value.ratio
                        intervals[f"ratio_b{bs}_{key}_{path}"] = value
                print(
                    f"networks, conditional, batch {bs}, over the generalist as trained: eager {r['eager']} | "
                    f"fused routing {r['fused']} | prepared (inference.RoutedEnsemble) {r['prepared']} | "
                    f"prepared, grouped calls {r['grouped']}; over the generalist prepared the same way "
                    f"(inference.PreparedClassifier, {r['generalist_prepared']} the generalist as trained): "
                    f"prepared {r['prepared_fair']} | grouped {r['grouped_fair']}  (median of per-round ratios, "
                    f"95% interval over {args.blocks} blocks of fresh builds and their rounds)"
                )
            if key == args.target_kind and not args.no_layouts:
                for bs, r in layout_ratios(args, generalist, specs, x.to(device), p_route, groups).items():
                    intervals[f"ratio_b{bs}_{key}_best"] = r["ratio"]
                    ratios[f"ratio_b{bs}_{key}_best"] = r["ratio"].ratio
                    print(
                        f"memory layouts, batch {bs}, ms per image (median over the {args.repeats} rounds that choose; "
                        "ensemble = generalist's parts / specialists):"
                    )
                    print("  " + " | ".join(f"{name} {v:.4f}" for name, v in r["ms"].items()))
                    print(
                        f"  fastest: {r['best_ensemble']} over {r['best_generalist']}, timed again, built afresh in "
                        f"each of {r['ratio'].blocks} blocks: {r['ratio']} (both in nchw: {r['nchw']})"
                    )
                    intervals[f"fusion_bound_b{bs}"] = r["bound"]
                    ratios[f"fusion_bound_b{bs}"] = r["bound"].ratio
                    print(
                        f"  fusion bound (the generalist + one specialist, in its fastest layout each round, run "
                        f"once on the {r['routed']:.1%} of rows routed, no routing; no execution of {len(groups)} "
                        f"specialists with their own weights is cheaper), same rounds: {r['bound']}"
                    )
            if args.compile and key == args.target_kind:
                r_compiled, seconds = compiled_ratio(args, generalist, specs, x.to(device), p_route, groups)
                ratios[f"ratio_b1_{key}_compiled"] = r_compiled
                print(
                    f"networks, conditional, batch 1, torch.compile (prepared, against the compiled generalist; "
                    f"{seconds:.0f} s of compilation): {r_compiled:.3f}x"
                )
        for bs in args.batch_sizes:
            for model, suffix in (("nets conditional", ""), ("kl conditional", "_kl")):
                row = df[(df["model"] == model) & (df["batch_size"] == bs)]
                if len(row):
                    ratios[f"ratio_b{bs}_{key}{suffix}"] = float(row["ratio"].iloc[0])
        df["ms_per_image"] = df.pop("seconds_per_image") * 1e3
        wide = df.pivot(index="model", columns="batch_size", values="ratio")
        wide.columns = [f"ratio@{b}" for b in wide.columns]
        ms = df.pivot(index="model", columns="batch_size", values="ms_per_image")
        ms.columns = [f"ms/img@{b}" for b in ms.columns]
        df["combine_ms"] = df.pop("combine_seconds_per_image") * 1e3
        comb = df.pivot(index="model", columns="batch_size", values="combine_ms")
        comb.columns = [f"rule ms/img@{b}" for b in comb.columns]
        active_col = df.groupby("model")["mean_active"].last().rename("specialists/img")
        out = wide.join(ms).join(comb).join(active_col)
        order = ["generalist"] + [f"{r} {m}" for r in ["nets", *args.rules] for m in ("all", "conditional")]
        print(out.loc[order].to_string(float_format=lambda v: f"{v:.3f}"))
        print()
    target = args.target_kind
    for bs in (1, 256):
        for how in ("best", "prepared_fair"):  # the fastest layouts on both sides; with --no-layouts, NCHW on both
            if f"ratio_b{bs}_{target}_{how}" in ratios:
                ratios[f"ratio_b{bs}_shared"] = ratios[f"ratio_b{bs}_{target}_{how}"]
                intervals[f"ratio_b{bs}_shared"] = intervals[f"ratio_b{bs}_{target}_{how}"]
                break
    ratios["params_ratio_small"] = ratios[f"params_ratio_{target}"]
    names = [
        f"ratio_b{bs}_{kind}_{how}"
        for kind in ("dense", "smallhead", "delta")
        for bs in args.batch_sizes
        for how in ("eager", "fused", "prepared", "grouped", "prepared_fair", "grouped_fair", "best", "compiled")
    ]
    names += [
        f"ratio_b{bs}_{kind}{suffix}" for kind in ("full", "scratch") for suffix in ("", "_kl") for bs in (1, 256)
    ]
    names += [f"ratio_b{bs}_dense_kl" for bs in (1, 256)]
    names += [f"params_ratio_{kind}" for kind in ("full", "dense", "smallhead", "delta", "scratch")]
    names += [f"fusion_bound_b{bs}" for bs in args.batch_sizes]
    for name in names:
        if name in ratios:
            print(f"{name}={ratios[name]:.3f}")
    if args.skip_confident < 1:
        print(f"\nrouting skips images whose generalist top-1 probability exceeds {args.skip_confident:g}")
    print(
        f"\nissue 22 target, k = {args.specialists}: batch 1 <= 1.5x, batch 256 <= 1.3x, parameters stored <= "
        f"{1 + 0.3 * args.specialists:.1f}x, for the specialist kind {target!r} (--target-kind), run prepared "
        "(inference.RoutedEnsemble) over the generalist prepared the same way (inference.PreparedClassifier), each "
        "in its fastest memory layout at that batch size (NCHW on both with --no-layouts); its accuracy against "
        "whole specialists is bench/cheap_seeds.py's"
    )
    for name, limit in (
        ("ratio_b1_shared", 1.5),
        ("ratio_b256_shared", 1.3),
        ("params_ratio_small", 1 + 0.3 * args.specialists),
    ):
        if name in intervals:
            r = intervals[name]
            print(
                f"{name}={r.ratio:.3f}  (95% interval [{r.lo:.3f}, {r.hi:.3f}] over {r.rounds} rounds"
                f"{f' in {r.blocks} blocks' if r.blocks > 1 else ''}: {r.against(limit)}: <= {limit:.1f})"
            )
        elif name in ratios:
            print(f"{name}={ratios[name]:.3f}  ({'met' if ratios[name] <= limit else 'NOT met'}: <= {limit:.1f})")
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
