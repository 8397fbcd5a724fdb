"""Specialists one after another with all cores against two at a time through the submitit launcher.

Both sides start from fresh copies of the same run folder whose generalist and clusters are done:

(a) ``specialkit specialists --run A --threads <cores>``: the in-process loop, every core to one specialist;
(b) ``specialkit specialists --run B --launcher submitit --submitit-cluster local --jobs-at-once 2
    --cpus-per-job 1``: two jobs side by side, one torch thread each.

    python bench/parallel_specialists.py --quick     # the quick settings' specialists, ~1-2 min on 2 cores
    python bench/parallel_specialists.py             # the demo's (configs/demo.json)

Prints the wall time of each and ``ratio_parallel=<wall b / wall a>`` (below 1: the launcher is faster).
One run each; on a machine shared with other busy processes the number moves, so rerun before relying on it.
(b) includes each job's start-up (a fresh Python importing torch and loading the data), which (a) pays once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from specialkit import launch, pipeline
from specialkit.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def _timed(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "specialkit.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"`specialkit {' '.join(args)}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="the quick settings (PipelineConfig.quick) instead of configs/demo.json"
    )
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args()
    cfg = (
        PipelineConfig.quick(name="bench-parallel")
        if args.quick
        else PipelineConfig.load(ROOT / "configs" / "demo.json").replace(name="bench-parallel", progress=False)
    )
    work = args.keep or Path(tempfile.mkdtemp(prefix="specialkit-bench-"))
    try:
        base = pipeline.Run(work / "base", cfg, log=lambda s: None)
        launch.set_thread_budget(None, jobs=1)
        t0 = time.perf_counter()
        base.generalist()
        n = len(base.clusters().groups)
        print(f"generalist and {n} groups ready in {time.perf_counter() - t0:.1f} s ({launch.affinity_cores()} cores)")
        for side in ("a", "b"):
            shutil.copytree(base.folder, work / side)
        cores = str(launch.affinity_cores())
        wall_a = _timed("specialists", "--run", str(work / "a"), "--threads", cores)
        print(f"(a) one after another, {cores} threads: {wall_a:.1f} s")
        wall_b = _timed(
            "specialists",
            "--run",
            str(work / "b"),
            "--launcher",
            "submitit",
            "--submitit-cluster",
            "local",
            "--jobs-at-once",
            "2",
            "--cpus-per-job",
            "1",
        )
        print(f"(b) submitit, 2 at once, 1 thread each: {wall_b:.1f} s")
        print(f"ratio_parallel={wall_b / wall_a:.3f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
