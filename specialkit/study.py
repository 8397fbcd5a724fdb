"""A regime study: a grid over any settings, several seeds each, every point a normal run folder.

    specialkit study --base configs/demo.json --grid width=8,16 per_class=100,300 --seeds 0 1 2 --name widths
    specialkit study configs/study.json            # the same as a JSON (or YAML) study file

``runs/<study>/study.json`` records the definition (base settings, grid, seeds) and, once finished, one
row per point x seed; ``study.csv`` holds the same rows and ``report.html`` a figure per swept key (gain
over the generalist and over the compute-matched generalist, mean with its interval across seeds). Each
point x seed is a run folder ``runs/<study>/<point>/seed-<s>/``.

Points that share upstream settings share those stages: the study runs in three phases -- (0) one
generalist per distinct data + generalist settings, (1) one set of clusters, specialists and
compute-matched generalist per distinct settings up to those stages, (2) every point -- and before each
phase a run *adopts* (hard-links) any finished stage folder of another run of the study whose cache key
(``Run.key``) is its own, so e.g. one generalist serves every k. Killed at any point, the same command
resumes: finished stages are kept and adopted, training resumes from its per-epoch state. Within a phase
the tasks may run as ``jobs`` separate processes (submitit's local executor), one thread budget each
(:func:`specialkit.launch.thread_budget`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import config as config_mod
from . import data, pipeline, runs, stages, store
from . import metrics as metrics_mod
from .config import ConfigError, PipelineConfig, smoke_mode
from .errors import StudyError
from .launch import affinity_cores, set_thread_budget, thread_budget
from .report import write_study_report

__all__ = [
    "StudySpec",
    "StudyError",
    "parse_grid",
    "load_study_file",
    "point_name",
    "Study",
    "run_study",
    "load_study",
    "make_spec",
    "quick_spec",
    "open_study",
    "ADOPTED_FILE",
    "STUDY_FILE",
    "QUICK_STUDY",
]

STUDY_FILE = store.STUDY_FILE
QUICK_STUDY = "quick-study"
"""The name of the tiny study :func:`open_study` makes in quick mode (``SPECIALKIT_SMOKE=1``)."""
ADOPTED_FILE = store.ADOPTED_FILE
"""In a run folder of a study: stage -> the run folder whose finished stage it hard-linked."""
_NOT_SWEPT = ("name", "seed", "seeds", "progress", "extra")
_ADOPTABLE = stages.ADOPTABLE


@dataclass(frozen=True)
class StudySpec:
    """What a study runs: ``base`` settings, the ``grid`` (setting -> values) and the ``seeds``.

    Attributes:
        name: the study folder ``runs/<name>``.
        base: the settings every point starts from (a ``PipelineConfig`` as a dict).
        grid: setting -> the list of its values; points are the grid's cartesian product, in key order.
        seeds: the training seeds of every point.
        jobs: runs at once.
        tie_margin: the equivalence margin of the across-seed readings (a proportion; 0.005 = 0.5 points).
    """

    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: tuple[int, ...] = (0,)
    jobs: int = field(default=1, compare=False)
    tie_margin: float = field(default=0.005, compare=False)

    def definition(self) -> dict[str, Any]:
        """What ``study.json`` records and compares (the base without name/seeds/progress)."""
        base = {k: v for k, v in self.base.items() if k not in ("name", "seeds", "progress")}
        return {
            "base": json.loads(json.dumps(base)),
            "grid": json.loads(json.dumps(self.grid)),
            "seeds": list(self.seeds),
        }

    def points(self) -> list[dict[str, Any]]:
        """Every point: one dict of swept settings per combination, in grid order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def config(self, point: dict[str, Any], seed: int) -> PipelineConfig:
        """The run settings of ``point`` with ``seed`` (a ``StudyError`` names the key of a rejected value)."""
        settings = {
            **self.base,
            **point,
            "seed": seed,
            "seeds": None,
            "name": f"{self.name}-{point_name(point)}-seed{seed}",
        }
        try:
            return PipelineConfig.from_dict(settings, source=f"study {self.name!r}")
        except ConfigError as err:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise StudyError(f"grid point ({shown}) is rejected: {err}; fix that value in the grid") from err


def point_name(point: dict[str, Any]) -> str:
    """The folder name of a point: ``width-8_per_class-100`` (odd characters become ``_``)."""
    parts = [f"{k}-{'none' if v is None else v}" for k, v in point.items()]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(parts)) or "base"
    if len(name) > 100:
        import hashlib

        name = f"{name[:90]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


# ---------------------------------------------------------------------------------------------- building a spec
def _parse_value(key: str, text: str) -> Any:
    """A grid value given as text (:func:`specialkit.config.parse_value`, the syntax of ``--set``)."""
    return config_mod.parse_value(key, text)


def _check_key(key: str) -> None:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    if key not in known:
        try:
            config_mod._check_keys({key: None}, source="--grid")
        except ConfigError as err:
            raise StudyError(f"{err}; fix the grid key") from err
    if key == "seed" or key == "seeds":
        raise StudyError(
            f'grid key {key!r}: seeds are not a grid axis; pass them with --seeds 0 1 2 (or "seeds" in the study file)'
        )
    if key in _NOT_SWEPT or config_mod.stage_of(key) == "run":
        raise StudyError(
            f"grid key {key!r} changes no number (stage 'run'); drop it from the grid (set it in --base instead)"
        )


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["width=8,16", "dataset=glyphs,glyphs_hard"]`` -> ``{"width": [8, 16], "dataset": [...]}``.

    Raises:
        StudyError: an item without ``=``, a key given twice or unknown, no values, a value twice.
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StudyError(f"--grid {item!r}: write key=value1,value2 (e.g. --grid width=8,16)")
        if key in grid:
            raise StudyError(f"--grid gives {key!r} twice; give all its values once: {key}=v1,v2")
        _check_key(key)
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not texts:
            raise StudyError(f"--grid {key}= has no values; give at least one, e.g. {key}=v1,v2")
        grid[key] = [_parse_value(key, t) for t in texts]
    return grid


def _checked_grid(grid: Any, *, source: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise StudyError(
            f"{source}: the grid is empty; give at least one setting and its values, e.g. --grid width=8,16 "
            '(or "grid": {"width": [8, 16]} in the study file)'
        )
    out = {}
    for key, values in grid.items():
        _check_key(key)
        if not isinstance(values, list) or not values:
            raise StudyError(f"{source}: grid key {key!r} needs a non-empty list of values, e.g. [8, 16]")
        seen = [json.dumps(v) for v in values]
        if len(set(seen)) != len(seen):
            raise StudyError(
                f"{source}: grid key {key!r} lists a value more than once ({values}); give each value once"
            )
        out[key] = list(values)
    return out


def make_spec(
    *,
    name: str,
    base: dict[str, Any],
    grid: Any,
    seeds: Sequence[int] | None,
    jobs: int = 1,
    source: str = "study",
    tie_margin_points: float = 0.5,
) -> StudySpec:
    """A checked :class:`StudySpec`: every grid key known and sweepable, every point's settings accepted by
    ``PipelineConfig`` and every dataset name known -- all before any training.

    Raises:
        StudyError: naming the key (and the value) and the fix.
    """
    grid = _checked_grid(grid, source=source)
    seeds = tuple(seeds) if seeds else (0,)
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{source}: seeds {list(seeds)} list a seed more than once; give distinct seeds")
    if jobs < 1:
        raise StudyError(f"{source}: jobs={jobs}; run at least 1 job at once (--jobs 1)")
    if (
        isinstance(tie_margin_points, bool)
        or not isinstance(tie_margin_points, (int, float))
        or not 0 <= tie_margin_points < 100
    ):
        raise StudyError(
            f"{source}: tie margin {tie_margin_points!r} must be a number of points in [0, 100), e.g. --tie-margin 0.5"
        )
    try:
        base_cfg = PipelineConfig.from_dict({**base, "name": name, "seeds": None}, source=f"{source} (base)")
    except ConfigError as err:
        raise StudyError(f"{err}; fix the base settings") from err
    spec = StudySpec(
        name=name, base=base_cfg.to_dict(), grid=grid, seeds=seeds, jobs=jobs, tie_margin=float(tie_margin_points) / 100
    )
    for point in spec.points():
        for s in seeds:
            cfg = spec.config(point, s)
            if cfg.dataset not in data.available():
                raise StudyError(
                    f"grid point {point}: dataset={cfg.dataset!r} is unknown; choose one of {', '.join(data.available())}"
                )
    return spec


def load_study_file(path: str | Path) -> dict[str, Any]:
    """A study file (JSON; YAML when PyYAML is installed and the name ends in .yaml/.yml) as a dict with
    ``name``, ``base`` (a dict of settings or the path of a config JSON, relative to the study file's folder),
    ``set`` (settings that override the base), ``grid``, ``seeds``, ``jobs``; ``base`` comes back merged with ``set``."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(
            f'study file {path} not found; write one like {{"name": "s", "base": "configs/demo.json", '
            '"grid": {"width": [8, 16]}, "seeds": [0, 1]}'
        )
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except ImportError as err:
        raise StudyError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the study as JSON") from err
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError's message
        raise StudyError(
            f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'} ({err}); fix the file"
        ) from err
    except Exception as err:  # noqa: BLE001 - yaml.YAMLError does not derive from ValueError
        raise StudyError(f"{path} is not valid YAML ({err}); fix the file") from err
    if not isinstance(d, dict):
        raise StudyError(f"{path}: a study file is an object with name, base, grid, seeds")
    unknown = sorted(set(d) - {"name", "base", "set", "grid", "seeds", "jobs", "tie_margin"})
    if unknown:
        raise StudyError(
            f"{path}: unknown study key(s) {', '.join(unknown)}; a study file has name, base, set, grid, seeds, jobs"
        )
    base = d.get("base") or {}
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() or Path(base).is_file() else path.parent / base
        base = PipelineConfig.load(base_path).to_dict()
    if not isinstance(d.get("set", {}), dict):
        raise StudyError(f'{path}: "set" holds settings that override the base, e.g. {{"student_epochs": 1}}')
    d["base"] = {**base, **d.get("set", {})}
    return d


# ---------------------------------------------------------------------------------------------- the study folder
class Study:
    """A study folder ``runs/<name>/`` and its run folders."""

    def __init__(self, folder: str | Path, spec: StudySpec):
        self.folder = Path(folder)
        self.spec = spec

    def run_folder(self, point: dict[str, Any], seed: int) -> Path:
        """The run folder of ``point`` at ``seed`` (``<study>/<point>/seed-<seed>``)."""
        return self.folder / point_name(point) / f"seed-{seed}"

    def tasks(self) -> list[tuple[int, int]]:
        """(point index, seed) of every run, points first."""
        return [(i, s) for i in range(len(self.spec.points())) for s in self.spec.seeds]

    def record(self) -> None:
        """Write (or check) ``study.json``: a folder holding another study, or a single run, is an error."""
        if (self.folder / "config.json").is_file() or (self.folder / "seeds.json").is_file():
            raise StudyError(
                f"{self.folder} holds a run, not a study; give the study another name (--name) or move that folder away"
            )
        path = self.folder / STUDY_FILE
        mine = self.spec.definition()
        if path.is_file():
            try:
                old = runs.read_json(path).get("definition", {})
            except (ValueError, AttributeError) as err:
                raise StudyError(f"{path} is not a study manifest ({err}); move it away or use another --name") from err
            old = {**old, "base": _with_new_defaults(old.get("base", {}), mine["base"])}
            diff = [k for k in ("base", "grid") if old.get(k) != mine[k]]
            if diff:
                detail = _dict_diff(old.get("base", {}), mine["base"]) if "base" in diff else ""
                raise StudyError(
                    f"{self.folder} holds a different study (its {' and '.join(diff)} differ{': ' + detail if detail else ''}): "
                    f"use another --name, or move that folder away"
                )
            mine["seeds"] = sorted(set(old.get("seeds", [])) | set(mine["seeds"]))
        self.folder.mkdir(parents=True, exist_ok=True)
        current = runs.read_json(path) if path.is_file() else {}
        runs.atomic_write_json(path, {**current, "definition": mine, "name": self.spec.name})

    def run(self, point_index: int, seed: int, *, log: Callable[[str], None]) -> Any:
        """Make (or resume) one run of the study: point ``point_index`` at ``seed``; logs through ``log``."""
        point = self.spec.points()[point_index]
        folder, cfg = self.run_folder(point, seed), self.spec.config(point, seed)
        recorded = folder / "config.json"
        try:
            on_disk = runs.read_json(recorded) if recorded.is_file() else None
        except ValueError:
            on_disk = {}
        diff = store.config_diff(on_disk, cfg) if isinstance(on_disk, dict) else ["config.json"]
        if on_disk is not None and diff:
            raise StudyError(
                f"{folder} holds a run with other settings ({', '.join(diff[:6])}) than this study gives it; a study "
                "never overwrites a run: give the study another --name, or move that folder away"
            )
        return pipeline.Run(folder, cfg, log=log)

    def donors(self) -> list[Path]:
        """Every run folder of the study (candidates to adopt finished stages from)."""
        return sorted(p.parent for p in self.folder.glob("*/seed-*/config.json"))


def _with_new_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A recorded study base with each setting added to the kit since it was written (in ``new``, missing from ``old``)
    at its default: an upgrade of the kit does not turn a finished study into "a different study" (as
    :func:`specialkit.store.config_diff` does for a run's ``config.json``)."""
    default = json.loads(json.dumps(PipelineConfig().to_dict()))
    return {**{k: default[k] for k in new if k not in old and k in default}, **old}


def _dict_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys[:5]) + (
        " ..." if len(keys) > 5 else ""
    )


# ---------------------------------------------------------------------------------------------- sharing stages
def adopt(run: Any, donors: Sequence[Path], *, log: Callable[[str], None] = print) -> list[str]:
    """Hard-link into ``run`` every stage, in pipeline order, that it has not finished and that another run of
    ``donors`` finished with the same cache key; stops at the first stage nobody has (so no key is
    computed from a stage that would have to be trained). Records what it took in ``adopted.json``.

    Returns:
        the stages adopted now.
    """
    taken: list[str] = []
    record_path = run.folder / ADOPTED_FILE
    record = runs.read_json(record_path) if record_path.is_file() else {}
    others = [d for d in donors if d.resolve() != run.folder.resolve()]
    for stage in _ADOPTABLE:
        if not _switched_on(run, stage):
            continue
        if run.is_done(stage):
            continue
        key = run.key(stage)
        donor = next((d for d in others if pipeline.Run.open(d, log=lambda s: None).is_done(stage, key)), None)
        if donor is None:
            break
        store.install(run.folder, stage, donor, extra_files=stages.by_name(stage).extra_files)
        run.forget(stage)
        record[stage] = str(donor)
        taken.append(stage)
    if taken:
        runs.atomic_write_json(record_path, record)
        log(f"[study] {run.folder}: shares {', '.join(taken)} with other points of the study (hard links)")
    return taken


# ---------------------------------------------------------------------------------------------- phases
def _prefix(cfg: PipelineConfig, last: str) -> str:
    """The settings of every key stage up to ``last`` (the clusters file by content): equal prefixes share it."""
    keys = config_mod.stage_keys()
    order = config_mod.KEY_STAGES[: config_mod.KEY_STAGES.index(last) + 1]
    d = cfg.to_dict()
    parts = {s: {k: d[k] for k in keys[s]} for s in order}
    if "clusters" in order and cfg.clusters_file:
        parts["clusters_file"] = Path(cfg.clusters_file).read_text()
    return json.dumps(parts, sort_keys=True, default=str)


def phases(study: Study) -> list[list[tuple[int, int]]]:
    """The tasks of each phase: (0) one per distinct generalist, (1) one per distinct specialists +
    compute-matched generalist, (2) all. Within a phase no two tasks train the same stage."""
    points = study.spec.points()
    out = []
    for last in (stages.phase_stages(phase)[-1] for phase in stages.PHASES[:-1]):
        leaders: dict[str, tuple[int, int]] = {}
        for i, s in study.tasks():
            leaders.setdefault(_prefix(study.spec.config(points[i], s), last), (i, s))
        out.append(list(leaders.values()))
    out.append(study.tasks())
    return out


_PHASE_STAGES = {phase: stages.phase_stages(phase) for phase in stages.PHASES[:-1]}
"""The stages each phase but the last makes (the last runs everything, :func:`specialkit.pipeline.Run.run_all`)."""


def run_task(
    folder: str, spec_dict: dict[str, Any], tasks: list[tuple[int, int]], phase: int, threads: int | None = None
) -> list[str]:
    """Run ``tasks`` of one phase, one after another, in this process (also the body of a submitit job).
    Each task holds its run folder's lock; the dataset is loaded once per distinct data settings."""
    if threads is not None:
        set_thread_budget(threads)
    study = Study(folder, StudySpec(**spec_dict))
    datasets: dict[str, Any] = {}
    done = []
    for i, s in tasks:
        run = study.run(i, s, log=_log)
        with runs.RunLock(run.folder):
            data_key = _prefix(run.config, "data")
            if data_key in datasets:
                run.share_dataset(datasets[data_key])
            else:
                datasets[data_key] = run.dataset()
            adopt(run, study.donors(), log=_log)
            t0 = time.perf_counter()
            if phase in _PHASE_STAGES:
                todo = [st for st in _PHASE_STAGES[phase] if _switched_on(run, st)]
                run.ensure(*todo)
            else:
                if not point_is_done(run):
                    resumed = (run.folder / "metrics.json").is_file()
                    run.run_all()
                    runs.atomic_write_json(
                        run.folder / "study_seconds.json",
                        {"seconds": round(time.perf_counter() - t0, 2), "resumed": resumed},
                    )
        done.append(str(run.folder))
    return done


def _switched_on(run: Any, stage: str) -> bool:
    """False when ``stage``'s switch setting (``compute_matched``, ``hard_label_control``) turns it off in ``run``."""
    switch = stages.by_name(stage).switch
    return switch is None or bool(getattr(run.config, switch))


def point_is_done(run: Any) -> bool:
    """A study point is done only when everything it writes exists: every stage it runs (skipped and switched-off
    stages aside; a stage added to the kit since the point was made is missing, so the point is finished with it),
    ``metrics.json``, ``report.html`` (when the run writes one) and ``study_seconds.json``; a point killed between them
    is finished on the next invocation (the finished stages are loaded, not trained again)."""
    needed = ["metrics.json", "study_seconds.json"] + (["report.html"] if run.config.html_report else [])
    if not all((run.folder / name).is_file() for name in needed):
        return False
    return all(bool(run.skip_reason(s)) or not _switched_on(run, s) or run.is_done(s) for s in stages.NAMES)


def _log(text: str) -> None:
    print(text, flush=True)


def _execute(study: Study, tasks: list[tuple[int, int]], phase: int, *, jobs: int, log: Callable[[str], None]) -> None:
    """The tasks of one phase: in this process (``jobs == 1``), else ``jobs`` submitit jobs on this machine,
    each with ``cores // jobs`` threads (logs in ``<study>/jobs/``)."""
    spec_dict = dataclasses.asdict(study.spec)
    spec_dict["seeds"] = tuple(spec_dict["seeds"])
    if jobs == 1 or len(tasks) == 1:
        run_task(str(study.folder), spec_dict, tasks, phase)
        return
    import submitit

    at_once = min(jobs, len(tasks))
    threads = thread_budget(None, jobs=at_once, cores=affinity_cores())
    executor = submitit.AutoExecutor(folder=study.folder / "jobs", cluster="local")
    executor.update_parameters(name=f"specialkit-study-{phase}", timeout_min=24 * 60, cpus_per_task=threads)
    chunks = [tasks[k::at_once] for k in range(at_once)]
    log(
        f"[study] phase {phase}: {len(tasks)} run{'s' if len(tasks) != 1 else ''} as {at_once} jobs, {threads} thread(s) each"
    )
    jl = executor.map_array(
        run_task, [str(study.folder)] * at_once, [spec_dict] * at_once, chunks, [phase] * at_once, [threads] * at_once
    )
    failed = []
    for job in jl:
        err = job.exception()
        if err is not None:
            last = [line for line in str(err).splitlines() if line.strip()]
            failed.append(
                f"job {job.job_id}: {(last[-1] if last else type(err).__name__)[:300]} (log: {job.paths.stderr})"
            )
    if failed:
        raise StudyError(
            f"{len(failed)} study job(s) failed; rerun the same command to resume:\n  " + "\n  ".join(failed)
        )


# ---------------------------------------------------------------------------------------------- the whole study
def run_study(spec: StudySpec, *, out: str | Path = "runs", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the study ``spec`` into ``out/<name>/``: every point x seed, sharing stages, then
    ``study.json`` (definition, rows, summary), ``study.csv`` and ``report.html``. Returns the manifest."""
    study = Study(Path(out) / spec.name, spec)
    _preflight(study)
    study.record()
    t0 = time.perf_counter()
    for phase, tasks in enumerate(phases(study)):
        log(
            f"[study] phase {phase} ({['generalists', 'specialists and compute-matched', 'every point'][phase]}): {len(tasks)} run(s)"
        )
        _execute(study, tasks, phase, jobs=spec.jobs, log=log)
    points = spec.points()
    rows = []
    for i, s in study.tasks():
        folder = study.run_folder(points[i], s)
        m = runs.read_json(folder / "metrics.json")
        sec_path = folder / "study_seconds.json"
        seconds = runs.read_json(sec_path).get("seconds") if sec_path.is_file() else None
        row = metrics_mod.study_row(
            m, settings=points[i], seed=s, run=str(folder.relative_to(study.folder)), seconds=seconds
        )
        adopted_path = folder / ADOPTED_FILE
        row["shared_stages"] = " ".join(runs.read_json(adopted_path)) if adopted_path.is_file() else ""
        row["torch_threads"] = " ".join(str(n) for n in stage_thread_counts(folder))
        rows.append(row)
    outcomes = [run_outcomes(study.folder / r["run"]) for r in rows]
    summary = metrics_mod.study_summary(rows, list(spec.grid), correct=outcomes, tie_margin=spec.tie_margin)
    _two_level_columns(rows, summary, list(spec.grid))
    manifest = runs.read_json(study.folder / STUDY_FILE)
    manifest.update(
        {
            "rows": rows,
            "summary": summary,
            "keys": list(spec.grid),
            "wall_seconds_last_invocation": round(time.perf_counter() - t0, 1),
        }
    )
    manifest["warnings"] = [w for w in [mixed_threads_warning(rows)] if w]
    for w in manifest["warnings"]:
        log(f"[study] warning: {w}")
    manifest = metrics_mod.finite(manifest)
    runs.atomic_write_json(study.folder / STUDY_FILE, manifest)
    _write_csv(study.folder / "study.csv", rows)
    write_study_report(study.folder, manifest)
    return manifest


def run_outcomes(folder: str | Path) -> dict[str, Any]:
    """Per model and rule of the finished run in ``folder``, its (N,) bool outcome on each test image (what the
    two-level bootstrap of :func:`metrics.study_summary` resamples); read from the run's saved predictions."""
    run = pipeline.Run.open(folder, log=lambda s: None)
    y = run.dataset().y_test.numpy()
    return metrics_mod.correct_of(metrics_mod.results_on_test(run), y)


def _two_level_columns(rows: list[dict[str, Any]], summary: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> None:
    """Copy each point's across-seed interval, Holm p and verdict into the rows of that point (study.csv)."""
    for r in rows:
        for s in summary:
            if all(s[k] == r[k] for k in keys):
                col = f"{s['rule']}_gain_vs_{s['baseline']}_across_seeds"
                r[f"{col}_lo"], r[f"{col}_hi"], r[f"{col}_p_holm"], r[f"{col}_verdict"] = (
                    s["lo"],
                    s["hi"],
                    s["p_holm"],
                    s["verdict"],
                )


def stage_thread_counts(folder: str | Path) -> list[int]:
    """The torch intra-op thread counts recorded in the ``done.json`` of every stage of the run in ``folder``
    (specialists included), sorted and without repeats; stages finished before the count was recorded add none."""
    counts = set()
    for marker in Path(folder).rglob("done.json"):
        try:
            n = runs.read_json(marker).get("torch_threads")
        except (ValueError, OSError, AttributeError):
            continue
        if isinstance(n, int):
            counts.add(n)
    return sorted(counts)


def mixed_threads_warning(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """A warning when the study's runs were computed at more than one torch thread count, else ``None``.

    Args:
        rows: study rows with a ``torch_threads`` entry (space-separated counts, as :func:`run_study` writes).

    Returns:
        One sentence naming the counts and which runs used them, or ``None`` when they agree.
    """
    by_count: dict[str, list[str]] = {}
    for row in rows:
        for n in str(row.get("torch_threads") or "").split():
            by_count.setdefault(n, []).append(str(row.get("run")))
    if len(by_count) < 2:
        return None
    where = "; ".join(
        f"{n} thread(s): {', '.join(sorted(set(r)))}" for n, r in sorted(by_count.items(), key=lambda kv: int(kv[0]))
    )
    return (
        f"the study mixes torch thread counts ({where}); the same seed gives slightly different numbers at another "
        "thread count, so rerun the odd ones with the same --threads (or OMP_NUM_THREADS) to compare like with like"
    )


def _preflight(study: Study) -> None:
    """Before any training: each distinct dataset loads and every point's k and top_n fit its classes."""
    seen: dict[str, int] = {}
    for point in study.spec.points():
        cfg = study.spec.config(point, study.spec.seeds[0])
        key = _prefix(cfg, "data")
        if key not in seen:
            seen[key] = data.load_configured(cfg).num_classes
        try:
            cfg.validate(seen[key])
        except ConfigError as err:
            raise StudyError(f"grid point {point} is rejected: {err}; fix that value in the grid") from err


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    runs.atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False))


load_study = store.load_study


def quick_spec(name: str = QUICK_STUDY) -> StudySpec:
    """The tiny study of quick mode (tests, notebook 07 under ``SPECIALKIT_SMOKE=1``): k = 2, 3 x seeds 0, 1 on a
    4-images-per-class glyphs run (seconds; its numbers only show the machinery works)."""
    base = PipelineConfig.preset("tiny", name="quick", bootstrap_resamples=1000, latency=False, html_report=False)
    return make_spec(name=name, base=base.to_dict(), grid={"k": [2, 3]}, seeds=[0, 1], source="quick study")


def open_study(folder: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The finished study in ``folder`` (:func:`load_study`). In quick mode only (``SPECIALKIT_SMOKE=1``) a missing
    or unfinished study is run first with :func:`quick_spec`; otherwise that is a ``StudyError`` saying to run it."""
    folder = Path(folder)
    path = folder / STUDY_FILE
    if smoke_mode() and (not path.is_file() or "rows" not in runs.read_json(path)):
        log(f"[study] {folder}: running the quick study (SPECIALKIT_SMOKE=1)")
        return run_study(quick_spec(folder.name), out=folder.parent, log=log)
    if not path.is_file():
        raise StudyError(
            f"{folder} holds no study: run `make study` (or `specialkit study ... --name {folder.name}`) first"
        )
    return load_study(folder)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `specialkit study`")
