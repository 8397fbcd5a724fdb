"""Streaming from disk against images in memory: one training epoch each, on the same ImageNet-layout folder.

Generates (once, cached in the temporary folder) ``--images`` 64x64 JPEGs in the ImageNet layout
(``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), then trains one epoch of the same model with the same
seed on each path, each in a fresh process so that one's memory does not count for the other:

* streaming: ``data.load("imagenet", in_memory=False, stream_workers=2)``: the main process holds the
  file names only; 2 worker processes decode the batches;
* in memory: ``in_memory=True``: every image decoded into one uint8 tensor first (not timed), then
  the epoch indexes it.

Prints ``peak_rss_gb=`` (peak resident memory of the streaming process, its whole life: an upper bound
of the epoch's; the decoding workers are other processes and not counted), the images/s of each and
``ratio_streaming=`` (streaming over in-memory images/s; targets: peak < 1.5 GB, ratio >= 0.7).

    python bench/streaming.py                      # 50,000 images: a few minutes on 2 CPU cores
    python bench/streaming.py --images 5000        # a quick look
    python bench/streaming.py --decode-only 10000  # the loader alone: images/s its workers decode
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(root: Path, *, images: int, classes: int, size: int, val_per_class: int) -> Path:
    """``root`` with ``images`` training JPEGs over ``classes`` wnids (+ ``val_per_class`` validation ones each);
    written into a temporary sibling and renamed when complete, so a half-written folder is never used."""
    if (root / "done.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    per_class = images // classes
    for c in range(classes):
        wnid = f"n{c:08d}"
        colour = rng.uniform(40, 215, 3)
        for split, n in (("train", per_class), ("val", val_per_class)):
            folder = tmp / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                phase = rng.uniform(0, 6.3, 2)
                wave = 40 * np.sin(6 * xx + phase[0])[..., None] + 40 * np.cos(5 * yy + phase[1])[..., None]
                pixels = np.clip(colour + wave + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{wnid}_{i}.JPEG", format="JPEG", quality=90)
    (tmp / "done.json").write_text(json.dumps({"images": per_class * classes, "classes": classes, "size": size}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def one_epoch(
    root: Path, *, in_memory: bool, workers: int, width: int, batch_size: int, threads: int
) -> dict[str, float]:
    """Train one epoch on one path (in this process); its images/s and this process's peak RSS in GB."""
    import torch

    from specialkit import data, models, training

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ds = data.load(
        "imagenet",
        root=root,
        per_class=None,
        val_fraction=0.01,
        seed=0,
        size=64,
        in_memory=in_memory,
        stream_workers=workers,
    )
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = models.build_model(
        models.ModelConfig(num_classes=ds.num_classes, in_channels=3, image_size=64, width=width, depth=3)
    )
    config = training.TrainConfig(epochs=1, batch_size=batch_size, progress=False, device="cpu", seed=0)
    t0 = time.perf_counter()
    history = training.fit(model, ds.x_train, ds.y_train, config=config, hflip=True)
    seconds = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    return {
        "images_per_s": len(ds.y_train) / seconds,
        "epoch_s": seconds,
        "load_s": load_s,
        "peak_rss_gb": peak_gb,
        "train_loss": history[0].train_loss,
        "images": len(ds.y_train),
    }


def decode_only(root: Path, *, workers: int, batch_size: int, limit: int) -> float:
    """Images/s the streaming loader alone delivers (``workers`` processes, no training): the ceiling of the
    streaming path's speed, whatever the model."""
    import torch

    from specialkit import data, streaming

    ds = data.load(
        "imagenet",
        root=root,
        per_class=None,
        val_fraction=0.01,
        seed=0,
        size=64,
        in_memory=False,
        stream_workers=workers,
    )
    order = torch.randperm(len(ds.y_train), generator=torch.Generator().manual_seed(0))[:limit]
    chunks = list(order.split(batch_size))
    t0 = time.perf_counter()
    n = sum(len(xb) for xb in streaming.batches(ds.x_train, chunks))
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images", type=int, default=50_000, help="training JPEGs to generate (>= 50,000 for the target)"
    )
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes of the streaming path")
    parser.add_argument("--width", type=int, default=16, help="cnn width (depth 3)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch threads of the training process (default OMP_NUM_THREADS, else 1)",
    )
    parser.add_argument(
        "--root", type=Path, default=None, help="where to cache the generated folder (default: the temp folder)"
    )
    parser.add_argument(
        "--decode-only",
        type=int,
        default=0,
        metavar="N",
        help="only measure how many images/s the streaming loader decodes (N images, no training)",
    )
    parser.add_argument("--child", choices=("streaming", "memory"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.gettempdir()) / f"specialkit-bench-streaming-{args.images}-{args.classes}"
    if args.decode_only:
        generate(root, images=args.images, classes=args.classes, size=64, val_per_class=2)
        rate = decode_only(root, workers=args.workers, batch_size=args.batch_size, limit=args.decode_only)
        print(f"decode_images_per_s={rate:.0f} ({args.workers} workers, {args.decode_only} images, no training)")
        return {"decode_images_per_s": rate}
    if args.child:
        out = one_epoch(
            root,
            in_memory=args.child == "memory",
            workers=args.workers,
            width=args.width,
            batch_size=args.batch_size,
            threads=args.threads,
        )
        print(json.dumps(out))
        return out
    t0 = time.perf_counter()
    generate(root, images=args.images, classes=args.classes, size=64, val_per_class=2)
    print(f"folder: {root} ({args.images} training JPEGs, 64x64; ready in {time.perf_counter() - t0:.0f} s)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {os.cpu_count()} cores, load average {load:.2f} before the runs; training threads {args.threads}, "
        f"{args.workers} decoding workers"
    )
    results = {}
    for path in ("streaming", "memory"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            path,
            "--images",
            str(args.images),
            "--classes",
            str(args.classes),
            "--workers",
            str(args.workers),
            "--width",
            str(args.width),
            "--batch-size",
            str(args.batch_size),
            "--threads",
            str(args.threads),
            "--root",
            str(root),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the {path} run failed:\n{proc.stderr[-3000:]}")
        results[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[path]
        print(
            f"{path}: {r['images_per_s']:.0f} images/s ({r['images']} images, epoch {r['epoch_s']:.1f} s, load "
            f"{r['load_s']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB, train loss {r['train_loss']:.4f})"
        )
    same = results["streaming"]["train_loss"] == results["memory"]["train_loss"]
    print(f"same training loss on both paths: {same}")
    ratio = results["streaming"]["images_per_s"] / results["memory"]["images_per_s"]
    print(f"peak_rss_gb={results['streaming']['peak_rss_gb']:.3f}")
    print(f"ratio_streaming={ratio:.3f}")
    return {"peak_rss_gb": results["streaming"]["peak_rss_gb"], "ratio_streaming": ratio}


if __name__ == "__main__":
    main()
