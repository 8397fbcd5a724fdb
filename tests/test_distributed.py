"""torchrun with 2 CPU processes (gloo) trains the generalist; the result matches a single-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specialkit import checkpoints, distributed, pipeline
from specialkit.config import PipelineConfig
from specialkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(
    per_class=10,
    epochs=2,
    k=2,
    width=8,
    depth=1,
    compute_matched=False,
    student_matched=False,
    rules=("generalist", "kl"),
)
# Different trajectories (global batch 2 x 64 at the same learning rate, other augmentation draws), same data:
# on 124 test images the s.e. of an accuracy difference is about 0.06, so 0.15 is ~2.5 s.e.
TOLERANCE = 0.15


def test_shard_is_the_identity_outside_a_process_group():
    order = torch.arange(7)
    assert distributed.rank_and_world() == (0, 1) and torch.equal(distributed.shard(order), order)


def test_the_backend_is_nccl_with_a_gpu_per_process_gloo_without_and_the_variable_chooses():
    assert distributed.choose_backend(None, 0, 0) == ("gloo", None)
    assert distributed.choose_backend("", 1, 2) == ("nccl", 1)
    assert distributed.choose_backend("gloo", 3, 2) == ("gloo", 1)  # gloo shares the GPUs: rank 3 on GPU 1
    assert distributed.choose_backend(" GLOO ", 0, 0) == ("gloo", None)
    with pytest.raises(
        ConfigError, match=r"no GPU of its own \(1 here\).*--nproc-per-node 1.*SPECIALKIT_DIST_BACKEND=gloo"
    ):
        distributed.choose_backend(None, 1, 1)
    with pytest.raises(ConfigError, match="needs CUDA"):
        distributed.choose_backend("nccl", 0, 0)
    with pytest.raises(ConfigError, match="'mpi' is not a backend: use one of nccl, gloo"):
        distributed.choose_backend("mpi", 0, 0)


def _torchrun(folder: Path, nproc: int = 2) -> list[str]:
    """``torchrun --nproc-per-node nproc`` of ``specialkit generalist`` on the run ``folder``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "specialkit.cli",
        "generalist",
        "--run-folder",
        str(folder),
    ]


def test_a_backend_this_machine_cannot_run_is_one_line_per_rank(tmp_path):
    run = pipeline.Run(tmp_path / "ddp", PipelineConfig.quick(**SETTINGS), log=lambda s: None)
    backend = "nccl" if not torch.cuda.is_available() else "mpi"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", distributed.BACKEND_ENV: backend}
    out = subprocess.run(_torchrun(run.folder), capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("specialkit: error:")]
    assert len(lines) == 2 and all("SPECIALKIT_DIST_BACKEND" in line for line in lines), out.stderr[-2000:]
    assert "exitcode: 2" in out.stderr  # the kit's exit code for bad settings (torchrun adds its own traceback)
    assert not (run.stage_dir("generalist") / "state.pt").exists()


def test_torchrun_two_gloo_processes_train_a_generalist(tmp_path):
    cfg = PipelineConfig.quick(**SETTINGS)
    ddp = pipeline.Run(tmp_path / "ddp", cfg, log=lambda s: None)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "60"}
    out = subprocess.run(
        _torchrun(ddp.folder),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("[threads] 1 torch thread (") == 2
    folder = ddp.folder / "generalist"
    assert (folder / "done.json").is_file() and not (folder / "state.pt").exists()

    single = pipeline.Run(tmp_path / "single", cfg, log=lambda s: None)
    torch.set_num_threads(1)
    ref = single.generalist()
    got = pipeline.Run.open(ddp.folder, log=lambda s: None).generalist()  # loads in this single process
    model, info = checkpoints.load_checkpoint(folder / "model.pt")
    assert set(model.state_dict()) == set(ref.model.state_dict())  # no DDP "module." prefix: the same format
    assert got.examples_seen == ref.examples_seen == 2 * 620 and len(got.history) == len(ref.history) == 2
    y = single.dataset().y_test.numpy()
    acc_ddp, acc_ref = (
        float(np.mean(got.logits["test"].argmax(1) == y)),
        float(np.mean(ref.logits["test"].argmax(1) == y)),
    )
    assert abs(acc_ddp - acc_ref) <= TOLERANCE, (acc_ddp, acc_ref)
    assert not np.allclose(got.logits["test"], ref.logits["test"])  # really trained apart, not copied


def test_a_rank_that_dies_stops_the_job_and_the_rerun_resumes(tmp_path):
    import signal
    import time

    cfg = PipelineConfig.quick(**{**SETTINGS, "epochs": 30})
    run = pipeline.Run(tmp_path / "ddp", cfg, log=lambda s: None)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "30"}
    cmd = _torchrun(run.folder)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    state = run.stage_dir("generalist") / "state.pt"
    deadline = time.monotonic() + 120
    while not state.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no epoch was saved"
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    rank1 = next(int(p) for p in workers if b"RANK=1\x00" in Path(f"/proc/{p}/environ").read_bytes())
    t0 = time.monotonic()
    os.kill(rank1, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.monotonic() - t0 < 90  # the other rank stopped: no hang
    assert "Failures:" in err and "rank" in err, err[-1500:]  # torchrun names the failed rank
    assert state.is_file() and not (run.stage_dir("generalist") / "done.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    got = pipeline.Run.open(run.folder, log=lambda s: None).generalist()
    assert len(got.history) == 30 and got.examples_seen == 30 * 620
