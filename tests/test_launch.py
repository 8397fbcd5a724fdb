"""Thread budgets and the submitit launcher, through real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specialkit import launch, pipeline
from specialkit.config import ConfigError, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    per_class=6,
    epochs=1,
    specialist_epochs=1,
    k=2,
    width=4,
    depth=1,
    compute_matched=False,
    student_matched=False,
    rules=("generalist", "kl"),
)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("LOCAL_WORLD_SIZE", None)
    return {k: v for k, v in env.items() if v != ""}  # an empty value unsets the variable


def _cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "specialkit.cli", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A tiny run whose generalist and clusters are done (specialists not yet)."""
    run = pipeline.Run(tmp_path_factory.mktemp("launch") / "tiny", PipelineConfig.quick(**TINY), log=lambda s: None)
    run.generalist()
    run.clusters()
    return run.folder


def test_thread_budget_divides_the_affinity_cores():
    assert launch.thread_budget(jobs=3, cores=8) == 2
    assert launch.thread_budget(jobs=4, cores=2) == 1
    assert launch.thread_budget(5, jobs=4, cores=2) == 5
    with pytest.raises(ConfigError, match="--threads 1 or more"):
        launch.thread_budget(0)


def test_set_thread_budget_logs_and_sets(one_thread):
    lines: list[str] = []
    before = torch.get_num_threads()
    try:
        assert launch.set_thread_budget(None, jobs=launch.affinity_cores(), log=lines.append) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    cores = launch.affinity_cores()
    assert lines == [f"[threads] 1 torch thread ({cores} cores / {cores} job{'s' if cores != 1 else ''})"]


def test_cli_threads_flag_in_a_real_process(clustered):
    out = _cli("clusters", "--run", str(clustered), "--threads", "1", OMP_NUM_THREADS="2")
    assert out.returncode == 0, out.stderr
    assert "[threads] 1 torch thread (--threads 1;" in out.stdout
    default = _cli("clusters", "--run", str(clustered), LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="")
    cores = launch.affinity_cores()
    assert f"[threads] {cores} torch thread{'s' if cores != 1 else ''} ({cores} cores / 1 job)" in default.stdout
    user = _cli("clusters", "--run", str(clustered), OMP_NUM_THREADS="1")  # the user's own budget is kept
    assert "[threads] 1 torch thread (OMP_NUM_THREADS=1 in the environment" in user.stdout
    bad = _cli("clusters", "--run", str(clustered), "--threads", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--threads 1 or more" in bad.stderr


def test_submitit_launcher_trains_missing_specialists_only(clustered, tmp_path):
    import shutil

    from specialkit import runs

    folder = tmp_path / "run"
    shutil.copytree(clustered, folder)
    flags = (
        "specialists",
        "--run",
        str(folder),
        "--launcher",
        "submitit",
        "--submitit-cluster",
        "local",
        "--jobs-at-once",
        "2",
        "--cpus-per-job",
        "1",
        "--timeout-min",
        "5",
    )
    with runs.RunLock(
        folder, name=".lock-specialist-1", log=lambda s: None
    ):  # another launcher is training specialist 1
        first = _cli(*flags)
    assert first.returncode != 0, first.stdout
    assert "submitting 2 jobs (local): specialists 0, 1; 2 at once, 1 thread each" in first.stdout
    assert (
        "1 of 2 specialists failed" in first.stderr
        and "specialist 1: job" in first.stderr
        and "is in use by" in first.stderr
    )
    log_path = Path(first.stderr.split("log: ")[1].split()[0])
    assert log_path.is_file() and "RunLockedError" in log_path.read_text()
    run = pipeline.Run.open(folder, log=lambda s: None)
    assert launch.missing_specialists(run) == [1]
    done0 = run.specialist_dir(0) / "done.json"
    stamp = done0.stat().st_mtime_ns
    job0_log = next(p for p in (folder / "jobs").glob("*_0_log.out"))
    assert "[threads] 1 torch thread (--threads 1;" in job0_log.read_text()

    second = _cli(*flags)
    assert second.returncode == 0, second.stderr
    assert "submitting 1 job (local): specialists 1;" in second.stdout
    assert done0.stat().st_mtime_ns == stamp  # the finished specialist was not trained again
    run = pipeline.Run.open(folder, log=lambda s: None)
    assert launch.missing_specialists(run) == [] and run.is_done("specialists")
    assert [len(s.classes) for s in run.specialists()] == [len(g) for g in run.clusters().groups.values()]
    third = _cli(*flags)
    assert third.returncode == 0 and "nothing to submit" in third.stdout


def test_job_flags_need_the_submitit_launcher(clustered):
    out = _cli("specialists", "--run", str(clustered), "--jobs-at-once", "2")
    assert out.returncode == 2 and "--jobs-at-once only apply to jobs: add --launcher submitit" in out.stderr


def test_a_killed_job_is_reported_and_its_rerun_resumes_from_the_last_saved_epoch(clustered, tmp_path):
    import json
    import shutil
    import signal
    import time

    folder = tmp_path / "run"
    shutil.copytree(clustered, folder)
    cfg = PipelineConfig.load(folder / "config.json").replace(specialist_epochs=40)
    run = pipeline.Run(folder, cfg, overwrite=True, log=lambda s: None)  # long enough to be killed mid-way
    state, lock = run.specialist_dir(0) / "state.pt", folder / ".lock-specialist-0"
    flags = (
        "specialists",
        "--run",
        str(folder),
        "--launcher",
        "submitit",
        "--submitit-cluster",
        "local",
        "--jobs-at-once",
        "1",
        "--cpus-per-job",
        "1",
        "--timeout-min",
        "5",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "specialkit.cli", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while not (state.is_file() and lock.is_file() and lock.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the job never saved an epoch"
        time.sleep(0.1)
    os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)  # the job's own process, mid-training
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "specialist 0: job" in err and "log: " in err, out + err
    saved = torch.load(state, weights_only=True)["history"]["records"]
    assert 0 < len(saved) < 40  # killed after at least one saved epoch, before the end
    second = _cli(*flags)
    assert second.returncode == 0, second.stderr
    history = pipeline.Run.open(folder, log=lambda s: None).specialists()[0].history
    assert len(history) == 40
    # the first epochs are the saved ones (their wall times are the killed job's), not trained again
    assert [r["seconds"] for r in history[: len(saved)]] == [r["seconds"] for r in saved]


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_the_kit_makes_openmp_wait_passively_unless_told_otherwise(given, expected):
    """``import specialkit`` (so the CLI, notebook kernels and job workers) sets OMP_WAIT_POLICY before torch
    loads its OpenMP runtime; a policy the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = "import sys, os, specialkit; assert 'torch' not in sys.modules; import torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected
