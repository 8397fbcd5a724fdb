"""specialkit: explore specialist ensembles (Hinton, Vinyals & Dean 2015, sections 5-6).

Modules, one per pipeline stage: ``data`` (datasets), ``glyphs`` (the offline built-in dataset),
``models``, ``training``, ``checkpoints``, ``runs``, ``confusion``, ``clusters``, ``specialists``,
``ensemble``, ``evaluation``, ``stats`` (intervals and tests), ``metrics`` (every number of a run),
``distill``, ``plots``, ``widgets``, ``config``, ``pipeline``, ``report``, ``cli``, ``launch`` (thread budgets, submitit jobs),
``byog`` (a generalist brought from elsewhere), ``transfer`` (linear probes on frozen features),
``streaming`` (image files read from disk batch by batch), ``frontier`` (accuracy against inference cost),
``inference`` (routing prepared once), ``study`` (a grid of runs over settings and seeds),
``stages`` (the stages, declared once), ``store`` (the run
folder protocol), ``view`` (a run, read-only), ``cost`` (parameters, FLOPs, latency, budgets), ``runner`` (multi-seed
and frontier runs), ``generalist`` and ``ensembles`` (those stages' recipes), ``dataset`` (the container),
``imagefiles`` (decoding one image file), ``errors`` (one base class, exit codes).
Submodules are imported on first use: ``import specialkit; specialkit.data.load("glyphs")``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that spin while they wait for work collapse a process 16-24x as soon as another busy process
# shares the cores. Passive waiting costs a quiet machine little and keeps a busy one usable. It takes effect only
# if torch (its OpenMP runtime) is not loaded yet, which is why it sits here; set OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

_SUBMODULES = {
    "data",
    "glyphs",
    "loaders",
    "models",
    "training",
    "checkpoints",
    "runs",
    "confusion",
    "clusters",
    "specialists",
    "ensemble",
    "evaluation",
    "plots",
    "widgets",
    "config",
    "pipeline",
    "report",
    "cli",
    "stats",
    "metrics",
    "distill",
    "checks",
    "typing",
    "launch",
    "distributed",
    "byog",
    "transfer",
    "streaming",
    "frontier",
    "study",
    "errors",
    "stages",
    "store",
    "view",
    "cost",
    "runner",
    "generalist",
    "ensembles",
    "dataset",
    "imagefiles",
    "inference",
}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'specialkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
