"""Running the kit's work as several processes: one thread budget per process, and specialists as submitit jobs.

Every process the kit starts (or that runs a stage) sets its torch intra-op threads to its share of
the cores and logs it, because two PyTorch processes with the default threads on the same cores slow
each other down many times over (docs in ``/work/shared/FACTS.md``):

>>> set_thread_budget(None, jobs=2)        # logs "[threads] 1 torch thread (2 cores / 2 jobs)"

Independent specialists go through ``submitit`` (Slurm on a cluster, its local executor on one
machine): :func:`launch_specialists`, or ``specialkit specialists --run R --launcher submitit``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .config import ConfigError

__all__ = ["affinity_cores", "jobs_at_once_here", "thread_budget", "set_thread_budget"]


def affinity_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. what Slurm or ``taskset`` granted)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def jobs_at_once_here() -> int:
    """How many processes of this kind share the machine: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def thread_budget(threads: int | None = None, *, jobs: int | None = None, cores: int | None = None) -> int:
    """Torch intra-op threads for one process: ``threads`` if given, else ``cores // jobs`` (at least 1).

    Args:
        threads: an explicit budget (``--threads``); must be at least 1.
        jobs: processes running at once on these cores (default :func:`jobs_at_once_here`).
        cores: cores to share (default :func:`affinity_cores`).
    """
    if threads is not None:
        if int(threads) < 1:
            raise ConfigError(f"--threads {threads}: a process needs at least 1 thread; pass --threads 1 or more")
        return int(threads)
    jobs = jobs_at_once_here() if jobs is None else jobs
    if jobs < 1:
        raise ConfigError(f"jobs at once must be at least 1, got {jobs}; pass --jobs-at-once 1 or more")
    return max(1, (affinity_cores() if cores is None else cores) // jobs)


def set_thread_budget(threads: int | None = None, *, jobs: int | None = None, log: Callable[[str], None] = print) -> int:
    """Set ``torch.set_num_threads`` to :func:`thread_budget` and log one ``[threads]`` line; returns it."""
    cores = affinity_cores()
    jobs = jobs_at_once_here() if jobs is None else jobs
    n = thread_budget(threads, jobs=jobs, cores=cores)
    torch.set_num_threads(n)
    got = torch.get_num_threads()
    why = f"--threads {threads}; {cores} cores" if threads is not None else f"{cores} cores / {jobs} job{'s' if jobs != 1 else ''}"
    log(f"[threads] {got} torch thread{'s' if got != 1 else ''} ({why})")
    return got
