"""Drivers: what runs many runs. Above the stages (:mod:`specialkit.pipeline`) and the numbers
(:mod:`specialkit.metrics`, :mod:`specialkit.report`), below the command line.

* :func:`seed_runs` / :func:`run_seeds` — one run folder per seed and the between-seed table;
* :func:`width_run` / :func:`variant_run` — the frontier's extra runs (``bench/frontier.py``): a generalist of another
  width for the base run's training budget, and the base run with other specialists;
* one run's stages in order are ``Run.run_all`` (:mod:`specialkit.pipeline`: the facade calls the numbers below it);
* the study (a grid of runs over settings and seeds) is :mod:`specialkit.study`, a driver too.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from . import cost, models, runs, stages, store
from .config import ConfigError, PipelineConfig
from .metrics import aggregate_seeds
from .pipeline import Run
from .report import write_seeds_report

__all__ = ["seed_runs", "run_seeds", "width_run", "variant_run"]


def _seed_settings(config: PipelineConfig) -> dict[str, Any]:
    """The settings every seed of a multi-seed run shares (everything but ``seed``, ``seeds``, ``progress``)."""
    return {k: v for k, v in config.to_dict().items() if k not in ("seed", "seeds", "progress", "name")}


def seed_runs(parent: str | Path, config: PipelineConfig, *, log: Callable[[str], None] = print) -> dict[int, Run]:
    """One run folder per seed of ``config.seeds`` under ``parent`` (``parent/seed-<s>/``), sharing one dataset.

    ``parent/seeds.json`` records the shared settings; a parent that holds a single run (a
    ``config.json``) or seeds of other settings is a ``ConfigError`` naming the differing keys.
    """
    if not config.seeds:
        raise ConfigError("seeds is not set: pass --seeds 0 1 2 (or seeds=[...] in the config) for a multi-seed run")
    parent = Path(parent)
    if (parent / "config.json").is_file():
        raise ConfigError(f"{parent} holds a single run (config.json): give the multi-seed run another name (--name)")
    marker = parent / store.SEEDS_FILE
    shared = _seed_settings(config)
    if marker.is_file():
        old = runs.read_json(marker).get("settings", {})
        diff = sorted(k for k in set(old) | set(shared) if old.get(k) != shared.get(k))
        if diff:
            raise ConfigError(
                f"{parent} holds seeds of other settings (differing: {', '.join(diff)}): use another --name, "
                f"or move that folder away"
            )
    parent.mkdir(parents=True, exist_ok=True)
    seeds = sorted(set(config.seeds) | set(runs.read_json(marker).get("seeds", []) if marker.is_file() else []))
    runs.atomic_write_json(marker, {"settings": shared, "seeds": seeds})
    out, ds = {}, None
    for s in config.seeds:
        cfg = config.replace(seed=s, seeds=None, name=f"{config.name}-seed{s}")
        run = Run(parent / f"seed-{s}", cfg, log=log)
        if ds is None:
            ds = run.dataset()
        else:
            run.share_dataset(ds)
        out[s] = run
    return out


def run_seeds(parent: str | Path, config: PipelineConfig, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every stage of every seed (:func:`seed_runs`; finished stages are loaded), then the between-seed table:
    ``parent/metrics.json`` (key ``seeds``) and ``parent/report.html``. Returns that metrics dict."""
    per_seed = {}
    for s, run in seed_runs(parent, config, log=log).items():
        log(f"[seeds] seed {s}: {run.folder}")
        per_seed[s] = run.run_all()
    summary = {
        "run": config.name,
        "seeds": aggregate_seeds(per_seed),
        "runs": {str(s): str(Path(parent) / f"seed-{s}") for s in per_seed},
    }
    runs.atomic_write_json(Path(parent) / "metrics.json", summary)
    write_seeds_report(Path(parent), summary, per_seed)
    return summary


def width_run(base: Run, width: int, folder: str | Path) -> Run:
    """A generalist of ``width`` (the base run's architecture otherwise) trained for the base run's total training
    budget (:func:`specialkit.cost.budget_flops`), in its own run folder; trained here unless already done."""
    ds = base.dataset()
    cfg = base.model_config(num_classes=ds.num_classes, width=width)
    per_pass = cost.train_flops_per_example(models.build_model(cfg), (1, ds.channels, ds.image_size, ds.image_size))
    epochs = cost.matched_epochs(cost.budget_flops(base.view()), per_pass, len(ds.y_train))
    run = Run(
        Path(folder),
        base.config.replace(name=f"width{width}", width=width, epochs=epochs, compute_matched=False),
        overwrite=True,
        log=base.log,
    )
    run.share_dataset(ds)
    run.generalist()
    return run


def variant_run(base: Run, folder: str | Path, *, from_stage: str = "specialists", **settings: Any) -> Run:
    """The base run with other ``settings`` of ``from_stage`` and later (e.g. ``specialist_shared_stages=2``, or
    ``student_epochs=6`` with ``from_stage="distill"``) in its own folder: the finished stages ``from_stage`` depends on
    are copied there from the base run (for the specialists: its generalist and groups), so only ``from_stage`` and
    what follows it are trained (the ensembles are made here)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in stages.needs_all(from_stage):  # the stages before it
        if (base.folder / name).is_dir() and not (folder / name).exists():
            shutil.copytree(base.folder / name, folder / name)
    for name in ("clusters.json",):
        if (base.folder / name).is_file() and not (folder / name).exists():
            shutil.copy2(base.folder / name, folder / name)
    run = Run(folder, base.config.replace(name=folder.name, **settings), overwrite=True, log=base.log)
    run.share_dataset(base.dataset())
    run.ensembles()
    return run
