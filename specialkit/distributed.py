"""One model trained by several processes: ``torchrun`` + ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 2 -m specialkit.cli generalist --run-folder runs/X

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in each process;
:func:`init_from_env` joins the process group with a timeout, so a rank that dies makes the others
stop with an error instead of waiting for ever. Every rank draws the same epoch order from the shared
seeded generator and trains on its slice (:func:`shard`); ``DistributedDataParallel`` averages the
gradients (:func:`wrap`); only rank 0 writes files (:func:`is_main`). Outside torchrun all of this
is a no-op: one process, world size 1.

The backend is NCCL where CUDA is available (one GPU per process on the node) and gloo otherwise;
``$SPECIALKIT_DIST_BACKEND`` (``nccl`` or ``gloo``) chooses. gloo with CUDA lets more processes than
GPUs share them (process ``LOCAL_RANK`` on GPU ``LOCAL_RANK mod count``): two processes on one GPU, as
``tools/device_check.sh`` runs them.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

__all__ = [
    "TIMEOUT_ENV",
    "BACKEND_ENV",
    "choose_backend",
    "requested",
    "init_from_env",
    "rank_and_world",
    "is_main",
    "barrier",
    "shard",
    "wrap",
    "all_reduce_sum",
    "close",
]

TIMEOUT_ENV = "SPECIALKIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300
BACKEND_ENV = "SPECIALKIT_DIST_BACKEND"
BACKENDS = ("nccl", "gloo")


def choose_backend(requested_backend: str | None, local_rank: int, cuda_devices: int) -> tuple[str, int | None]:
    """(backend, the CUDA device this process uses or None for the CPU) for process ``local_rank`` of a node
    with ``cuda_devices`` GPUs; ``requested_backend`` (``$SPECIALKIT_DIST_BACKEND``) None or "" = NCCL with
    CUDA, gloo without. NCCL needs one GPU per process; gloo shares them (``local_rank mod cuda_devices``)."""
    backend = (requested_backend or ("nccl" if cuda_devices else "gloo")).strip().lower()
    if backend not in BACKENDS:
        raise ConfigError(f"{BACKEND_ENV}={requested_backend!r} is not a backend: use one of {', '.join(BACKENDS)}")
    if not cuda_devices:
        if backend == "nccl":
            raise ConfigError(f"{BACKEND_ENV}=nccl needs CUDA, and this machine has no GPU: unset it (gloo on CPU)")
        return backend, None
    if backend == "nccl" and local_rank >= cuda_devices:
        raise ConfigError(
            f"process {local_rank} of this node has no GPU of its own ({cuda_devices} here) and NCCL needs one per "
            f"process: start at most {cuda_devices} per node (torchrun --nproc-per-node {cuda_devices}), or set "
            f"{BACKEND_ENV}=gloo to share the GPUs"
        )
    return backend, local_rank % cuda_devices


def requested() -> bool:
    """True when this process was started by torchrun (or the like) with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; start with torchrun") from err


def init_from_env(*, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (:func:`choose_backend`: gloo on CPU, NCCL when CUDA is
    available, else ``$SPECIALKIT_DIST_BACKEND``); True if joined. With CUDA, the process's GPU becomes the
    current device.

    ``timeout_s`` (default ``$SPECIALKIT_DIST_TIMEOUT_S`` or 300 s) bounds every collective: a rank that
    died makes the others fail after it.
    """
    if not requested() or dist.is_initialized():
        return dist.is_initialized()
    seconds = float(timeout_s if timeout_s is not None else os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend, gpu = choose_backend(os.environ.get(BACKEND_ENV), local_rank, cuda)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return True


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's slice of an epoch's (N,) example order: ``order[rank::world]`` of its first
    ``N // world * world`` entries, so every rank takes the same number of steps."""
    rank, world = rank_and_world()
    if world == 1:
        return order
    if len(order) < world:
        raise ConfigError(
            f"an epoch of {len(order)} examples cannot be split over {world} processes; use fewer processes"
        )
    return order[: len(order) // world * world][rank::world]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (gradients averaged over ranks); the model itself outside a group."""
    if rank_and_world()[1] == 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (``t`` itself outside a group)."""
    if rank_and_world()[1] > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def close() -> None:
    """Leave the process group (at the end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
