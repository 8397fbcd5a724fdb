"""The whole pipeline over a run folder: every stage a method of :class:`Run`, cached on disk.

``runs/<name>/`` holds ``config.json`` and one folder per stage. A stage is finished when its
``done.json`` marker exists and records the same *key* — a hash of the settings the stage depends on
and of the keys of the stages before it. Markers are written last and atomically, so a run killed at
any point resumes where it stopped (a training stage resumes mid-way from its per-epoch state file)
and changing, say, the cluster spec re-runs only what depends on it.

>>> run = Run("runs/demo", PipelineConfig())
>>> run.generalist().test_probs.shape        # trains, or loads what is on disk
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import byog, checkpoints, clusters, confusion, data, distributed, ensemble, models, runs, specialists, training
from . import config as config_mod
from . import distill as distillation
from .config import ConfigError, PipelineConfig

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Run", "ModelResult", "STAGES", "softmax", "runs_root", "open_run", "settings_table", "seed_runs", "run_seeds"]

STAGES = ("generalist", "clusters", "specialists", "compute_matched", "ensembles", "distill", "hard_label_student")
_KEYS = config_mod.stage_keys()
"""Stage -> the settings in its cache key, derived from the ``stage`` metadata of ``PipelineConfig``'s fields."""
_SPLITS = ("train", "val", "test")
RESULTS_FORMAT = 1  # bump when a stage's saved results change meaning; stage keys include it, the package version not
ENSEMBLE_RULES = 2  # 2: top_confident and moe read calibrated specialists as evidence (issue 20); in the ensembles key
_NOT_RESULTS = ("done.json", "key.txt", "state.pt")


def runs_root(default: str | Path = "runs") -> Path:
    """Parent folder of run folders: ``$SPECIALKIT_RUNS`` if set (the tests point it at a temporary
    folder), else ``default`` (notebooks pass ``"../runs"``, the repository's ``runs/``)."""
    return Path(os.environ.get("SPECIALKIT_RUNS") or default)


_NO_RUN = ("{folder} is not a run yet (no config.json): run notebook 01 first, or "
           "`specialkit run --config configs/demo.json` (`--name` for another run name)")


def _config_diff(on_disk: dict[str, Any], config: PipelineConfig) -> list[str]:
    """Keys whose values differ between a ``config.json`` (as read) and ``config`` (as JSON would store it). A
    setting added after the file was written is missing there; at its default it is no difference (the run was
    made with the behaviour that default keeps), so an upgrade of the kit does not turn old runs into errors."""
    mine = json.loads(json.dumps(config.to_dict()))
    default = json.loads(json.dumps(PipelineConfig().to_dict()))
    return sorted(k for k in set(on_disk) | set(mine)
                  if on_disk.get(k, default.get(k, _MISSING)) != mine.get(k, _MISSING))  # fmt: skip


_MISSING = object()


def _record_config(path: Path, config: PipelineConfig, *, overwrite: bool) -> None:
    """Write ``config`` to ``path`` when missing; the same settings: write nothing; others: raise unless ``overwrite``."""
    if path.is_file():
        try:
            on_disk = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            if not overwrite:
                raise ConfigError(f"{path} is not valid JSON ({err}); fix it, or pass overwrite=True "
                                  "(`specialkit run --overwrite`) to replace it") from err  # fmt: skip
            on_disk = {}
        if not isinstance(on_disk, dict):
            on_disk = {}
        diff = _config_diff(on_disk, config)
        if not diff:
            return
        if not overwrite:
            shown = ", ".join(f"{k}: {on_disk.get(k, '(missing)')!r} there, {config.to_dict().get(k, '(missing)')!r} here"
                              for k in diff[:6]) + (" ..." if len(diff) > 6 else "")  # fmt: skip
            raise ConfigError(
                f"{path} records other settings ({shown}); open the run as it is with Run.open({str(path.parent)!r}), "
                "or pass overwrite=True (`specialkit run --overwrite`, `run.with_settings(...)`) to change them"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path)


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
    return pd.DataFrame({"value": [mine[k] for k in keys], "default": [default[k] for k in keys]},
                        index=pd.Index(keys, name="setting"), dtype=object)  # fmt: skip


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of (N, K) logits at ``temperature``, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ModelResult:
    """A trained model of the run with its outputs.

    Attributes:
        name: ``generalist``, ``compute_matched`` or ``student``.
        model: the network (eval mode, on the CPU).
        history: per-epoch records of training.
        logits: split -> (N, C) float32 logits on ``train``/``val``/``test``.
        examples_seen: training example-passes spent on this model.
    """

    name: str
    model: torch.nn.Module
    history: list[dict[str, Any]]
    logits: dict[str, np.ndarray]
    examples_seen: int

    def probs(self, split: str) -> np.ndarray:
        return softmax(self.logits[split])

    @property
    def val_probs(self) -> np.ndarray:
        return self.probs("val")

    @property
    def test_probs(self) -> np.ndarray:
        return self.probs("test")


class Run:
    """A run folder and its stages. Each stage method trains or computes once, then loads from disk.

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

    def __init__(self, folder: str | Path, config: PipelineConfig | None = None, *, overwrite: bool = False,
                 log: Callable[[str], None] = print):  # fmt: skip
        self.folder = Path(folder)
        path = self.folder / "config.json"
        if config is None:
            if not path.is_file():
                raise ConfigError(_NO_RUN.format(folder=self.folder))
            config = PipelineConfig.load(path)
        else:
            _record_config(path, config, overwrite=overwrite)
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

    # ------------------------------------------------------------------ bookkeeping
    def _settings(self, stage: str) -> dict[str, Any]:
        cfg = self.config.to_dict()
        out = {config_mod.key_name(k): cfg[k] for k in _KEYS[stage] if config_mod.hashed_now(k, cfg[k])}
        if stage == "generalist" and self.config.generalist_from:
            out.update({k: cfg[k] for k in ("generalist_from", "generalist_normalize", "generalist_input_size")},
                       generalist_from_sha256=self._source_sha())  # fmt: skip
        return out

    def generalist_source(self) -> byog.Source | None:
        """The parsed ``generalist_from`` (``None`` when the kit trains the generalist); its file must exist."""
        return byog.parse_source(self.config.generalist_from) if self.config.generalist_from else None

    def _source_sha(self) -> str:
        """sha256 of the ``generalist_from`` file, remembered per (path, size, mtime) so keys stay cheap."""
        path = self.generalist_source().path
        st = path.stat()
        memo = ("source_sha", str(path.resolve()), st.st_size, st.st_mtime_ns)
        if self._memo.get("source_sha", (None,))[:4] != memo:
            self._memo["source_sha"] = (*memo, byog.file_sha256(path))
        return self._memo["source_sha"][4]

    def skip_reason(self, stage: str) -> str | None:
        """Why ``stage`` is skipped in this run (a ``generalist_from`` that cannot be trained or has no model:
        :func:`byog.skip_reason`), or ``None`` when it runs."""
        if stage == "hard_label_student" and not self.config.hard_label_control:
            return "hard_label_control=false"
        return byog.skip_reason(self.generalist_source(), stage, value=self.config.generalist_from or "")

    def key(self, stage: str) -> str:
        """The hash that a finished ``stage`` must record to count as up to date: its settings, those of
        the stages before it (and the cluster spec after clustering) and :data:`RESULTS_FORMAT` — not the
        package version, so upgrading specialkit keeps trained stages."""
        parts: dict[str, Any] = {"stage": stage, "format": RESULTS_FORMAT, "settings": self._settings("data")}
        chain = {"generalist": ["generalist"], "clusters": ["generalist", "clusters"],
                 "specialists": ["generalist", "clusters", "specialists"],
                 "compute_matched": ["generalist", "clusters", "specialists", "compute_matched"],
                 "ensembles": ["generalist", "clusters", "specialists", "ensembles"],
                 "distill": ["generalist", "clusters", "specialists", "ensembles", "distill"],
                 "hard_label_student": ["generalist", "distill"]}[stage]  # fmt: skip
        for s in chain:
            parts[s] = self._settings(s)
        if stage not in ("generalist", "clusters", "hard_label_student"):  # the control never sees the groups
            parts["spec"] = self.clusters().to_json()
        if stage == "ensembles":
            parts["rules_version"] = ENSEMBLE_RULES
        if stage == "clusters" and self.config.clusters_file:
            parts["clusters_file"] = Path(self.config.clusters_file).read_text()
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage_dir(self, stage: str) -> Path:
        return self.folder / stage

    def specialist_key(self, index: int) -> str:
        """The key of specialist ``index`` alone: the specialist settings, the stages before it and its
        own group (name, position, classes), so editing one group retrains only that specialist."""
        spec = self.clusters()
        name = list(spec.groups)[index]
        parts = {"stage": "specialist", "format": RESULTS_FORMAT, "settings": self._settings("data"),
                 "generalist": self._settings("generalist"), "specialists": self._settings("specialists"),
                 "index": index, "group": name, "classes": list(spec.groups[name]), "class_names": list(spec.class_names)}  # fmt: skip
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def lock(self, *, shared: bool = False) -> runs.RunLock:
        """The run folder's write lock: ``with run.lock(): ...`` (readers need none)."""
        return runs.RunLock(self.folder, shared=shared, log=self.log)

    def is_done(self, stage: str, key: str | None = None, folder: Path | None = None) -> bool:
        """Whether ``stage`` (or the specialist in ``folder``) finished with ``key``: its ``done.json``
        records the key *and* every file it lists is still there with its size."""
        folder = folder or self.stage_dir(stage)
        marker = folder / "done.json"
        if not marker.is_file():
            return False
        try:
            done = runs.read_json(marker)
        except (ValueError, OSError):
            return False
        if not isinstance(done, dict) or done.get("key") != (key or self.key(stage)):
            return False
        files = done.get("files", {})
        if stage == "clusters":
            files = {}
            if not (self.folder / "clusters.json").is_file():
                return False
        return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())

    def _begin(self, folder: Path, key: str) -> None:
        """Start work on a stage folder. Resuming the same key keeps it; finished work for other
        settings is moved aside to ``<folder>.old-<its key>`` (removed once the replacement is done),
        unfinished work for other settings is cleared."""
        owner = folder / "key.txt"
        if folder.exists() and (not owner.is_file() or owner.read_text().strip() != key):
            if (folder / "done.json").is_file():
                old = _read_key(folder)
                aside = folder.with_name(f"{folder.name}.old-{old}")
                if aside.exists():
                    shutil.rmtree(aside)
                folder.rename(aside)
                self.log(f"[{folder.name}] settings changed: previous results kept in {aside} until the new ones are done")
            else:
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(owner, key)

    def _finish(self, folder: Path, key: str, **info: Any) -> None:
        """Mark ``folder`` done with ``key`` (written last, atomically), listing its files and sizes so a
        deleted or truncated file makes the stage count as not done; then drop superseded copies. It also records
        ``torch_threads``, the intra-op thread count the stage ran with: the same seed gives other floats at
        another thread count, so a study warns when its runs mix them."""
        info.setdefault("torch_threads", torch.get_num_threads())
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                 if p.is_file() and p.name not in _NOT_RESULTS and not p.name.startswith(".")}  # fmt: skip
        runs.atomic_write_json(folder / "done.json", {"key": key, **info, "files": files})
        for aside in folder.parent.glob(f"{folder.name}.old-*"):
            shutil.rmtree(aside, ignore_errors=True)

    def _timed(self, stage: str, t0: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ data
    def dataset(self) -> data.Dataset:
        """The run's dataset (loaded once per ``Run`` object)."""
        if "dataset" not in self._memo:
            c = self.config
            t0 = time.perf_counter()
            ds = data.load(c.dataset, root=c.root, download=c.download, image_size=c.image_size,
                           per_class=c.per_class, val_fraction=c.val_fraction, seed=c.data_seed, in_memory=c.in_memory,
                           memory_budget_gb=c.memory_budget_gb, stream_workers=c.stream_workers)  # fmt: skip
            c.validate(ds.num_classes)
            self._memo["dataset"] = ds
            self._timed("data", t0)
            self.log(f"[data] {ds.summary()}")
        return self._memo["dataset"]

    def share_dataset(self, ds: data.Dataset) -> None:
        """Use an already loaded ``ds`` (e.g. the same data for several seeds); it must be the data this
        run's settings load (same name, classes and fingerprint seen by its checkpoints)."""
        self.config.validate(ds.num_classes)
        if ds.name != self.config.dataset:
            raise ConfigError(f"dataset {ds.name!r} handed to a run of dataset={self.config.dataset!r}: pass the run's own data")
        self._memo["dataset"] = ds

    def device(self) -> torch.device:
        return training.resolve_device(self.config.device)

    def train_config(self, *, epochs: int, lr: float, seed_offset: int, soft_weight: float = 0.0,
                     temperature: float = 1.0, desc: str = "") -> training.TrainConfig:
        c = self.config
        return training.TrainConfig(
            epochs=epochs, batch_size=c.batch_size, optimizer=c.optimizer, lr=lr, weight_decay=c.weight_decay,
            schedule=c.schedule, label_smoothing=c.label_smoothing, soft_weight=soft_weight,
            temperature=temperature, device=c.device, seed=c.seed + seed_offset, progress=c.progress,
        )  # fmt: skip

    def model_config(self, *, num_classes: int, width: int | None = None, depth: int | None = None,
                     name: str | None = None) -> models.ModelConfig:
        ds, c = self.dataset(), self.config
        source = self.generalist_source()
        if source is not None and source.has_head and name is None and width is None and depth is None:
            return byog.torchvision_config(source, num_classes=num_classes, in_channels=ds.channels, image_size=ds.image_size,
                                           normalize=c.generalist_normalize, input_size=c.generalist_input_size)  # fmt: skip
        return models.ModelConfig(name=name or c.model, num_classes=num_classes, in_channels=ds.channels,
                                  image_size=ds.image_size, width=width or c.width, depth=depth or c.depth)  # fmt: skip

    # ------------------------------------------------------------------ models
    def _train_model(self, stage: str, *, model: torch.nn.Module, model_config: models.ModelConfig,
                     tc: training.TrainConfig, teacher: training.Teacher | None = None,
                     sample_indices: Callable | None = None, examples_seen: int | None = None) -> ModelResult:
        """Train (resumably) or load a whole-dataset model of the run; save checkpoint and logits. Under
        torchrun every rank trains its shard and only rank 0 writes (:mod:`specialkit.distributed`)."""
        key, folder = self.key(stage), self.stage_dir(stage)
        if not self.is_done(stage, key):
            t0 = time.perf_counter()
            if distributed.is_main():
                self._begin(folder, key)
            distributed.barrier()
            ds = self.dataset()
            self.log(f"[{stage}] training {model_config.name} ({models.count_parameters(model):,} parameters) "
                     f"for {tc.epochs} epochs on {self.device()}")  # fmt: skip
            training.seed_everything(tc.seed)
            history = training.fit(
                model, ds.x_train, ds.y_train, config=tc, x_val=ds.x_val, y_val=ds.y_val, hflip=ds.hflip,
                teacher=teacher, sample_indices=sample_indices, state_path=folder / "state.pt", desc=stage,
            )  # fmt: skip
            seen = history.examples_seen if examples_seen is None else examples_seen
            if not distributed.is_main():
                distributed.barrier()  # rank 0 writes the files below
                return self._load_model_result(stage)
            checkpoints.save_checkpoint(folder / "model.pt", model, model_config=model_config,
                                        class_names=ds.class_names, dataset_fingerprint=ds.fingerprint,
                                        history=history, extra={"stage": stage, "examples_seen": seen})  # fmt: skip
            for split in _SPLITS:
                x, _ = ds.split(split)
                logits = training.predict_logits(model, x, device=self.config.device).numpy()
                runs.save_array(folder / f"logits_{split}.npy", logits)
            (folder / "state.pt").unlink(missing_ok=True)
            self._timed(stage, t0)
            self._finish(folder, key, seconds=round(time.perf_counter() - t0, 2), examples_seen=seen)
            distributed.barrier()
        return self._load_model_result(stage)

    def _load_model_result(self, stage: str) -> ModelResult:
        source = self.generalist_source() if stage == "generalist" else None
        if source is not None and not source.has_head:
            return self._load_given(source)
        if stage not in self._memo:
            folder, ds = self.stage_dir(stage), self.dataset()
            model, info = checkpoints.load_checkpoint(folder / "model.pt", class_names=ds.class_names, dataset_fingerprint=ds.fingerprint,
                                                      stage=stage, required_extra=("examples_seen",))  # fmt: skip
            logits = {s: runs.load_array(folder / f"logits_{s}.npy") for s in _SPLITS}
            self._memo[stage] = ModelResult(stage, model.eval(), _records(info.history), logits, int(info.extra["examples_seen"]))
        return self._memo[stage]

    def generalist(self) -> ModelResult:
        """Stage 1: the generalist over all classes (docs/METHOD.md section 1)."""
        c = self.config
        mc = self.model_config(num_classes=self.dataset().num_classes)
        if c.generalist_from:
            return self._given_generalist(mc)
        if not self.is_done("generalist"):
            training.seed_everything(c.seed)
            model = models.build_model(mc)
            tc = self.train_config(epochs=c.epochs, lr=c.lr, seed_offset=0)
            return self._train_model("generalist", model=model, model_config=mc, tc=tc)
        return self._load_model_result("generalist")

    def _given_generalist(self, mc: models.ModelConfig) -> ModelResult:
        """The generalist of ``generalist_from`` (:mod:`specialkit.byog`): loaded and checked, then its logits on
        every split it has are saved (nothing is written until the file passed every check). No training."""
        source, key, folder = self.generalist_source(), self.key("generalist"), self.stage_dir("generalist")
        if not self.is_done("generalist", key):
            t0, ds, c = time.perf_counter(), self.dataset(), self.config
            model: torch.nn.Module | None = None
            if source.kind == "torchvision":
                model = byog.load_torchvision(source, mc)
            elif source.has_model:
                model = byog.load_scripted(source, normalize=c.generalist_normalize, input_size=c.generalist_input_size, log=self.log)
            if model is None:
                logits = byog.load_predictions(source.path, labels={s: ds.split(s)[1].numpy() for s in ("val", "test")},
                                               class_names=ds.class_names)  # fmt: skip
            else:
                logits = {s: training.predict_logits(model, ds.split(s)[0], device=c.device).numpy() for s in _SPLITS}
                for s, z in logits.items():
                    byog.check_outputs(z, path=source.path, split=s, num_classes=ds.num_classes, rows=len(ds.split(s)[1]))
            self.log(f"[generalist] {source.kind} generalist from {source.path}: not trained by the kit")
            self._begin(folder, key)
            if source.kind == "torchvision":
                extra = {"stage": "generalist", "examples_seen": 0, "generalist_from": c.generalist_from}
                checkpoints.save_checkpoint(folder / "model.pt", model, model_config=mc, class_names=ds.class_names,
                                            dataset_fingerprint=ds.fingerprint, history=None, extra=extra)  # fmt: skip
            elif model is not None:
                with runs.atomic_open(folder / f"model.{source.kind}", "wb") as f, open(source.path, "rb") as src:
                    shutil.copyfileobj(src, f)
            for s, z in logits.items():
                runs.save_array(folder / f"logits_{s}.npy", z)
            self._timed("generalist", t0)
            self._finish(folder, key, seconds=round(time.perf_counter() - t0, 2), examples_seen=0, generalist_from=c.generalist_from)
        return self._load_model_result("generalist")

    def _load_given(self, source: byog.Source) -> ModelResult:
        """A scripted or predictions-only generalist from its stage folder (the run's copy of the file)."""
        if "generalist" not in self._memo:
            folder, c = self.stage_dir("generalist"), self.config
            model = None
            if source.has_model:
                model = byog.load_scripted(source, normalize=c.generalist_normalize, input_size=c.generalist_input_size,
                                           path=folder / f"model.{source.kind}", log=self.log)  # fmt: skip
            logits = {s: runs.load_array(folder / f"logits_{s}.npy") for s in _SPLITS if (folder / f"logits_{s}.npy").is_file()}
            self._memo["generalist"] = ModelResult("generalist", model, [], logits, 0)
        return self._memo["generalist"]

    # ------------------------------------------------------------------ confusion and clusters
    def confusion(self) -> confusion.ConfusionSummary:
        """Confusion, covariance and distances of the generalist on the validation split."""
        if "confusion" not in self._memo:
            ds = self.dataset()
            self._memo["confusion"] = confusion.summarise(ds.y_val.numpy(), self.generalist().val_probs, ds.class_names)
        return self._memo["confusion"]

    def class_map(self, *, method: str = "umap") -> np.ndarray:
        """(C, 2) map of the classes: UMAP on the run's class distance (:meth:`distance`), so classes
        the generalist confuses land close together (saved as ``clusters/class_map_<method>.npy``)."""
        path = self.stage_dir("clusters") / f"class_map_{method}.npy"
        key = self.key("generalist") + self.config.distance
        marker = path.with_suffix(".key")
        if path.is_file() and marker.is_file() and marker.read_text() == key:
            return runs.load_array(path)
        d = self.distance()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="using precomputed metric")
            coords = (confusion.class_map(d, method="umap", metric="precomputed", seed=self.config.seed) if method == "umap"
                      else confusion.class_map(1.0 - d, method=method, seed=self.config.seed))  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        runs.save_array(path, coords)
        runs.atomic_write_text(marker, key)
        return coords

    def distance(self) -> np.ndarray:
        """(C, C) class distance the distance-based methods use: HD-CNN's D from the soft or hard confusion."""
        cs = self.confusion()
        return confusion.confusion_distance(cs.F_soft) if self.config.distance == "soft" else cs.distance

    def compute_clusters(self) -> clusters.ClusterSpec:
        """The configured clustering of the generalist's confusions (not saved)."""
        c, cs, ds = self.config, self.confusion(), self.dataset()
        spec = clusters.cluster(c.method, cov=cs.covariance, distance=self.distance(), class_names=ds.class_names,
                                k=c.k, seed=c.seed)  # fmt: skip
        if c.overlap != "none":
            spec = clusters.grow_overlap(spec, cs.F, rule=c.overlap, gamma=c.gamma, r=c.top_r,
                                         max_size=c.max_group_size)  # fmt: skip
        return spec

    def clusters(self) -> clusters.ClusterSpec:
        """Stage 2: the cluster spec — ``clusters.json`` when up to date, else computed and saved."""
        if "clusters" in self._memo:
            return self._memo["clusters"]
        key = self.key("clusters")
        path = self.folder / "clusters.json"
        if not self.is_done("clusters", key) or not path.is_file():
            ds = self.dataset()
            if self.config.clusters_file:
                spec = clusters.ClusterSpec.load(self.config.clusters_file).for_dataset(ds.class_names)
                source = str(self.config.clusters_file)
            else:
                spec = self.compute_clusters()
                source = self.config.method
                c = self.config
                self._check_spec(spec, f"the {c.k} groups computed for {ds.num_classes} classes", fix=(
                    f"with so few classes use overlap=none (now {c.overlap}; --overlap none), which keeps each class in one group"
                    + (f", or a larger k (now {c.k}; --k)" if c.k < ds.num_classes // 2 else "") + ", or a clusters_file of your own"))
            self._write_clusters(spec, key, source)
        spec = clusters.ClusterSpec.load(path).for_dataset(self.dataset().class_names)
        self._check_spec(spec, path)
        self._memo["clusters"] = spec
        return spec

    def _check_spec(self, spec: clusters.ClusterSpec, where: Path | str, *, fix: str | None = None) -> None:
        """Reject groups a specialist cannot learn from (``fix``: what to change, for a group of every class);
        log when most classes are in no group."""
        clusters.check_trainable(spec, where=str(where), fix=fix)
        warning = clusters.coverage_warning(spec)
        if warning:
            self.log(f"[clusters] warning: {warning}")

    def save_clusters(self, spec: clusters.ClusterSpec) -> None:
        """Use ``spec`` (e.g. edited in the picker) from now on; the stages after it re-run."""
        spec = spec.for_dataset(self.dataset().class_names)
        self._check_spec(spec, "the spec passed to save_clusters")
        self._write_clusters(spec, self.key("clusters"), "user")
        self._memo = {k: v for k, v in self._memo.items() if k in ("dataset", "generalist", "confusion")}

    def _write_clusters(self, spec: clusters.ClusterSpec, key: str, source: str) -> None:
        """Save ``spec`` as ``clusters.json``. A clusters.json edited by hand (it differs from what the
        last clustering wrote) is never overwritten silently: it is copied to
        ``clusters.edited-<hash>.json`` first and the log says so (``source="user"`` replaces it knowingly)."""
        folder, path = self.stage_dir("clusters"), self.folder / "clusters.json"
        folder.mkdir(parents=True, exist_ok=True)
        if source != "user" and path.is_file():
            text = path.read_text(errors="replace")
            written = None
            if (folder / "done.json").is_file():
                try:
                    written = runs.read_json(folder / "done.json").get("sha")
                except (ValueError, AttributeError):
                    written = None
            sha = _sha(text)
            if sha != written and text.strip() != spec.to_json().strip():
                backup = self.folder / f"clusters.edited-{sha[:8]}.json"
                runs.atomic_write_text(backup, text)
                self.log(f"[clusters] {path} was edited by hand and the clustering settings changed: your version is "
                         f"kept in {backup}; to train on it, pass clusters_file={str(backup)!r}")  # fmt: skip
        spec.save(path)
        self._finish(folder, key, source=source, groups=len(spec.groups), sha=_sha(path.read_text()))

    # ------------------------------------------------------------------ specialists
    def specialist_config(self) -> specialists.SpecialistConfig:
        c = self.config
        tc = self.train_config(epochs=c.specialist_epochs, lr=c.specialist_lr, seed_offset=1000,
                               soft_weight=c.specialist_soft_weight, temperature=c.specialist_temperature)  # fmt: skip
        model, width, depth = c.specialist_model, c.specialist_width, c.specialist_depth
        if self.scratch_reason():
            model, width, depth = model or c.model, width or c.width, depth or c.depth
        return specialists.SpecialistConfig(model=model, width=width, depth=depth,
                                            special_fraction=c.special_fraction, soft_weight=c.specialist_soft_weight,
                                            temperature=c.specialist_temperature, correction=c.dustbin_correction, train=tc,
                                            init=c.specialist_init, shared_stages=c.specialist_shared_stages)  # fmt: skip

    def scratch_reason(self) -> str | None:
        """Why specialists train from scratch although no specialist architecture is set (a ``generalist_from``
        without a head the kit can cut), or ``None``."""
        return byog.scratch_reason(self.generalist_source(), value=self.config.generalist_from or "")

    def specialist_dir(self, index: int) -> Path:
        """``specialists/<index>-<group name>``; a long or odd group name is shortened to a safe file name."""
        name = list(self.clusters().groups)[index]
        safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in name)
        if len(safe) > 48 or safe != name:
            safe = f"{safe[:40]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
        return self.stage_dir("specialists") / f"{index:02d}-{safe}"

    def train_specialist(self, index: int) -> specialists.TrainedSpecialist:
        """Train (resumably) or load specialist ``index``; independent of the others, so jobs can fan out."""
        spec, ds = self.clusters(), self.dataset()
        if not 0 <= index < len(spec.groups):
            raise IndexError(f"specialist index {index} out of range: this run has {len(spec.groups)} groups (0..{len(spec.groups) - 1})")
        key, folder = self.specialist_key(index), self.specialist_dir(index)
        if not self.is_done("specialists", key, folder):
            t0 = time.perf_counter()
            self._begin(folder, key)
            group, classes = list(spec.groups)[index], spec.indices()[index]
            gen = self.generalist()
            cfg = self.specialist_config()
            if self.scratch_reason():
                self.log(f"[specialists] {self.scratch_reason()} ({cfg.model}, width {cfg.width}, depth {cfg.depth})")
            training.seed_everything(cfg.train.seed + index)
            trained = specialists.train_specialist(ds, classes, config=cfg, generalist=gen.model,
                                                   state_path=folder / "state.pt", desc=f"specialist {index} ({group})")  # fmt: skip
            specialists.save_specialist(folder / "model.pt", trained, ds=ds, group=group)
            for split in ("val", "test"):
                x, _ = ds.split(split)
                logits = training.predict_logits(trained.model, x, device=self.config.device).numpy()
                runs.save_array(folder / f"logits_{split}.npy", logits)
                runs.save_array(folder / f"probs_{split}.npy", specialists.apply_dustbin_shift(logits, trained.dustbin_shift))
            (folder / "state.pt").unlink(missing_ok=True)
            self._timed("specialists", t0)
            self._finish(folder, key, seconds=round(time.perf_counter() - t0, 2), group=group)
        return self._load_specialist(index)

    def _load_specialist(self, index: int) -> specialists.TrainedSpecialist:
        memo = f"specialist-{index}"
        if memo not in self._memo:
            self._memo[memo] = specialists.load_specialist(self.specialist_dir(index) / "model.pt", ds=self.dataset(),
                                                           trunk=self.shared_trunk())  # fmt: skip
        return self._memo[memo]

    def shared_trunk(self) -> models.Trunk | None:
        """The generalist's first ``specialist_shared_stages`` stages, one object every specialist runs on (None when 0)."""
        s = self.config.specialist_shared_stages
        if not s:
            return None
        if "trunk" not in self._memo:
            self._memo["trunk"] = self.generalist().model.trunk(s)
        return self._memo["trunk"]

    def specialists(self) -> list[specialists.TrainedSpecialist]:
        """Stage 3: every specialist (finished ones are loaded, not retrained)."""
        n = len(self.clusters().groups)
        out = [self.train_specialist(i) for i in range(n)]
        folder = self.stage_dir("specialists")
        if not self.is_done("specialists"):
            self._finish(folder, self.key("specialists"), count=n)
        return out

    def specialist_probs(self, split: str) -> list[np.ndarray]:
        """Per specialist, (N, |S_m| + 1) probabilities on ``split`` (val/test), dustbin last."""
        self.specialists()
        return [runs.load_array(self.specialist_dir(i) / f"probs_{split}.npy") for i in range(len(self.clusters().groups))]

    # ------------------------------------------------------------------ baselines
    def compute_budget(self) -> dict[str, Any]:
        """The extra training compute the specialists used and what the compute-matched generalist gets.

        Training FLOPs are counted as 3 x forward FLOPs per example-pass (forward + backward). With
        ``compute_match="flops"`` the generalist gets as many extra passes as cost the same FLOPs
        (``passes x specialist FLOPs / generalist FLOPs``, summed over specialists); with ``"passes"``
        as many example-passes. Returns both sides in passes and FLOPs.
        """
        ds, gen = self.dataset(), self.generalist()
        shape = (1, ds.channels, ds.image_size, ds.image_size)
        gen_flops = models.count_flops(gen.model, shape)
        sps = self.specialists()
        spec_passes = int(sum(s.examples_seen for s in sps))
        spec_train_flops = float(sum(s.examples_seen * specialists.train_flops_per_example(s.model, shape) for s in sps))
        if self.config.compute_match == "passes":
            passes = spec_passes
        else:
            passes = int(round(spec_train_flops / (3 * gen_flops)))
        return {"match": self.config.compute_match, "specialist_passes": spec_passes,
                "specialist_train_flops": spec_train_flops, "generalist_forward_flops": int(gen_flops),
                "compute_matched_passes": max(passes, 1), "compute_matched_train_flops": float(3 * gen_flops * max(passes, 1))}  # fmt: skip

    def compute_matched(self) -> ModelResult:
        """The generalist trained further for the training compute all specialists used (``compute_match``:
        the same FLOPs, or the same example-passes; docs/METHOD.md §7). A ``generalist_from`` torchvision model is
        fine-tuned for that budget; other kinds have none (:meth:`skip_reason`, a ``ConfigError`` here)."""
        reason = self.skip_reason("compute_matched")
        if reason:
            raise ConfigError(f"{reason}; set compute_matched=false (or bring a torchvision:<arch>:<weights> generalist)")
        extra = self.compute_budget()["compute_matched_passes"]
        if not self.is_done("compute_matched"):
            ds, c = self.dataset(), self.config
            n = len(ds.y_train)
            epochs = max(1, round(extra / n))
            per_epoch = max(1, extra // epochs)
            model = checkpoints.load_checkpoint(self.stage_dir("generalist") / "model.pt")[0]
            tc = self.train_config(epochs=epochs, lr=c.lr * 0.3, seed_offset=2000)
            sampler = _fixed_size_sampler(n, per_epoch)
            return self._train_model("compute_matched", model=model, model_config=self.model_config(num_classes=ds.num_classes),
                                     tc=tc, sample_indices=sampler, examples_seen=per_epoch * epochs)  # fmt: skip
        return self._load_model_result("compute_matched")

    # ------------------------------------------------------------------ ensembles
    def groups(self) -> list[np.ndarray]:
        return self.clusters().indices()

    def activation(self, split: str) -> np.ndarray:
        """(N, M) bool: which specialists the generalist's top-n classes switch on."""
        return ensemble.activation(self.generalist().probs(split), self.groups(), top_n=self.config.top_n)

    def combine(self, rule: str, split: str) -> np.ndarray:
        """(N, C) combined distribution of ``rule`` on ``split`` (``val``/``test``)."""
        c = self.config
        p_gen = self.generalist().probs(split)
        if rule == "generalist":
            return p_gen
        outs = [ensemble.SpecialistOutputs(classes=g, probs=p) for g, p in zip(self.groups(), self.specialist_probs(split))]
        if rule == "kl":
            return ensemble.combine("kl", p_gen, outs, active=self.activation(split))
        cal = self.calibrations() if c.calibrate_specialists else None
        if rule == "top_confident":
            active = self.activation(split) if c.top_confident_gated else None
            return ensemble.combine("top_confident", p_gen, outs, n=c.top_confident_n, active=active, calibration=cal)
        return ensemble.combine(rule, p_gen, outs, threshold=c.moe_threshold, calibration=cal)

    def calibrations(self) -> list[ensemble.Calibration]:
        """Per specialist, its temperature and mean output fitted on the validation images (never the test set):
        how ``top_confident`` and ``moe`` read it as evidence (``calibrate_specialists``)."""
        if "calibrations" not in self._memo:
            y_val = self.dataset().split("val")[1].numpy()
            self._memo["calibrations"] = [ensemble.calibrate(p, g, y_val) for g, p in zip(self.groups(), self.specialist_probs("val"))]
        return self._memo["calibrations"]

    def ensembles(self) -> dict[str, np.ndarray]:
        """Stage 4: every rule's (N, C) test distribution (saved as ``ensembles/q_test_<rule>.npy``)."""
        key, folder = self.key("ensembles"), self.stage_dir("ensembles")
        if not self.is_done("ensembles", key):
            t0 = time.perf_counter()
            self._begin(folder, key)
            for rule in self.config.rules:
                for split in ("val", "test"):
                    runs.save_array(folder / f"q_{split}_{rule}.npy", self.combine(rule, split))
            self._timed("ensembles", t0)
            self._finish(folder, key, rules=list(self.config.rules))
        return {rule: runs.load_array(folder / f"q_test_{rule}.npy") for rule in self.config.rules}

    # ------------------------------------------------------------------ distillation
    def ensemble_teacher(self) -> training.Teacher:
        """The ``kl`` ensemble as a per-batch teacher for the student: on each augmented training batch, the
        generalist's top-n switch specialists on, only the active ones run, and their opinions are combined
        (``ensemble.combine_kl``); the result is softened at ``distill_temperature``."""
        return distillation.ensemble_teacher(self.generalist().model, self.specialists(), top_n=self.config.top_n,
                                        temperature=self.config.distill_temperature)  # fmt: skip

    def distill(self) -> ModelResult:
        """Stage 5: one student trained on the ensemble's q at temperature T (computed on the same augmented
        batch the student sees) plus hard labels, the soft term scaled by T²."""
        c = self.config
        reason = self.skip_reason("distill")
        if reason:
            raise ConfigError(f"{reason}; bring the model itself (torchvision:, torchscript: or export:) to distil")
        if not self.is_done("distill"):
            return self._train_student("distill", teacher=self.ensemble_teacher() if c.distill_soft_weight > 0 else None)
        return self._load_model_result("distill")

    def hard_label_student(self) -> ModelResult:
        """Stage 6, the student's control: the student's start, epochs, learning rate and seed, trained on the hard
        labels alone (no teacher). The student's gain over it is what distillation adds; its gain over the
        generalist is what the extra training alone gives."""
        reason = self.skip_reason("hard_label_student")
        if reason:
            raise ConfigError(f"{reason}: there is no hard-label control; set hard_label_control=true (and bring a model) to train it")
        if not self.is_done("hard_label_student"):
            return self._train_student("hard_label_student", teacher=None)
        return self._load_model_result("hard_label_student")

    def _train_student(self, stage: str, *, teacher: training.Teacher | None) -> ModelResult:
        """A student of ``stage``: the generalist's weights (``student_init``) or scratch, ``student_epochs`` at the
        generalist's lr (x 0.3 from the generalist), the soft term only with a ``teacher``."""
        c = self.config
        ds = self.dataset()
        mc = self.model_config(num_classes=ds.num_classes, width=c.student_width, depth=c.student_depth)
        from_gen = (c.student_init == "generalist" and mc == self.model_config(num_classes=ds.num_classes)
                    and self.scratch_reason() is None)  # fmt: skip
        self.generalist()  # on a fresh run, train it first (its checkpoint is read below)
        training.seed_everything(c.seed + 3000)
        if from_gen:
            model = checkpoints.load_checkpoint(self.stage_dir("generalist") / "model.pt")[0]
        else:
            model = models.build_model(mc)
        self.log(f"[{stage}] student initialised from {'the generalist' if from_gen else 'scratch'}"
                 + ("" if teacher is not None else ", hard labels only"))  # fmt: skip
        soft = c.distill_soft_weight if teacher is not None else 0.0
        tc = self.train_config(epochs=c.student_epochs, lr=c.lr * (0.3 if from_gen else 1.0), seed_offset=3000,
                               soft_weight=soft, temperature=c.distill_temperature)  # fmt: skip
        return self._train_model(stage, model=model, model_config=mc, tc=tc, teacher=teacher)

    # ------------------------------------------------------------------ everything
    def preflight(self) -> None:
        """Check everything that can be checked before training: the dataset loads, ``k`` and
        ``top_n`` fit its classes, and a given clusters file names only its classes."""
        ds = self.dataset()
        source = self.generalist_source()
        if source is not None and not source.has_model and self.config.specialist_soft_weight > 0:
            raise ConfigError(f"specialist_soft_weight={self.config.specialist_soft_weight} needs the generalist's soft targets on "
                              f"training batches; generalist_from={self.config.generalist_from!r} holds predictions only: set it to 0")
        if self.config.clusters_file:
            path = Path(self.config.clusters_file)
            if not path.is_file():
                raise ConfigError(f"clusters_file={str(path)!r} not found; save one from notebook 03 or with ClusterSpec.save")
            clusters.ClusterSpec.load(path).for_dataset(ds.class_names)

    def run_all(self) -> dict[str, Any]:
        """Every stage in order, then ``metrics.json`` and (``html_report``) ``report.html``; returns the metrics."""
        self.preflight()
        self.ensure_through(STAGES[-1])
        from .report import write_report

        metrics = self.metrics()
        if self.config.html_report:
            write_report(self)
        return metrics

    def ensure_through(self, last: str) -> "Run":
        """Every stage up to and including ``last``, in order, as :meth:`run_all` runs them: what is on disk and
        valid is loaded, what is missing (a deleted ``model.pt``, say) is trained again; a stage this run skips
        (its reason logged) or turns off (``compute_matched=false``) is passed over. Returns the run."""
        if last not in STAGES:
            raise ConfigError(f"unknown stage {last!r}; choose from {', '.join(STAGES)}")
        for stage in STAGES[: STAGES.index(last) + 1]:
            reason = self.skip_reason(stage)
            if reason:
                self.log(f"[{stage}] skipped: {reason}")
            elif stage != "compute_matched" or self.config.compute_matched:
                self._stage(stage)
        return self

    def ensure(self, *stages: str) -> "Run":
        """Make sure each stage of ``stages`` is finished (train what is not on disk, load the rest); returns
        the run, e.g. ``run.ensure("compute_matched", "ensembles", "distill").metrics()``."""
        for stage in stages:
            if stage not in STAGES:
                raise ConfigError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
            getattr(self, stage)()
        return self

    def _stage(self, stage: str) -> Any:
        t0 = time.perf_counter()
        out = getattr(self, stage)()
        self.log(f"[{stage}] done in {time.perf_counter() - t0:.1f} s")
        return out

    def metrics(self) -> dict[str, Any]:
        """Every number of the run (also written to ``metrics.json``)."""
        from .metrics import compute_metrics

        m = compute_metrics(self, measure_latency=self.config.latency)
        runs.atomic_write_json(self.folder / "metrics.json", m)
        return m


SEEDS_FILE = "seeds.json"


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
    marker = parent / SEEDS_FILE
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
    from .metrics import aggregate_seeds
    from .report import write_seeds_report

    per_seed = {}
    for s, run in seed_runs(parent, config, log=log).items():
        log(f"[seeds] seed {s}: {run.folder}")
        per_seed[s] = run.run_all()
    summary = {"run": config.name, "seeds": aggregate_seeds(per_seed),
               "runs": {str(s): str(Path(parent) / f"seed-{s}") for s in per_seed}}  # fmt: skip
    runs.atomic_write_json(Path(parent) / "metrics.json", summary)
    write_seeds_report(Path(parent), summary, per_seed)
    return summary


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read_key(folder: Path) -> str:
    """The key a stage folder was made for (``done.json``, else ``key.txt``), or ``unknown``."""
    for name in ("done.json", "key.txt"):
        try:
            text = (folder / name).read_text().strip()
            key = json.loads(text).get("key") if name == "done.json" else text
            if key and all(ch.isalnum() for ch in key):
                return str(key)[:32]
        except (OSError, ValueError, AttributeError):
            continue
    return "unknown"


def _fixed_size_sampler(n: int, per_epoch: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    """Epochs of exactly ``per_epoch`` examples: random permutations of ``n``, concatenated as needed."""

    def sample(epoch: int, generator: torch.Generator) -> torch.Tensor:
        reps = math.ceil(per_epoch / n)
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:per_epoch]

    return sample


def _records(history: training.History | None) -> list[dict[str, Any]]:
    """Per-epoch records as plain dicts (what notebooks and plots take)."""
    return [] if history is None else history.to_dict()["records"]


def check_before_training(config: PipelineConfig) -> None:
    """Fail fast, before a run folder exists, on a dataset name the registry does not know."""
    if config.dataset not in data.available():
        raise ConfigError(f"dataset={config.dataset!r} is unknown; choose one of {', '.join(data.available())}")


# ---------------------------------------------------------------------- views used by notebooks and the report
def method_specs(run: Run, *, methods: tuple[str, ...] | None = None) -> dict[str, clusters.ClusterSpec]:
    """Each clustering method's spec for the run's k and seed, for a side-by-side comparison."""
    from .config import METHODS

    cs, ds, c = run.confusion(), run.dataset(), run.config
    return {m: clusters.cluster(m, cov=cs.covariance, distance=run.distance(), class_names=ds.class_names, k=c.k, seed=c.seed)
            for m in (methods or METHODS)}  # fmt: skip


def confused_examples(run: Run, *, pairs: int = 6, per_pair: int = 4) -> np.ndarray:
    """Indices into the validation split: up to ``per_pair`` misclassified images of each of the top ``pairs`` (true, predicted) pairs."""
    ds, cs = run.dataset(), run.confusion()
    y = ds.y_val.numpy()
    pred = run.generalist().val_probs.argmax(axis=1)
    names = {n: i for i, n in enumerate(ds.class_names)}
    out: list[int] = []
    for row in cs.top_pairs(pairs).itertuples():
        t, p = names[row.true], names[row.predicted]
        out += np.flatnonzero((y == t) & (pred == p))[:per_pair].tolist()
    return np.asarray(out, dtype=np.int64)
