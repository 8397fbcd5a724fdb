"""Training throughput: specialkit's ``fit`` against a bare, minimal PyTorch loop.

Both train the same model (same initial weights) with the same optimizer (SGD, Nesterov), batch size,
number of steps and memory format on the same synthetic in-memory 32x32 ``uint8`` data; the bare loop
indexes a batch, converts it to float and steps, nothing else. The kit runs with augmentation off
(an apples-to-apples comparison of loop overhead) and, unless ``--no-augment-run``, once more with
its default augmentation (random translation) to show what that costs. The runs alternate and each
is repeated ``--repeats`` times; the best time of each counts (the machine may be shared).

    python bench/train_throughput.py                 # ~30-50 s on 2 CPU cores
    python bench/train_throughput.py --model resnet18 --steps 10 --batch-size 64

Prints images/s of each and the ratio kit / bare (target >= 0.9), by wall time and by CPU time of the
process (the CPU-time ratio is the steadier one on a shared machine; use ``--threads 1`` there).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

from specialkit.models import ModelConfig, build_model, count_parameters
from specialkit.training import TrainConfig, fit, resolve_device


def bare_loop(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    channels_last: bool,
    device: torch.device,
) -> tuple[float, float]:
    """(wall, CPU) seconds for ``steps`` plain SGD steps over in-memory uint8 data."""
    model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(device)
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
        xb = x[idx].float().div_(255)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def kit_fit(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    channels_last: bool,
    device: torch.device,
    augment: bool,
) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``fit`` call: one epoch of exactly ``steps`` steps."""
    config = TrainConfig(
        epochs=1,
        batch_size=batch_size,
        lr=lr,
        schedule="onecycle",
        augment=augment,
        channels_last=channels_last,
        device=str(device),
        progress=False,
        amp=False,
    )
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fit(model, x[: steps * batch_size], y[: steps * batch_size], config=config)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=25, help="timed optimisation steps per run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="cnn", help="registry name: cnn or resnet18")
    parser.add_argument("--width", type=int, default=32, help="cnn width")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best time counts")
    parser.add_argument("--nchw", action="store_true", help="use NCHW instead of channels-last for both loops")
    parser.add_argument("--no-augment-run", action="store_true", help="skip the kit run with augmentation")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    channels_last = not args.nchw
    torch.manual_seed(0)
    base = build_model(
        ModelConfig(name=args.model, num_classes=args.classes, in_channels=args.channels, width=args.width)
    )
    n = args.steps * args.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, args.channels, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    print(
        f"{args.model}: {count_parameters(base) / 1e6:.2f} M params, batch {args.batch_size}, {args.steps} steps, "
        f"{'channels-last' if channels_last else 'NCHW'}, {device}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=0.05, channels_last=channels_last, device=device)
    warm = copy.deepcopy(base)
    bare_loop(warm, x, y, **{**common, "steps": min(3, args.steps)})  # warm-up: allocator, kernels

    runs = {"bare": [], "kit": []} | ({} if args.no_augment_run else {"kit+augment": []})
    for _ in range(args.repeats):
        runs["bare"].append(bare_loop(copy.deepcopy(base), x, y, **common))
        runs["kit"].append(kit_fit(copy.deepcopy(base), x, y, augment=False, **common))
        if "kit+augment" in runs:
            runs["kit+augment"].append(kit_fit(copy.deepcopy(base), x, y, augment=True, **common))
    rates = {k: n / min(w for w, _ in v) for k, v in runs.items()}
    cpu_rates = {k: n / min(c for _, c in v) for k, v in runs.items()}
    for k, rate in rates.items():
        times = ", ".join(f"{w:.2f}s" for w, _ in runs[k])
        print(f"{k:>12}: {rate:8.1f} images/s wall, {cpu_rates[k]:8.1f} images per CPU-second   (wall: {times})")
    for k in [k for k in rates if k != "bare"]:
        print(
            f"ratio {k} / bare: {rates[k] / rates['bare']:.3f} (wall), {cpu_rates[k] / cpu_rates['bare']:.3f} (CPU time)"
        )
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        print(
            "note: the machine is busy (load average above the core count): wall times are noisy; trust the "
            "CPU-time ratio of a --threads 1 run"
        )
    return rates


if __name__ == "__main__":
    main()
