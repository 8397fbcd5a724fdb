"""``PipelineConfig``: every knob of a run, in one frozen dataclass that a JSON file round-trips.

A config written by one run (``runs/<name>/config.json``) reproduces it. Unknown keys and impossible
values fail before any training with a message that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import stages
from .errors import ConfigError

__all__ = [
    "PipelineConfig",
    "ConfigError",
    "SMOKE_ENV",
    "smoke_mode",
    "RULES",
    "METHODS",
    "OVERLAPS",
    "CORRECTIONS",
    "SETTING_STAGES",
    "KEY_STAGES",
    "RENAMED",
    "stage_of",
    "stage_keys",
    "key_name",
    "cli_settings",
    "picker_settings",
    "choices_of",
    "settings_markdown",
    "SPECIALIST_INITS",
    "hashed_now",
    "PRESETS",
    "parse_value",
    "parse_overrides",
]

SMOKE_ENV = "SPECIALKIT_SMOKE"
RULES = ("generalist", "kl", "kl_calibrated", "top_confident", "moe")
METHODS = ("covariance_kmeans", "spectral", "agglomerative", "balanced")
OVERLAPS = ("none", "hdcnn", "top_r")
CORRECTIONS = ("odds", "paper_literal", "prior_match", "none")
SPECIALIST_INITS = ("auto", "generalist", "scratch", "distill")
KEY_STAGES = stages.KEY_GROUPS
"""The stages whose settings enter the cache keys (``pipeline.Run.key``), in pipeline order."""
SETTING_STAGES = (*KEY_STAGES, "metrics", "run")
"""Every field's ``stage``: a pipeline stage, ``metrics`` (changes the reported intervals only) or ``run``
(changes no number: the run's name, the device, progress bars, the list of seeds, free notes)."""
RENAMED = {"temperature": "specialist_temperature"}
"""Old config keys -> their new names; an old key is refused with the new name (no silent fallback)."""


def smoke_mode() -> bool:
    """True when ``SPECIALKIT_SMOKE`` is set to something other than ``0``/empty (quick settings)."""
    return os.environ.get(SMOKE_ENV, "0").strip() not in ("", "0", "false", "no")


def _setting(
    default: Any,
    stage: str,
    *,
    cli: str | None = None,
    in_key: bool = True,
    key_name: str | None = None,
    choices: tuple[str, ...] | None = None,
    picker: str | None = None,
    key_if_set: bool = False,
) -> Any:
    """A ``PipelineConfig`` field routed by its metadata, the one place that says where a setting goes.

    Args:
        default: the default value.
        stage: one of :data:`SETTING_STAGES`, the stage whose results the setting changes.
        cli: the help text of its ``specialkit run --<flag>``; ``None`` = no flag (set it in a config file).
        in_key: ``False`` for a setting of a key stage that stays out of the stage's cache key
            (``download``, ``clusters_file`` (hashed by content in ``Run.key``), ``compute_matched``).
        key_name: the name the setting has in the cache key when it was renamed (old runs stay valid).
        choices: the allowed values of a string option (checked by ``validate``).
        picker: the name of the ``widgets.ClusterPicker`` argument the setting starts.
        key_if_set: a setting added after runs were trained: it enters the cache key only when it differs from
            its default, so the stages those runs trained stay valid.
    """
    if stage not in SETTING_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(SETTING_STAGES)}: route the setting to one of them")
    meta: dict[str, Any] = {"stage": stage, "in_key": in_key and stage in KEY_STAGES}
    if key_if_set:
        meta["key_if_set"] = True
    for k, v in (("cli", cli), ("key_name", key_name), ("choices", choices), ("picker", picker)):
        if v is not None:
            meta[k] = v
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of one run. Defaults are the ``make demo`` settings (≤ 5 min on 2 CPU cores).

    Each field's metadata routes it (:func:`_setting`): its ``stage``, whether it enters that stage's
    cache key, its ``specialkit run`` flag and help, its choices and its ``ClusterPicker`` control;
    :func:`stage_keys`, :func:`cli_settings` and :func:`picker_settings` read them.

    Data: ``dataset``, ``root``, ``download``, ``image_size``, ``per_class``, ``val_fraction``; how image
    folders are read (out of every cache key: both ways give the same numbers): ``in_memory`` (``null`` =
    decode into memory when the images fit ``memory_budget_gb``, else stream them from disk through a
    ``DataLoader``; ``true``/``false`` forces either), ``memory_budget_gb`` (``null`` = a quarter of the RAM),
    ``stream_workers`` (decoding worker processes of the streaming path).
    Generalist: ``model`` (``cnn`` | ``resnet18``), ``width``, ``depth``, ``epochs``, ``batch_size``,
    ``lr``, ``optimizer``, ``schedule``, ``weight_decay``, ``label_smoothing``; or a generalist brought
    from elsewhere, not trained: ``generalist_from`` (``torchvision:<arch>:<weights>``, ``torchscript:<file>``,
    ``export:<file.pt2>``, ``predictions:<file.npz>``; see :mod:`specialkit.byog`), with its input
    ``generalist_normalize`` (``imagenet`` | ``none``) and ``generalist_input_size`` (these three enter the
    generalist's key only when ``generalist_from`` is set, with the sha256 of the file).
    Clusters: ``method`` (``balanced`` by default; ``covariance_kmeans`` is the paper's), ``distance``
    (``soft``: HD-CNN's distance from the summed predicted probabilities per true class, stable when
    the generalist makes few errors; ``hard``: from argmax confusions), ``k``, ``overlap``
    (``none`` | ``hdcnn`` | ``top_r``), ``gamma``, ``top_r``,
    ``max_group_size``, ``clusters_file`` (a spec to use instead of clustering).
    Specialists: ``specialist_model`` (None = the generalist's architecture, initialised from it),
    ``specialist_width``, ``specialist_depth``, ``specialist_epochs``, ``specialist_lr``,
    ``special_fraction``, ``specialist_soft_weight``, ``specialist_temperature`` (T of the
    generalist's soft targets), ``dustbin_correction``
    (``odds``: add log r, the Bayes odds correction, to the dustbin logit; ``paper_literal``: add
    log(f/pi); ``prior_match``: the shift that makes the mean dustbin probability on the validation
    images equal their share of other classes; ``none``).
    Ensemble: ``top_n`` (the paper's n), ``rules``, ``top_confident_n``, ``top_confident_gated``
    (only the specialists the generalist's top-n switch on are candidates), ``moe_threshold``, ``skip_threshold``
    (a specialist the top-n switch on runs only when the generalist's mass on its group reaches it; 0 = always),
    ``skip_confident`` (no specialist runs for an image whose generalist top-1 probability exceeds it; 1 = always
    run; ``frontier.choose_confident`` picks it on the validation images), ``max_active`` (the most specialists one
    image runs, those whose group holds the most generalist mass; 0 = no limit),
    ``calibrate_specialists`` (default true: ``top_confident`` and ``moe`` temper each specialist on the
    validation images and read it as evidence against its mean output there, so a specialist that knows
    nothing leaves the generalist's answer unchanged; false: the rules as first built, which a bad
    specialist can break; ``kl``, the paper's rule, is the same either way, and ``kl_calibrated``, its robust
    sibling, always reads calibrated evidence).
    Baselines and distillation: ``compute_matched``, ``compute_match`` (``flops``: the extra
    generalist passes cost as many FLOPs as the specialists' training passes; ``passes``: as many
    example-passes), ``student_matched`` (default true: the stage ``student_matched`` trains the generalist further
    for the student's whole budget, the specialists' training, the teacher's forward passes and the student's own
    passes, matched the same way), ``student_init`` (``generalist``: the student starts from the generalist's
    weights when it has the generalist's architecture, and is fine-tuned on the ensemble's targets;
    ``scratch``), ``student_width``, ``student_depth``, ``student_epochs``,
    ``distill_temperature``, ``distill_soft_weight``, ``hard_label_control`` (default true: the stage
    ``hard_label_student`` trains the student's control: the same start, epochs and learning rate on the hard
    labels alone, so the report can tell distillation from extra training), ``distill_mixup`` (mixup's alpha
    for every batch of the student and of its control, the teacher asked on the mixed images; 0 = off, and
    then it stays out of both keys).
    Run: ``name``, ``device`` (``auto`` | ``cpu`` | ``cuda``), ``seed`` (training randomness),
    ``data_seed`` (the data: rendering, subset and split; fixed across ``seeds`` so every seed is
    scored on the same test images), ``seeds`` (several seeds: one run folder each, see
    ``pipeline.run_seeds``), ``bootstrap_resamples``, ``latency`` (measure seconds per image in the
    metrics; ``False`` skips it, e.g. in quick studies), ``html_report`` (``run_all`` writes
    ``report.html``; ``False`` leaves it to ``specialkit report``), ``progress``.
    """

    name: str = _setting("demo", "run", cli="run name: the folder runs/<name>")
    dataset: str = _setting(
        "glyphs",
        "data",
        cli="glyphs | glyphs_hard (built in) | cifar100 | cifar10 | mnist | "
        "fashion_mnist | tiny_imagenet | imagefolder | imagenet",
    )
    root: str | None = _setting(None, "data", cli="folder with the dataset's files")
    download: bool = _setting(False, "data", in_key=False)
    image_size: int | None = _setting(None, "data", cli="resize images to this side, e.g. 32")
    per_class: int | None = _setting(300, "data", cli="training images per class (subset)")
    val_fraction: float = _setting(0.15, "data")
    in_memory: bool | None = _setting(None, "data", in_key=False)
    memory_budget_gb: float | None = _setting(
        None,
        "data",
        in_key=False,
        cli="decode image folders into memory up to this many GB, else stream them "
        "from disk (default a quarter of the RAM)",
    )
    stream_workers: int = _setting(
        2, "data", in_key=False, cli="worker processes decoding batches on the streaming path"
    )
    model: str = _setting("cnn", "generalist", cli="generalist architecture: cnn | resnet18")
    width: int = _setting(16, "generalist", cli="generalist width (cnn channels)")
    depth: int = _setting(3, "generalist", cli="generalist depth (cnn stages)")
    epochs: int = _setting(6, "generalist", cli="generalist epochs")
    batch_size: int = _setting(128, "generalist", cli="batch size")
    lr: float = _setting(0.05, "generalist", cli="generalist learning rate")
    optimizer: str = _setting("sgd", "generalist", choices=("sgd", "adamw"))
    schedule: str = _setting("onecycle", "generalist", choices=("onecycle", "cosine", "constant"))
    weight_decay: float = _setting(5e-4, "generalist")
    label_smoothing: float = _setting(0.0, "generalist")
    generalist_from: str | None = _setting(
        None,
        "generalist",
        in_key=False,
        cli="bring your own generalist, no training: torchvision:<arch>:<weights.pth> | "
        "torchscript:<model.pt> | export:<model.pt2> | predictions:<preds.npz> (torchscript and "
        "export files are programs that run their own code: bring only files you trust; "
        "torchvision: loads weights only)",
    )
    generalist_normalize: str = _setting(
        "imagenet",
        "generalist",
        in_key=False,
        choices=("imagenet", "none"),
        cli="input normalisation of a generalist_from model: imagenet | none",
    )
    generalist_input_size: int | None = _setting(
        None, "generalist", in_key=False, cli="resize images to this side for a generalist_from model (e.g. 224)"
    )
    method: str = _setting(
        "balanced",
        "clusters",
        cli="clustering: covariance_kmeans (paper) | spectral | agglomerative | balanced",
        choices=METHODS,
        picker="method",
    )
    distance: str = _setting("soft", "clusters", choices=("soft", "hard"))
    k: int = _setting(8, "clusters", cli="number of groups (= specialists)", picker="k")
    overlap: str = _setting("top_r", "clusters", cli="none | hdcnn | top_r", choices=OVERLAPS, picker="overlap")
    gamma: float = _setting(5.0, "clusters", picker="gamma")
    top_r: int = _setting(2, "clusters", picker="r")
    max_group_size: int | None = _setting(None, "clusters", picker="max_group_size")
    clusters_file: str | None = _setting(
        None, "clusters", in_key=False, cli="use this cluster spec JSON instead of clustering"
    )
    specialist_model: str | None = _setting(
        None, "specialists", cli="specialist architecture (default: the generalist's, initialised from it)"
    )
    specialist_width: int | None = _setting(None, "specialists", cli="specialist width")
    specialist_depth: int | None = _setting(None, "specialists", cli="specialist depth")
    specialist_epochs: int = _setting(2, "specialists", cli="specialist epochs")
    specialist_lr: float = _setting(0.02, "specialists")
    special_fraction: float = _setting(0.5, "specialists")
    specialist_soft_weight: float = _setting(
        0.0, "specialists", cli="weight of the generalist's soft targets for specialists (paper §6)"
    )
    specialist_temperature: float = _setting(
        2.0,
        "specialists",
        key_name="temperature",
        cli="temperature T of the generalist's soft targets for specialists (used when --specialist-soft-weight > 0)",
    )
    dustbin_correction: str = _setting("prior_match", "specialists", choices=CORRECTIONS)
    specialist_shared_stages: int = _setting(
        0,
        "specialists",
        key_if_set=True,
        cli="freeze and share the generalist's first N stages; specialists train and "
        "store only the rest (0 = whole specialists)",
    )
    specialist_delta_rank: int = _setting(
        0,
        "specialists",
        key_if_set=True,
        cli="with --specialist-shared-stages: train and store each specialist's own convolutions as rank-r deltas "
        "on the generalist's (0 = dense layers)",
    )
    specialist_init: str = _setting(
        "auto",
        "specialists",
        key_if_set=True,
        choices=SPECIALIST_INITS,
        cli="auto | generalist | scratch | distill: how a specialist starts (auto: from the "
        "generalist when the architecture matches, else scratch)",
    )
    top_n: int = _setting(1, "ensembles", cli="generalist top-n classes that switch specialists on (paper: 1)")
    rules: tuple[str, ...] = _setting(RULES, "ensembles")
    top_confident_n: int = _setting(2, "ensembles")
    top_confident_gated: bool = _setting(True, "ensembles")
    moe_threshold: float = _setting(0.0, "ensembles")
    skip_threshold: float = _setting(
        0.0,
        "ensembles",
        key_if_set=True,
        cli="run a specialist the top-n switch on only when the generalist's mass on its group is at least this "
        "(HD-CNN's conditional execution; 0 = never skip, the paper's rule)",
    )
    skip_confident: float = _setting(
        1.0,
        "ensembles",
        key_if_set=True,
        cli="run no specialist for an image whose generalist top-1 probability exceeds this (the generalist answers "
        "alone where it is sure; 1 = never skip, the paper's rule)",
    )
    max_active: int = _setting(
        0,
        "ensembles",
        key_if_set=True,
        cli="run at most this many specialists per image: of those switched on, the ones whose group holds the most "
        "generalist mass (where groups overlap the top class switches on several; 0 = every one, the paper's rule)",
    )
    calibrate_specialists: bool = _setting(True, "ensembles", key_if_set=True)
    compute_matched: bool = _setting(True, "compute_matched", in_key=False)
    compute_match: str = _setting("flops", "compute_matched", choices=("flops", "passes"))
    student_matched: bool = _setting(True, "compute_matched", in_key=False)
    student_init: str = _setting("generalist", "distill", choices=("generalist", "scratch"))
    student_width: int | None = _setting(None, "distill")
    student_depth: int | None = _setting(None, "distill")
    student_epochs: int = _setting(6, "distill", cli="distilled student epochs")
    distill_temperature: float = _setting(4.0, "distill")
    distill_soft_weight: float = _setting(0.5, "distill")
    hard_label_control: bool = _setting(True, "distill", in_key=False)
    distill_mixup: float = _setting(0.0, "distill", key_if_set=True)
    device: str = _setting("auto", "run", cli="auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    seed: int = _setting(0, "generalist", cli="random seed")
    data_seed: int = _setting(0, "data")
    seeds: tuple[int, ...] | None = _setting(None, "run")
    bootstrap_resamples: int = _setting(2000, "metrics")
    latency: bool = _setting(True, "metrics")
    html_report: bool = _setting(True, "run")
    progress: bool = _setting(True, "run")
    extra: dict[str, Any] = field(default_factory=dict, metadata={"stage": "run"})

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.rules, str):
            raise ConfigError(f'rules={self.rules!r} is a string; give a list, e.g. ["generalist", "kl"]')
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.seeds is not None:
            if isinstance(self.seeds, (str, int)):
                raise ConfigError(f"seeds={self.seeds!r}: give a list of whole numbers, e.g. [0, 1, 2]")
            object.__setattr__(self, "seeds", tuple(self.seeds))
        self.validate()

    @classmethod
    def quick(cls, **overrides: Any) -> "PipelineConfig":
        """Settings for tests and notebook smoke runs: seconds on 2 CPU cores, numbers still meaningful (preset ``quick``)."""
        return cls.preset("quick", **overrides)

    @classmethod
    def preset(cls, preset: str, /, **overrides: Any) -> "PipelineConfig":
        """The named settings of :data:`PRESETS` (``tiny``, ``quick``, ``demo``) with ``overrides``.

        Args:
            preset: a preset's name.
            **overrides: settings that replace the preset's (``name`` too).

        Returns:
            The settings.

        Raises:
            ConfigError: an unknown preset (the message lists them) or an impossible setting.
        """
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[preset], **overrides})

    @classmethod
    def from_env(cls, **overrides: Any) -> "PipelineConfig":
        """``quick()`` when ``SPECIALKIT_SMOKE`` is set, the defaults otherwise; ``overrides`` win in both."""
        return cls.quick(**overrides) if smoke_mode() else cls(**overrides)

    def replace(self, **changes: Any) -> "PipelineConfig":
        """A copy with ``changes`` applied (validated; unknown keys raise)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (tuples as lists), as ``config.json`` stores them."""
        d = dataclasses.asdict(self)
        d["rules"] = list(self.rules)
        d["seeds"] = None if self.seeds is None else list(self.seeds)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "PipelineConfig":
        """Build from a dict; unknown keys raise a ``ConfigError`` naming the key and close matches."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of settings, got {type(d).__name__}")
        _check_keys(d, source=source)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write the settings to ``path`` as JSON, atomically."""
        from .runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
        """Read settings written by :meth:`save` (or by hand).

        Args:
            path: a JSON file of settings; keys not given keep their defaults.

        Returns:
            The settings, checked.

        Raises:
            ConfigError: the file is missing, is not JSON or holds an unknown or out-of-range setting.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; write one with `specialkit run --write-config {path}`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON ({err}); fix the file or write a new one") from err
        return cls.from_dict(d, source=str(path))

    def validate(self, num_classes: int | None = None) -> None:
        """Raise ``ConfigError`` for impossible values; with ``num_classes``, also for k/top_n too large.

        Every field is checked against its annotation first (so fields added later are covered):
        whole numbers must be whole, numbers finite, strings strings, lists lists.
        """
        _check_types(self)
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(
                f"image_size={self.image_size} must be >= 1 (a side in pixels, e.g. 32), or null to keep the dataset's size"
            )
        for f in fields(self):
            if "seed" in f.name:
                for v in _ints_in(getattr(self, f.name)):
                    if not 0 <= v <= SEED_MAX:
                        raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: seeds must lie in 0..{SEED_MAX}")
        if self.specialist_shared_stages < 0:
            raise ConfigError(
                f"specialist_shared_stages={self.specialist_shared_stages}: use 0 (whole specialists) or the number "
                "of the generalist's stages to share (1 .. its depth; resnet18: 1..4)"
            )
        if self.specialist_delta_rank < 0:
            raise ConfigError(
                f"specialist_delta_rank={self.specialist_delta_rank!r}: use a whole number >= 0 (0 = dense layers)"
            )
        if self.specialist_delta_rank and not self.specialist_shared_stages:
            raise ConfigError(
                f"specialist_delta_rank={self.specialist_delta_rank} stores deltas on the generalist's later stages, "
                "so it needs shared stages: set specialist_shared_stages (e.g. 2) or specialist_delta_rank=0"
            )
        if self.specialist_shared_stages and (
            self.specialist_init in ("scratch", "distill")
            or self.specialist_model
            or self.specialist_width
            or self.specialist_depth
        ):
            raise ConfigError(
                "specialist_shared_stages > 0 shares the generalist's own trunk, so specialists need its architecture "
                "and weights: leave specialist_model/width/depth unset and specialist_init auto or generalist, "
                "or set specialist_shared_stages=0"
            )
        _positive(
            self,
            "epochs",
            "batch_size",
            "width",
            "depth",
            "k",
            "top_n",
            "top_r",
            "specialist_epochs",
            "student_epochs",
            "top_confident_n",
        )
        if self.dustbin_correction == "paper":
            raise ConfigError(
                "dustbin_correction='paper' was renamed for what it is: use 'odds' (the Bayes odds correction log r, "
                "what 'paper' computed) or 'paper_literal' (log(f/pi), the paper's words read literally)"
            )
        for f in fields(self):
            if "choices" in f.metadata:
                _choice(self, f.name, f.metadata["choices"])
        if self.seeds is not None:
            if len(self.seeds) == 0:
                raise ConfigError(
                    "seeds is empty: give at least one seed, e.g. --seeds 0 1 2 (or leave seeds unset for one run)"
                )
            if len(set(self.seeds)) != len(self.seeds):
                dup = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
                raise ConfigError(f"seeds lists {dup} more than once: each seed is one run, give distinct seeds")
            for s in self.seeds:
                if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < 2**31:
                    raise ConfigError(f"seeds: {s!r} is not a whole number in [0, 2**31)")
        for key in ("seed", "data_seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**31:
                raise ConfigError(f"{key}={v!r} must be a whole number in [0, 2**31)")
        if not isinstance(self.bootstrap_resamples, int) or self.bootstrap_resamples < 1000:
            raise ConfigError(
                f"bootstrap_resamples={self.bootstrap_resamples!r}: use a whole number >= 1000 (95% intervals need it)"
            )
        for rule in self.rules:
            if rule not in RULES:
                raise ConfigError(f"rules: unknown rule {rule!r}; choose from {', '.join(RULES)}")
        if "generalist" not in self.rules:
            raise ConfigError("rules: must include 'generalist' (the baseline every rule is compared with)")
        for key in ("val_fraction", "special_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} is out of range; use a value strictly between 0 and 1")
        for key in ("distill_soft_weight", "specialist_soft_weight", "skip_threshold"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} is out of range; use a value in [0, 1]")
        if not 0.0 < self.skip_confident <= 1.0:
            raise ConfigError(
                f"skip_confident={self.skip_confident} is out of range; use a value in (0, 1] (1 = never skip)"
            )
        if self.max_active < 0:
            raise ConfigError(f"max_active={self.max_active} is out of range; use a whole number >= 0 (0 = no limit)")
        for key in ("lr", "specialist_lr", "specialist_temperature", "distill_temperature", "gamma"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive")
        mix = self.distill_mixup
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0.0 <= mix < math.inf:
            raise ConfigError(
                f"distill_mixup={self.distill_mixup!r}: use mixup's alpha, a number >= 0 (e.g. 0.2; 0 = no mixup)"
            )
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise ConfigError(
                f"memory_budget_gb={self.memory_budget_gb} must be positive (GB), or null for a quarter of the RAM"
            )
        if self.stream_workers < 0:
            raise ConfigError(f"stream_workers={self.stream_workers} must be >= 0 (0 = decode in the main process)")
        if self.per_class is not None and self.per_class < 2:
            raise ConfigError(f"per_class={self.per_class}: need at least 2 images per class (or null for all)")
        if self.generalist_from is not None:
            from .byog import parse_source

            parse_source(self.generalist_from, must_exist=False)
        if self.generalist_input_size is not None and self.generalist_input_size < 1:
            raise ConfigError(
                f"generalist_input_size={self.generalist_input_size}: a side in pixels >= 1 (e.g. 224), or null"
            )
        if self.max_group_size is not None and self.max_group_size < 2:
            raise ConfigError(f"max_group_size={self.max_group_size}: a group needs room for 2 classes")
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise ConfigError(f"name={self.name!r}: use a plain folder name such as 'demo'")
        if num_classes is not None:
            if num_classes < 2:
                raise ConfigError(
                    f"the dataset {self.dataset!r} has {num_classes} class; a run needs at least 2 classes "
                    f"(specialists tell confusable classes apart): add class folders or choose another dataset"
                )
            if self.k > num_classes // 2:
                raise ConfigError(
                    f"k={self.k} groups is too many for {num_classes} classes: each group needs at least 2 "
                    f"classes, so use k <= {num_classes // 2}"
                )
            if self.top_n > num_classes:
                raise ConfigError(
                    f"top_n={self.top_n} exceeds the {num_classes} classes; use 1 (the paper's n) to a few"
                )


SEED_MAX = 2**31 - 1_000_000  # stages add offsets (up to ~10^5) to the seed; numpy takes < 2**32


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(PipelineConfig)


def _ints_in(v: Any) -> list[int]:
    if isinstance(v, bool):
        return []
    if isinstance(v, int):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
    return []


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        return f"a list of {_describe(args[0])}s" if args else "a list"
    if origin is dict or tp is dict:
        return "an object"
    return {int: "whole number", float: "number", str: "string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _type_problem(v: Any, tp: Any) -> str | None:
    """Why ``v`` does not fit the annotation ``tp`` (``None`` when it does)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        problems = [_type_problem(v, a) for a in args if a is not type(None)]
        return None if any(p is None for p in problems) else next((p for p in problems if p), "wrong type")
    if origin in (tuple, list):
        if isinstance(v, str) or not isinstance(v, (tuple, list)):
            example = json.dumps([v]) if isinstance(v, str) else "[...]"
            return f"must be {_describe(tp)}, not {type(v).__name__}; write {example}"
        inner = args[0] if args else Any
        for x in v:
            p = _type_problem(x, inner)
            if p:
                return f"element {x!r} {p}"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(v, dict) else f"must be an object (a dict), not {type(v).__name__}"
    if tp is bool:
        return None if isinstance(v, bool) else f"must be true or false, not {type(v).__name__} {v!r}"
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            hint = f"; write {v!r} without quotes" if isinstance(v, str) else ""
            return f"must be a whole number, not {type(v).__name__} {v!r}{hint}"
        if isinstance(v, float):
            return f"must be a whole number; write {int(v)} instead of {v!r}"
        return None
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            hint = f"; write {v} without quotes" if isinstance(v, str) else ""
            return f"must be a number, not {type(v).__name__} {v!r}{hint}"
        if not math.isfinite(v):
            return "must be a finite number (NaN and Infinity are not settings)"
        return None
    if tp is str:
        return None if isinstance(v, str) else f"must be a string, not {type(v).__name__} {v!r}"
    return None


def _check_types(cfg: PipelineConfig) -> None:
    """Check every field against its annotation (driven by the dataclass, so new fields are covered)."""
    hints = _hints()
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        problem = _type_problem(v, hints.get(f.name, Any))
        if problem:
            raise ConfigError(f"{f.name}={v!r} {problem}")


def _check_keys(d: dict[str, Any], *, source: str = "config") -> None:
    known = {f.name for f in fields(PipelineConfig)}
    for key in d:
        if key in RENAMED and key not in known:
            raise ConfigError(
                f"{source}: key {key!r} was renamed to {RENAMED[key]!r}; write {RENAMED[key]!r} instead "
                "(in a run's config.json too: its trained stages stay valid)"
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")


def _positive(cfg: PipelineConfig, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{key}={v!r} must be a whole number >= 1")


def _choice(cfg: PipelineConfig, key: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in options:
        raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(options)}")


# ------------------------------------------------------------------------- routing by field metadata


def stage_of(name: str) -> str:
    """The stage of the setting ``name`` (one of :data:`SETTING_STAGES`)."""
    for f in fields(PipelineConfig):
        if f.name == name:
            return f.metadata["stage"]
    raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(f.name for f in fields(PipelineConfig))}")


def stage_keys() -> dict[str, tuple[str, ...]]:
    """Stage (:data:`KEY_STAGES`, in order) -> the settings in its cache key, in field order."""
    return {
        s: tuple(f.name for f in fields(PipelineConfig) if f.metadata["stage"] == s and f.metadata["in_key"])
        for s in KEY_STAGES
    }


def hashed_now(name: str, value: Any) -> bool:
    """Whether the setting ``name`` with ``value`` enters its stage's cache key: always, except a ``key_if_set``
    setting left at its default (so runs trained before it existed stay valid)."""
    f = next((f for f in fields(PipelineConfig) if f.name == name), None)
    if f is None:
        raise ConfigError(f"unknown setting {name!r}")
    return not (f.metadata.get("key_if_set") and value == f.default)


def key_name(name: str) -> str:
    """The name the setting ``name`` has in a cache key (its name before a rename, so old runs stay valid)."""
    return next((f.metadata.get("key_name", f.name) for f in fields(PipelineConfig) if f.name == name), name)


def _flag_type(tp: Any, name: str) -> type:
    args = (
        [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType)
        else [tp]
    )
    if len(args) != 1 or args[0] not in (int, float, str):
        raise TypeError(
            f"PipelineConfig.{name} has a cli help but type {tp}: flags take one int, float or str; "
            "drop its cli help (set it in a config file) or give the flag a parser in cli.py"
        )
    return args[0]


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        name="tiny",
        per_class=4,
        val_fraction=0.2,
        epochs=1,
        k=2,
        width=4,
        depth=1,
        specialist_epochs=1,
        student_epochs=1,
        batch_size=64,
        progress=False,
    ),
    "quick": dict(
        name="quick",
        per_class=50,
        val_fraction=0.2,
        epochs=6,
        k=6,
        specialist_epochs=2,
        student_epochs=3,
        batch_size=64,
        progress=False,
    ),
    "demo": dict(name="demo"),
}
"""Named settings: ``tiny`` (the smallest run that exercises every stage: the unit tests' runs, about a second a
stage), ``quick`` (tests and notebook smoke runs, ``SPECIALKIT_SMOKE=1``: seconds, numbers still meaningful) and
``demo`` (the defaults, what ``configs/demo.json`` holds: minutes on a laptop)."""


def parse_value(key: str, text: str) -> Any:
    """A setting's value written as text: JSON when it parses (``8``, ``0.5``, ``null``, ``true``, ``["kl"]``), else
    the text; a string setting keeps the text as written, a tuple setting takes ``a,b`` as ``("a", "b")``.

    Args:
        key: a ``PipelineConfig`` field.
        text: the value as written.

    Returns:
        The value (checked later, by ``PipelineConfig``).
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    tp = typing.get_type_hints(PipelineConfig)[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if typing.get_origin(tp) is tuple and isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if str in args and value is not None and not isinstance(value, str) and text.lower() != "null":
        return text
    return value


def parse_overrides(items: Any, *, source: str = "--set") -> dict[str, Any]:
    """``["width=8", "rules=generalist,kl"]`` -> ``{"width": 8, "rules": ("generalist", "kl")}``: the one ``key=value``
    syntax of ``specialkit run --set``, ``specialkit study --set`` and the benches (``--grid`` writes ``key=v1,v2``).

    Args:
        items: ``key=value`` strings (a dash in a key reads as an underscore).
        source: where they came from, for the error message.

    Returns:
        Setting -> value.

    Raises:
        ConfigError: an item without ``=``, an unknown key (with the closest names), a key given twice.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"{source} {item!r}: write key=value (e.g. {source} width=8)")
        _check_keys({key: None}, source=source)
        if key in out:
            raise ConfigError(f"{source} gives {key!r} twice; give it once")
        out[key] = parse_value(key, text.strip())
    return out


def cli_settings() -> dict[str, tuple[type, str]]:
    """Setting -> (flag type, help) for every field with a ``cli`` help, in field order (``specialkit run --<flag>``)."""
    hints = _hints()
    return {
        f.name: (_flag_type(hints[f.name], f.name), f.metadata["cli"])
        for f in fields(PipelineConfig)
        if "cli" in f.metadata
    }


def picker_settings() -> dict[str, str]:
    """Setting -> the ``widgets.ClusterPicker`` argument it starts (``top_r`` -> ``r``, ``method`` -> ``method``, ...)."""
    return {f.name: f.metadata["picker"] for f in fields(PipelineConfig) if "picker" in f.metadata}


def choices_of(name: str) -> tuple[str, ...]:
    """The allowed values of the string option ``name`` (e.g. ``choices_of("overlap")``)."""
    for f in fields(PipelineConfig):
        if f.name == name and "choices" in f.metadata:
            return tuple(f.metadata["choices"])
    raise ConfigError(
        f"{name!r} is not a setting with choices; those are: "
        f"{', '.join(f.name for f in fields(PipelineConfig) if 'choices' in f.metadata)}"
    )


_STAGE_NOTES = {
    "data": "the dataset, its subset and split",
    "generalist": "the generalist's training (and every later stage's seed)",
    "clusters": "the class groups",
    "specialists": "one specialist per group",
    "compute_matched": "the compute-matched generalists (the specialists' budget; the student's)",
    "ensembles": "activation and combination rules",
    "distill": "the distilled student",
    "metrics": "the reported intervals only",
    "run": "no number: name, device, progress, the list of seeds",
}


def settings_markdown() -> str:
    """The table of settings by stage in docs/USAGE.md, from the field metadata (``tools/update_readme.py`` writes it).

    A setting with a ``specialkit run`` flag is shown as ``--flag``; one kept out of its stage's cache key is
    marked with ``*``."""
    rows = [
        "| stage | changes | settings (`--flag`: also a `specialkit run` flag; `*`: not hashed as a value: "
        "`clusters_file` by its content, `generalist_*` with the file's sha256 only when `generalist_from` is set, "
        "the others not at all) |",
        "| --- | --- | --- |",
    ]
    for stage in SETTING_STAGES:
        names = []
        for f in fields(PipelineConfig):
            if f.metadata["stage"] != stage:
                continue
            shown = f"`{f.name}` (`--{f.name.replace('_', '-')}`)" if "cli" in f.metadata else f"`{f.name}`"
            names.append(shown + ("*" if stage in KEY_STAGES and not f.metadata["in_key"] else ""))
        rows.append(f"| {stage} | {_STAGE_NOTES[stage]} | {', '.join(names)} |")
    return "\n".join(rows)
