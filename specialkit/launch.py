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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import pipeline, runs
from .config import ConfigError

__all__ = [
    "affinity_cores",
    "jobs_at_once_here",
    "thread_budget",
    "set_thread_budget",
    "LaunchError",
    "JobSettings",
    "missing_specialists",
    "train_specialists_job",
    "launch_specialists",
]


class LaunchError(ConfigError):
    """Some jobs failed; the message names each one and its log file, and says to rerun."""


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


def _omp_threads() -> int | None:
    """A whole ``OMP_NUM_THREADS`` >= 1 set in the environment (the user's own budget), else None."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


def set_thread_budget(
    threads: int | None = None, *, jobs: int | None = None, log: Callable[[str], None] = print
) -> int:
    """Set ``torch.set_num_threads`` and log one ``[threads]`` line; returns the count. The budget is
    ``threads`` (``--threads``) if given; else, when ``jobs`` is not given, an ``OMP_NUM_THREADS`` the user
    set (torchrun sets it too); else :func:`thread_budget` (the cores divided by the jobs at once)."""
    cores = affinity_cores()
    omp = _omp_threads() if threads is None and jobs is None else None
    jobs = jobs_at_once_here() if jobs is None else jobs
    n = omp or thread_budget(threads, jobs=jobs, cores=cores)
    torch.set_num_threads(n)
    got = torch.get_num_threads()
    if threads is not None:
        why = f"--threads {threads}; {cores} cores"
    elif omp:
        why = f"OMP_NUM_THREADS={omp} in the environment; {cores} cores"
    else:
        why = f"{cores} cores / {jobs} job{'s' if jobs != 1 else ''}"
    log(f"[threads] {got} torch thread{'s' if got != 1 else ''} ({why})")
    return got


# ---------------------------------------------------------------------------------------------- submitit
@dataclass(frozen=True)
class JobSettings:
    """What each submitit job asks for.

    Attributes:
        cluster: ``None`` lets ``submitit.AutoExecutor`` choose (Slurm where ``srun`` exists, else local);
            ``"local"``, ``"slurm"`` or ``"debug"`` (in this process) force one.
        jobs_at_once: jobs running side by side (``None``: as many as there are jobs on Slurm, and
            ``min(jobs, cores)`` on this machine).
        cpus_per_job: cores (= torch threads) of each job (``None``: this machine's cores // ``jobs_at_once``).
        gpus_per_job: GPUs of each job.
        timeout_min: a job still running after this many minutes is stopped (it resumes on the next launch).
        slurm_partition: the Slurm partition (ignored by the local executor).
    """

    cluster: str | None = None
    jobs_at_once: int | None = None
    cpus_per_job: int | None = None
    gpus_per_job: int = 0
    timeout_min: int = 240
    slurm_partition: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.cluster in (None, "local", "slurm", "debug"), "--submitit-cluster must be local, slurm or debug"),
            (self.jobs_at_once is None or self.jobs_at_once >= 1, "--jobs-at-once must be at least 1"),
            (self.cpus_per_job is None or self.cpus_per_job >= 1, "--cpus-per-job must be at least 1"),
            (self.gpus_per_job >= 0, "--gpus-per-job must be 0 or more"),
            (self.timeout_min >= 1, "--timeout-min must be at least 1 (minutes)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; fix the flag and rerun")


def missing_specialists(run: Any) -> list[int]:
    """Indices of the run's specialists that are not finished with their current key (the ones to train)."""
    n = len(run.clusters().groups)
    return [i for i in range(n) if not run.is_done("specialists", run.specialist_key(i), run.specialist_dir(i))]


def train_specialists_job(folder: str, indices: list[int], threads: int) -> list[int]:
    """One submitit job: the specialists ``indices`` of the run in ``folder``, one after another, under one thread
    budget (so the job pays Python's and torch's start-up once) and, for each, the same locks as
    ``specialkit train-specialist`` (shared on the run, exclusive on that specialist), so two launchers never
    train the same specialist at once. A specialist that fails does not stop the others; the job then fails
    naming each one. Returns the indices trained."""
    set_thread_budget(threads)
    done, errors = [], []
    for index in indices:
        try:
            with runs.RunLock(folder, shared=True), runs.RunLock(folder, name=f".lock-specialist-{index}"):
                run = pipeline.Run.open(folder)
                sp = run.train_specialist(index)
                print(
                    f"specialist {index}: {len(sp.classes)} classes, saved in {run.specialist_dir(index)}", flush=True
                )
            done.append(index)
        except Exception as err:  # noqa: BLE001 - reported per specialist, the job's others still train
            print(f"specialist {index} failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            errors.append(f"specialist {index}: {type(err).__name__}: {err}")
    if errors:
        raise RuntimeError("; ".join(errors))
    return done


def _executor(folder: Path, settings: JobSettings, *, jobs_at_once: int, cpus: int) -> Any:
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster=settings.cluster)
    executor.update_parameters(
        name="specialkit-specialist",
        timeout_min=settings.timeout_min,
        cpus_per_task=cpus,
        gpus_per_node=settings.gpus_per_job,
        slurm_array_parallelism=jobs_at_once,
        slurm_partition=settings.slurm_partition,
    )
    return executor


def launch_specialists(
    run: Any, settings: JobSettings = JobSettings(), *, log: Callable[[str], None] = print
) -> list[int]:
    """Train the run's unfinished specialists as submitit jobs and wait for them.

    The generalist and clusters are made first (under the run's exclusive lock). Finished specialists
    are never resubmitted. Each job runs :func:`train_specialists_job` with ``cpus_per_job`` threads; job
    files and logs go to ``<run>/jobs/``. On Slurm the jobs are one array, one task per specialist, with
    ``jobs_at_once`` running; submitit's local executor starts every job it is given at once, so on this
    machine ``jobs_at_once`` jobs each train their share of the specialists one after another (each job
    pays Python's and torch's start-up once). When every specialist is done, the stage is marked done.

    Returns:
        the indices that were trained.

    Raises:
        LaunchError: some jobs failed; one line per job with its log path (rerun to resubmit only those).
    """
    with run.lock():
        run.generalist()
        run.clusters()
        todo = missing_specialists(run)
    if not todo:
        log(f"[specialists] all {len(run.clusters().groups)} specialists are done; nothing to submit")
    else:
        _submit(run, todo, settings, log=log)
    with run.lock():
        run.specialists()
    return todo


LOCAL_RESULT_WAIT_S = 3
"""Seconds submitit waits for a finished local job's result file before calling the job failed (its default, 15, is
for cluster filesystems that show a file late); a killed local job is reported this much sooner."""


def _submit(run: Any, todo: list[int], settings: JobSettings, *, log: Callable[[str], None]) -> None:
    cores = affinity_cores()
    local = settings.cluster in ("local", "debug") or (settings.cluster is None and _which() != "slurm")
    at_once = settings.jobs_at_once or (min(len(todo), cores) if local else len(todo))
    cpus = settings.cpus_per_job or max(1, cores // at_once)
    executor = _executor(run.folder / "jobs", settings, jobs_at_once=at_once, cpus=cpus)
    # Slurm: one array task per specialist (it throttles the array itself). This machine: submitit's local
    # executor starts every job at once, so `at_once` jobs each train their share one after another.
    at_once = min(at_once, len(todo))
    chunks = [todo[k::at_once] for k in range(at_once)] if local else [[i] for i in todo]
    log(
        f"[specialists] submitting {len(chunks)} job{'s' if len(chunks) != 1 else ''} ({executor.cluster}): specialists "
        f"{', '.join(map(str, todo))}; {at_once} at once, {cpus} thread{'s' if cpus != 1 else ''} each"
    )
    jobs = executor.map_array(train_specialists_job, [str(run.folder)] * len(chunks), chunks, [cpus] * len(chunks))
    if local:  # a finished local job's result is on this disk at once; submitit waits 15 s for slow cluster filesystems
        for job in jobs:
            job._results_timeout_s = LOCAL_RESULT_WAIT_S
    log(f"[specialists] jobs {', '.join(j.job_id for j in jobs)} (logs in {run.folder / 'jobs'})")
    failed: list[str] = []
    for chunk, job in zip(chunks, jobs):
        err = job.exception()
        if err is None:
            log(
                f"[specialists] specialist{'s' if len(chunk) != 1 else ''} {', '.join(map(str, chunk))}: job {job.job_id} finished"
            )
            continue
        last = [line for line in str(err).splitlines() if line.strip() and not line.startswith("-")]
        reason = next((line for line in reversed(last) if "Error" in line), last[-1] if last else type(err).__name__)
        missing = set(missing_specialists(run))
        for index in chunk:
            if index in missing:
                failed.append(
                    f"specialist {index}: job {job.job_id} failed ({reason.strip()[:300]}); log: {job.paths.stderr}"
                )
    if failed:
        raise LaunchError(
            f"{len(failed)} of {len(todo)} specialists failed; rerun the same command to resubmit only "
            "those:\n  " + "\n  ".join(failed)
        )


def _which() -> str:
    import submitit

    return submitit.AutoExecutor.which()
