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

__all__ = ["PipelineConfig", "ConfigError", "SMOKE_ENV", "smoke_mode", "RULES", "METHODS", "OVERLAPS", "CORRECTIONS"]

SMOKE_ENV = "SPECIALKIT_SMOKE"
RULES = ("generalist", "kl", "top_confident", "moe")
METHODS = ("covariance_kmeans", "spectral", "agglomerative", "balanced")
OVERLAPS = ("none", "hdcnn", "top_r")
CORRECTIONS = ("odds", "paper_literal", "prior_match", "none")


class ConfigError(ValueError):
    """A configuration key is unknown or its value impossible; the message names the key and the fix."""


def smoke_mode() -> bool:
    """True when ``SPECIALKIT_SMOKE`` is set to something other than ``0``/empty (quick settings)."""
    return os.environ.get(SMOKE_ENV, "0").strip() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of one run. Defaults are the ``make demo`` settings (≤ 5 min on 2 CPU cores).

    Data: ``dataset``, ``root``, ``download``, ``image_size``, ``per_class``, ``val_fraction``.
    Generalist: ``model`` (``cnn`` | ``resnet18``), ``width``, ``depth``, ``epochs``, ``batch_size``,
    ``lr``, ``optimizer``, ``schedule``, ``weight_decay``, ``label_smoothing``.
    Clusters: ``method`` (``balanced`` by default; ``covariance_kmeans`` is the paper's), ``distance``
    (``soft``: HD-CNN's distance from the summed predicted probabilities per true class, stable when
    the generalist makes few errors; ``hard``: from argmax confusions), ``k``, ``overlap``
    (``none`` | ``hdcnn`` | ``top_r``), ``gamma``, ``top_r``,
    ``max_group_size``, ``clusters_file`` (a spec to use instead of clustering).
    Specialists: ``specialist_model`` (None = the generalist's architecture, initialised from it),
    ``specialist_width``, ``specialist_depth``, ``specialist_epochs``, ``specialist_lr``,
    ``special_fraction``, ``specialist_soft_weight``, ``temperature``, ``dustbin_correction``
    (``odds``: add log r, the Bayes odds correction, to the dustbin logit; ``paper_literal``: add
    log(f/pi); ``prior_match``: the shift that makes the mean dustbin probability on the validation
    images equal their share of other classes; ``none``).
    Ensemble: ``top_n`` (the paper's n), ``rules``, ``top_confident_n``, ``top_confident_gated``
    (only the specialists the generalist's top-n switch on are candidates), ``moe_threshold``.
    Baselines and distillation: ``compute_matched``, ``compute_match`` (``flops``: the extra
    generalist passes cost as many FLOPs as the specialists' training passes; ``passes``: as many
    example-passes), ``student_init`` (``generalist``: the student starts from the generalist's
    weights when it has the generalist's architecture, and is fine-tuned on the ensemble's targets;
    ``scratch``), ``student_width``, ``student_depth``, ``student_epochs``,
    ``distill_temperature``, ``distill_soft_weight``.
    Run: ``name``, ``device`` (``auto`` | ``cpu`` | ``cuda``), ``seed`` (training randomness),
    ``data_seed`` (the data: rendering, subset and split; fixed across ``seeds`` so every seed is
    scored on the same test images), ``seeds`` (several seeds: one run folder each, see
    ``pipeline.run_seeds``), ``bootstrap_resamples``, ``progress``.
    """

    name: str = "demo"
    dataset: str = "glyphs"
    root: str | None = None
    download: bool = False
    image_size: int | None = None
    per_class: int | None = 300
    val_fraction: float = 0.15
    model: str = "cnn"
    width: int = 16
    depth: int = 3
    epochs: int = 6
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    method: str = "balanced"
    distance: str = "soft"
    k: int = 8
    overlap: str = "top_r"
    gamma: float = 5.0
    top_r: int = 2
    max_group_size: int | None = None
    clusters_file: str | None = None
    specialist_model: str | None = None
    specialist_width: int | None = None
    specialist_depth: int | None = None
    specialist_epochs: int = 2
    specialist_lr: float = 0.02
    special_fraction: float = 0.5
    specialist_soft_weight: float = 0.0
    temperature: float = 2.0
    dustbin_correction: str = "odds"
    top_n: int = 1
    rules: tuple[str, ...] = RULES
    top_confident_n: int = 2
    top_confident_gated: bool = True
    moe_threshold: float = 0.0
    compute_matched: bool = True
    compute_match: str = "flops"
    student_init: str = "generalist"
    student_width: int | None = None
    student_depth: int | None = None
    student_epochs: int = 6
    distill_temperature: float = 4.0
    distill_soft_weight: float = 0.5
    device: str = "auto"
    seed: int = 0
    data_seed: int = 0
    seeds: tuple[int, ...] | None = None
    bootstrap_resamples: int = 2000
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        if isinstance(self.rules, str):
            raise ConfigError(f"rules={self.rules!r} is a string; give a list, e.g. [\"generalist\", \"kl\"]")
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.seeds is not None:
            if isinstance(self.seeds, (str, int)):
                raise ConfigError(f"seeds={self.seeds!r}: give a list of whole numbers, e.g. [0, 1, 2]")
            object.__setattr__(self, "seeds", tuple(self.seeds))
        self.validate()

    @classmethod
    def quick(cls, **overrides: Any) -> "PipelineConfig":
        """Settings for tests and notebook smoke runs: seconds on 2 CPU cores, numbers still meaningful."""
        base = dict(
            name="quick", per_class=50, val_fraction=0.2, epochs=6, k=6,
            specialist_epochs=2, student_epochs=6, batch_size=64, progress=False,
        )  # fmt: skip
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_env(cls, **overrides: Any) -> "PipelineConfig":
        """``quick()`` when ``SPECIALKIT_SMOKE`` is set, the defaults otherwise; ``overrides`` win in both."""
        return cls.quick(**overrides) if smoke_mode() else cls(**overrides)

    def replace(self, **changes: Any) -> "PipelineConfig":
        """A copy with ``changes`` applied (validated; unknown keys raise)."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
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
        from .runs import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PipelineConfig":
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
            raise ConfigError(f"image_size={self.image_size} must be >= 1 (a side in pixels, e.g. 32), or null to keep the dataset's size")
        for f in fields(self):
            if "seed" in f.name:
                for v in _ints_in(getattr(self, f.name)):
                    if not 0 <= v <= SEED_MAX:
                        raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: seeds must lie in 0..{SEED_MAX}")
        _positive(self, "epochs", "batch_size", "width", "depth", "k", "top_n", "top_r", "specialist_epochs",
                  "student_epochs", "top_confident_n")  # fmt: skip
        _choice(self, "method", METHODS)
        _choice(self, "distance", ("soft", "hard"))
        _choice(self, "overlap", OVERLAPS)
        _choice(self, "optimizer", ("sgd", "adamw"))
        _choice(self, "schedule", ("onecycle", "cosine", "constant"))
        _choice(self, "device", ("auto", "cpu", "cuda"))
        if self.dustbin_correction == "paper":
            raise ConfigError(
                "dustbin_correction='paper' was renamed for what it is: use 'odds' (the Bayes odds correction log r, "
                "what 'paper' computed) or 'paper_literal' (log(f/pi), the paper's words read literally)"
            )
        _choice(self, "dustbin_correction", CORRECTIONS)
        _choice(self, "compute_match", ("flops", "passes"))
        _choice(self, "student_init", ("generalist", "scratch"))
        if self.seeds is not None:
            if len(self.seeds) == 0:
                raise ConfigError("seeds is empty: give at least one seed, e.g. --seeds 0 1 2 (or leave seeds unset for one run)")
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
            raise ConfigError(f"bootstrap_resamples={self.bootstrap_resamples!r}: use a whole number >= 1000 (95% intervals need it)")
        for rule in self.rules:
            if rule not in RULES:
                raise ConfigError(f"rules: unknown rule {rule!r}; choose from {', '.join(RULES)}")
        if "generalist" not in self.rules:
            raise ConfigError("rules: must include 'generalist' (the baseline every rule is compared with)")
        for key in ("val_fraction", "special_fraction"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} is out of range; use a value strictly between 0 and 1")
        for key in ("distill_soft_weight", "specialist_soft_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{key}={getattr(self, key)} is out of range; use a value in [0, 1]")
        for key in ("lr", "specialist_lr", "temperature", "distill_temperature", "gamma"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be positive")
        if self.per_class is not None and self.per_class < 2:
            raise ConfigError(f"per_class={self.per_class}: need at least 2 images per class (or null for all)")
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
                raise ConfigError(f"top_n={self.top_n} exceeds the {num_classes} classes; use 1 (the paper's n) to a few")


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
    return {int: "whole number", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


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
