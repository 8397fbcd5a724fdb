"""The whole pipeline over a run folder: :class:`Run`, a thin facade over the stages.

``runs/<name>/`` holds ``config.json`` and one folder per stage (:mod:`specialkit.stages` declares them;
:mod:`specialkit.store` owns the folder protocol: keys, ``done.json``, move-aside, hard links, manifests). A stage
is finished when its ``done.json`` records the same *key* — a hash of the settings the stage depends on and of the
keys of the stages before it. Markers are written last and atomically, so a run killed at any point resumes where it
stopped (a training stage resumes mid-way from its per-epoch state file) and changing, say, the cluster spec re-runs
only what depends on it. ``run.get(stage)`` (or ``run.<stage>()``) trains a stage or loads it; each stage's recipe
lives in the module named for it (:mod:`~specialkit.generalist`, :mod:`~specialkit.clusters`,
:mod:`~specialkit.specialists`, :mod:`~specialkit.ensembles`, :mod:`~specialkit.distill`). ``run.view()`` is the
read-only view the numbers take (:mod:`specialkit.view`).

>>> run = Run("runs/demo", PipelineConfig())
>>> run.generalist().test_probs.shape        # trains, or loads what is on disk
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import (
    byog,
    clusters,
    data,
    distill,
    ensembles,
    metrics,
    models,
    report,
    runs,
    specialists,
    stages,
    store,
    training,
)
from . import config as config_mod
from . import generalist as generalist_mod
from .config import ConfigError, PipelineConfig
from .generalist import ModelResult
from .view import RunView

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "Run",
    "stage_settings",
    "ModelResult",
    "STAGES",
    "softmax",
    "runs_root",
    "open_run",
    "settings_table",
    "method_specs",
    "confused_examples",
    "check_before_training",
    "preflight",
]

STAGES = stages.NAMES
"""Stage names in pipeline order (:data:`specialkit.stages.NAMES`)."""
_KEYS = config_mod.stage_keys()
"""Settings group -> the settings in its cache key, derived from the ``stage`` metadata of ``PipelineConfig``'s fields."""
RESULTS_FORMAT = store.RESULTS_FORMAT
ENSEMBLE_RULES = stages.by_name("ensembles").version[1]
softmax = training.softmax
method_specs = clusters.method_specs
confused_examples = clusters.confused_examples
_RECIPES: dict[str, Callable[[Any], Any]] = {
    "generalist": generalist_mod.make_generalist,
    "clusters": clusters.make_spec,
    "specialists": specialists.make_all,
    "compute_matched": generalist_mod.make_compute_matched,
    "ensembles": ensembles.make_ensembles,
    "distill": distill.make_student,
    "hard_label_student": distill.make_control,
    "student_matched": generalist_mod.make_student_matched,
}
"""Stage -> its recipe (a function of the run that trains or loads it); one for every stage of :data:`STAGES`."""
assert set(_RECIPES) == set(STAGES), "every declared stage needs a recipe"


def runs_root(default: str | Path = "runs") -> Path:
    """Parent folder of run folders: ``$SPECIALKIT_RUNS`` if set (the tests point it at a temporary
    folder), else ``default`` (notebooks pass ``"../runs"``, the repository's ``runs/``)."""
    return Path(os.environ.get("SPECIALKIT_RUNS") or default)


_NO_RUN = (
    "{folder} is not a run yet (no config.json): run notebook 01 first, or "
    "`specialkit run --config configs/demo.json` (`--name` for another run name)"
)


def open_run(folder: str | Path, *, log: Callable[[str], None] = print) -> "Run":
    """The run notebooks 02-06 work on: :meth:`Run.open`. In quick mode only (``SPECIALKIT_SMOKE=1``,
    what the tests set) a missing run is created with ``PipelineConfig.from_env()``, so each notebook
    also runs on its own there; otherwise a missing run is a ``ConfigError`` saying to run notebook 01 first."""
    from .config import smoke_mode

    folder = Path(folder)
    if not (folder / "config.json").is_file() and smoke_mode():
        log(f"[run] {folder} did not exist: created it with the quick settings (SPECIALKIT_SMOKE=1)")
        return Run(folder, PipelineConfig.from_env(name=folder.name), log=log)
    return Run.open(folder, log=log)


def settings_table(config: PipelineConfig) -> "pd.DataFrame":
    """The settings that differ from the defaults (plus name and dataset): columns ``value`` and ``default``."""
    import pandas as pd

    mine, default = config.to_dict(), PipelineConfig().to_dict()
    keys = [k for k in mine if k in ("name", "dataset") or mine[k] != default[k]]
    return pd.DataFrame(
        {"value": [mine[k] for k in keys], "default": [default[k] for k in keys]},
        index=pd.Index(keys, name="setting"),
        dtype=object,
    )


class Run:
    """A run folder and its stages. Each stage is trained or computed once, then loaded from disk.

    ``folder/config.json`` records the run's settings. It is written only when missing; a run whose
    ``config.json`` holds other settings is not silently changed: that raises a ``ConfigError``
    naming the differing keys unless ``overwrite=True`` (``specialkit run --overwrite``). Settings
    that match exactly write nothing, so readers work on read-only storage.

    Args:
        folder: the run folder (``runs/<name>``); created if missing.
        config: the settings; ``None`` reads ``folder/config.json`` (an existing run, see :meth:`open`).
        overwrite: replace a ``config.json`` that records other settings (stages that depend on the
            changed settings re-run; the others are kept).
        log: where stage messages go (``print`` by default; pass ``lambda s: None`` to silence).
    """

    def __init__(
        self,
        folder: str | Path,
        config: PipelineConfig | None = None,
        *,
        overwrite: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.folder = Path(folder)
        path = self.folder / "config.json"
        if config is None:
            if not path.is_file():
                raise ConfigError(_NO_RUN.format(folder=self.folder))
            config = PipelineConfig.load(path)
        else:
            store.record_config(path, config, overwrite=overwrite)
        self.config = config
        self.log = log
        self._memo: dict[str, Any] = {}
        self.timings: dict[str, float] = {}

    @classmethod
    def open(cls, folder: str | Path, *, log: Callable[[str], None] = print) -> "Run":
        """An existing run, with the settings its ``config.json`` records (nothing is written).

        Raises:
            ConfigError: ``folder`` holds no ``config.json`` (notebook 01 or ``specialkit run`` creates it).
        """
        return cls(folder, None, log=log)

    def with_settings(self, **changes: Any) -> "Run":
        """This run with ``changes`` applied and recorded in its ``config.json`` (e.g. ``k=6`` in
        notebook 03, so the notebooks after it see the new k). Stages that depend on a changed setting
        re-run; the others are kept. No change: the same run, nothing written."""
        config = self.config.replace(**changes)
        if config == self.config:
            return self
        return type(self)(self.folder, config, overwrite=True, log=self.log)

    def settings(self, group: str) -> dict[str, Any]:
        """The settings of ``group`` (a stage's settings group or ``data``) that enter the stage keys."""
        return stage_settings(self, group)

    def generalist_source(self) -> byog.Source | None:
        """The parsed ``generalist_from`` (``None`` when the kit trains the generalist); its file must exist."""
        return byog.parse_source(self.config.generalist_from) if self.config.generalist_from else None

    def skip_reason(self, stage: str) -> str | None:
        """Why ``stage`` is skipped in this run (a ``generalist_from`` that cannot be trained or has no model:
        :func:`byog.skip_reason`), or ``None`` when it runs."""
        if stage == "hard_label_student" and not self.config.hard_label_control:
            return "hard_label_control=false"
        if stage == "student_matched":  # it trains the generalist further and needs the student's budget
            return self.skip_reason("compute_matched") or self.skip_reason("distill")
        return byog.skip_reason(self.generalist_source(), stage, value=self.config.generalist_from or "")

    def key(self, stage: str) -> str:
        """The hash that a finished ``stage`` must record to count as up to date (:func:`specialkit.store.stage_key`):
        its settings, those of the stages before it (:func:`specialkit.stages.key_chain`), the cluster spec after
        clustering and :data:`RESULTS_FORMAT` — not the package version, so upgrading specialkit keeps trained stages."""
        return _stage_key(self, stage)

    def specialist_key(self, index: int) -> str:
        """The key of specialist ``index`` alone (:func:`specialkit.specialists.key_of`)."""
        return specialists.key_of(self, index)

    def stage_dir(self, stage: str) -> Path:
        """The folder of ``stage`` in this run (``<run>/<stage>/``)."""
        return self.folder / stage

    def lock(self, *, shared: bool = False) -> runs.RunLock:
        """The run folder's write lock: ``with run.lock(): ...`` (readers need none)."""
        return runs.RunLock(self.folder, shared=shared, log=self.log)

    def is_done(self, stage: str, key: str | None = None, folder: Path | None = None) -> bool:
        """Whether ``stage`` (or the specialist in ``folder``) finished with ``key`` (:func:`specialkit.store.is_done`)."""
        extra = tuple(self.folder / f for f in stages.by_name(stage).extra_files)
        return store.is_done(folder or self.stage_dir(stage), key or self.key(stage), extra_files=extra)

    def begin(self, folder: Path, key: str) -> None:
        """Start work on a stage folder (:func:`specialkit.store.begin`)."""
        store.begin(folder, key, log=self.log)

    def finish(self, folder: Path, key: str, **info: Any) -> None:
        """Mark ``folder`` done with ``key`` (:func:`specialkit.store.finish`); it also records ``torch_threads``, the
        intra-op thread count the stage ran with: the same seed gives other floats at another thread count, so a study
        warns when its runs mix them."""
        info.setdefault("torch_threads", torch.get_num_threads())
        store.finish(folder, key, **info)

    def add_time(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``'s wall time in this process (:attr:`timings`)."""
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per ``Run`` object under ``name`` (a loaded stage result, the dataset ...), then the same."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def forget(self, *names: str, keep: tuple[str, ...] | None = None) -> None:
        """Drop what :meth:`memo` remembers under ``names`` (a stage replaced on disk, e.g. adopted by a study), or with
        ``keep`` everything but those."""
        drop = [k for k in self._memo if k not in keep] if keep is not None else names
        for name in drop:
            self._memo.pop(name, None)

    def dataset(self) -> data.Dataset:
        """The run's dataset (loaded once per ``Run`` object, :func:`specialkit.data.load_for`)."""
        return self.memo("dataset", lambda: data.load_for(self.config, log=self.log, timed=self.add_time))

    def share_dataset(self, ds: data.Dataset) -> None:
        """Use an already loaded ``ds`` (e.g. the same data for several seeds); it must be the data this
        run's settings load (same name, classes and fingerprint seen by its checkpoints)."""
        self.config.validate(ds.num_classes)
        if ds.name != self.config.dataset:
            raise ConfigError(
                f"dataset {ds.name!r} handed to a run of dataset={self.config.dataset!r}: pass the run's own data"
            )
        self._memo["dataset"] = ds

    def device(self) -> torch.device:
        """The torch device this run trains and evaluates on (``device`` setting; ``auto``: CUDA when present)."""
        return training.resolve_device(self.config.device)

    def train_config(
        self,
        *,
        epochs: int,
        lr: float,
        seed_offset: int,
        soft_weight: float = 0.0,
        temperature: float = 1.0,
        mixup_alpha: float = 0.0,
    ) -> training.TrainConfig:
        """The run's training settings for one model (:func:`specialkit.generalist.train_config`)."""
        return generalist_mod.train_config(
            self.config,
            epochs=epochs,
            lr=lr,
            seed_offset=seed_offset,
            soft_weight=soft_weight,
            temperature=temperature,
            mixup_alpha=mixup_alpha,
        )

    def model_config(
        self, *, num_classes: int, width: int | None = None, depth: int | None = None, name: str | None = None
    ) -> models.ModelConfig:
        """The run's architecture with these overrides (:func:`specialkit.generalist.model_config`)."""
        return generalist_mod.model_config(self, num_classes=num_classes, width=width, depth=depth, name=name)

    def get(self, stage: str) -> Any:
        """Stage ``stage``'s result: loaded when finished for the current settings, else made (trained) first."""
        if stage not in _RECIPES:
            raise ConfigError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        return _RECIPES[stage](self)

    def confusion(self) -> Any:
        """Confusion, covariance and distances of the generalist on the validation split."""
        return clusters.confusion_of(self)

    def distance(self) -> np.ndarray:
        """(C, C) class distance the distance-based methods use (:func:`specialkit.clusters.distance_of`)."""
        return clusters.distance_of(self)

    def class_map(self, *, method: str = "umap") -> np.ndarray:
        """(C, 2) map of the classes (:func:`specialkit.clusters.class_map_of`)."""
        return clusters.class_map_of(self, method=method)

    def compute_clusters(self) -> clusters.ClusterSpec:
        """The configured clustering of the generalist's confusions (not saved)."""
        return clusters.compute_for(self)

    def save_clusters(self, spec: clusters.ClusterSpec) -> None:
        """Use ``spec`` (e.g. edited in the picker) from now on; the stages after it re-run."""
        clusters.save_for(self, spec)

    def scratch_reason(self) -> str | None:
        """Why specialists train from scratch although no specialist architecture is set, or ``None``."""
        return byog.scratch_reason(self.generalist_source(), value=self.config.generalist_from or "")

    def specialist_dir(self, index: int) -> Path:
        """The folder of specialist ``index`` in this run."""
        return specialists.folder_of(self, index)

    def train_specialist(self, index: int) -> specialists.TrainedSpecialist:
        """Train (resumably) or load specialist ``index``; independent of the others, so jobs can fan out."""
        return specialists.make_one(self, index)

    def shared_trunk(self) -> models.Trunk | None:
        """The generalist's first ``specialist_shared_stages`` stages, shared by every specialist (None when 0)."""
        return specialists.shared_trunk_of(self)

    def specialist_probs(self, split: str) -> list[np.ndarray]:
        """Per specialist, (N, |S_m| + 1) probabilities on ``split`` (val/test), dustbin last."""
        return specialists.probs_of(self, split)

    def groups(self) -> list[np.ndarray]:
        """The class indices of each group, one array per specialist."""
        return self.clusters().indices()

    def activation(self, split: str) -> np.ndarray:
        """(N, M) bool: which specialists the generalist's top-n classes switch on."""
        return ensembles.activation_of(self, split)

    def combine(self, rule: str, split: str) -> np.ndarray:
        """(N, C) combined distribution of ``rule`` on ``split`` (``val``/``test``)."""
        return ensembles.combine_for(self, rule, split)

    def run_all(self) -> dict[str, Any]:
        """Every stage in order, then ``metrics.json`` and (``html_report``) ``report.html``; returns the metrics."""
        preflight(self)
        self.ensure_through(STAGES[-1])
        m = self.metrics()
        if self.config.html_report:
            report.write_report(self.view(), m)
        return m

    def ensure_through(self, last: str) -> "Run":
        """Every stage up to and including ``last``, in order, as :meth:`run_all` runs them: what is on disk and
        valid is loaded, what is missing (a deleted ``model.pt``, say) is trained again; a stage this run skips
        (its reason logged) or turns off (its :attr:`~specialkit.stages.Stage.switch`) is passed over."""
        _ensure_through(self, last)
        return self

    def ensure(self, *names: str) -> "Run":
        """Make sure each stage of ``names`` is finished (train what is not on disk, load the rest); returns the run."""
        for name in names:
            self.get(name)
        return self

    def view(self) -> RunView:
        """This run, read-only: what the numbers take (:class:`specialkit.view.RunView`)."""
        return RunView(self)

    def metrics(self) -> dict[str, Any]:
        """Every number of the run (also written to ``metrics.json``); trains nothing. The latency measurement of the
        ``metrics.json`` already there is kept when its networks, routing, machine and thread count are the same
        (:func:`specialkit.metrics.compute_metrics`)."""
        m = metrics.compute_metrics(self.view(), measure_latency=self.config.latency, previous=self._metrics_on_disk())
        runs.atomic_write_json(self.folder / "metrics.json", m)
        return m

    def _metrics_on_disk(self) -> dict[str, Any] | None:
        """The ``metrics.json`` this run wrote last, or None (none, or unreadable: then nothing is reused)."""
        try:
            return json.loads((self.folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return None


def stage_settings(run: Run, group: str) -> dict[str, Any]:
    """The settings of ``group`` that enter its stage keys (a ``generalist_from`` file by its sha256)."""
    cfg = run.config.to_dict()
    out = {config_mod.key_name(k): cfg[k] for k in _KEYS[group] if config_mod.hashed_now(k, cfg[k])}
    if group == "generalist" and run.config.generalist_from:
        out.update(
            {k: cfg[k] for k in ("generalist_from", "generalist_normalize", "generalist_input_size")},
            generalist_from_sha256=_source_sha(run),
        )
    return out


def _stage_key(run: Run, stage: str) -> str:
    """:meth:`Run.key`."""
    chain, st = stages.key_chain(stage), stages.by_name(stage)
    clusters_file = (
        Path(run.config.clusters_file).read_text() if stage == "clusters" and run.config.clusters_file else None
    )
    version = st.version
    if stage == "distill" and run.config.specialist_shared_stages:
        # the teacher runs a shared trunk once per batch since issue 22 (the same math; other last bits)
        version = ("teacher_version", 2)
    return store.stage_key(
        stage,
        {g: stage_settings(run, g) for g in ("data", *chain)},
        chain,
        version=version,
        spec_json=run.clusters().to_json() if stages.uses_spec(stage) else None,
        clusters_file_text=clusters_file,
    )


def _ensure_through(run: Run, last: str) -> None:
    """:meth:`Run.ensure_through`."""
    if last not in STAGES:
        raise ConfigError(f"unknown stage {last!r}; choose from {', '.join(STAGES)}")
    for st in stages.STAGES[: STAGES.index(last) + 1]:
        reason = run.skip_reason(st.name)
        if reason:
            run.log(f"[{st.name}] skipped: {reason}")
        elif st.switch is None or getattr(run.config, st.switch):
            t0 = time.perf_counter()
            run.get(st.name)
            run.log(f"[{st.name}] done in {time.perf_counter() - t0:.1f} s")


def check_before_training(config: PipelineConfig) -> None:
    """Fail fast, before a run folder exists, on a dataset name the registry does not know."""
    if config.dataset not in data.available():
        raise ConfigError(f"dataset={config.dataset!r} is unknown; choose one of {', '.join(data.available())}")


def preflight(run: Run) -> None:
    """Check everything that can be checked before training: the dataset loads, ``k`` and ``top_n`` fit its classes,
    and a given clusters file names only its classes.

    Args:
        run: the run.

    Raises:
        ConfigError: the first problem found, with its fix.
    """
    ds = run.dataset()
    source = run.generalist_source()
    if source is not None and not source.has_model and run.config.specialist_soft_weight > 0:
        raise ConfigError(
            f"specialist_soft_weight={run.config.specialist_soft_weight} needs the generalist's soft targets on "
            f"training batches; generalist_from={run.config.generalist_from!r} holds predictions only: set it to 0"
        )
    if run.config.clusters_file:
        path = Path(run.config.clusters_file)
        if not path.is_file():
            raise ConfigError(
                f"clusters_file={str(path)!r} not found; save one from notebook 03 or with ClusterSpec.save"
            )
        clusters.ClusterSpec.load(path).for_dataset(ds.class_names)


def _stage_method(stage: stages.Stage) -> Callable[[Run], Any]:
    """``run.<stage>()``: :meth:`Run.get` of one declared stage (so a new stage needs no method written by hand)."""

    def method(self: Run) -> Any:
        return self.get(stage.name)

    method.__name__ = method.__qualname__ = stage.name
    method.__doc__ = (
        f"Stage ``{stage.name}``: {stage.doc}; loaded when finished for the current settings, else made first."
    )
    return method


for _stage in stages.STAGES:  # run.generalist(), run.clusters(), ... one per declared stage
    setattr(Run, _stage.name, _stage_method(_stage))


def _source_sha(run: Run) -> str:
    """sha256 of the ``generalist_from`` file, remembered per (path, size, mtime) so keys stay cheap."""
    path = run.generalist_source().path
    st = path.stat()
    memo = ("source_sha", str(path.resolve()), st.st_size, st.st_mtime_ns)
    if run._memo.get("source_sha", (None,))[:4] != memo:
        run._memo["source_sha"] = (*memo, byog.file_sha256(path))
    return run._memo["source_sha"][4]
