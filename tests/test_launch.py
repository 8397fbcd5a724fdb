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
TINY = dict(per_class=6, epochs=1, specialist_epochs=1, k=2, width=4, depth=1, compute_matched=False,
            rules=("generalist", "kl"))  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    env.pop("LOCAL_WORLD_SIZE", None)
    return env


def _cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specialkit.cli", *args], capture_output=True, text=True,
                          env=_env(**env), cwd=ROOT, timeout=timeout)  # fmt: skip


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
    default = _cli("clusters", "--run", str(clustered), LOCAL_WORLD_SIZE="1")
    cores = launch.affinity_cores()
    assert f"[threads] {cores} torch thread{'s' if cores != 1 else ''} ({cores} cores / 1 job)" in default.stdout
    bad = _cli("clusters", "--run", str(clustered), "--threads", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--threads 1 or more" in bad.stderr
