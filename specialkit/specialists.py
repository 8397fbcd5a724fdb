"""Specialist models (Hinton, Vinyals & Dean 2015, §5.2 and §6; ``docs/METHOD.md`` section 3).

A specialist m covers a subset S of the C classes. Its softmax has ``|S| + 1`` outputs: the special
classes in the order of ``classes``, then **one dustbin** (last) standing for every other class.
Each step of the paper is one function here:

1. :func:`target_map` -- labels: a special class keeps its identity, every other class -> dustbin.
2. :func:`init_from_generalist` -- copy the generalist's trunk and its full head; the dustbin logit is
   the log-sum-exp of the other classes' logits, so the specialist starts as the generalist exactly.
3. :func:`enriched_sampler` -- every epoch (and every batch) a share ``special_fraction`` (the
   paper: half) of the examples comes from S, the rest from the other classes.
4. :func:`odds_correction` -- the enriched sampling multiplied the odds special:rest by
   ``r = [f/(1-f)] / [pi/(1-pi)]``; adding ``log r`` to the dustbin logit restores the natural prior.
5. :func:`collapse_soft_targets` -- the generalist's soft targets at temperature T (paper §6)
   collapsed onto the specialist's cells, for ``training.fit(..., soft_targets=...)``.
6. :func:`train_specialist` / :func:`predict_specialist` -- the whole recipe, and inference with the
   correction applied.

>>> classes = np.array([3, 5])
>>> target_map(classes, 6).tolist()          # class 3 -> 0, class 5 -> 1, others -> dustbin 2
[2, 2, 2, 0, 2, 1]
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import cost, models, runs, stages, store, training
from .errors import SpecialkitError

__all__ = [
    "split_logits",
    "SpecialistError",
    "SpecialistConfig",
    "TrainedSpecialist",
    "EnrichedSampler",
    "target_map",
    "init_from_generalist",
    "dustbin_head",
    "small_head",
    "collapse_head",
    "HEAD_FITS",
    "collapsed_probs",
    "head_rows",
    "enriched_sampler",
    "natural_special_share",
    "oversampling_factor",
    "odds_correction",
    "literal_correction",
    "correction_value",
    "specialist_teacher",
    "CORRECTIONS",
    "apply_dustbin_shift",
    "prior_matched_correction",
    "collapse_probs",
    "collapse_soft_targets",
    "teacher_soft_targets",
    "specialist_model_config",
    "train_specialist",
    "predict_specialist",
    "specialist_examples_seen",
    "save_specialist",
    "load_specialist",
    "train_flops_per_example",
    "distil_base",
    "INITS",
]


class SpecialistError(SpecialkitError, ValueError):
    """Bad input to a specialist function; the message names the problem and the fix."""


CORRECTIONS = ("odds", "paper_literal", "prior_match", "none")
"""Dustbin corrections, by what they are: the Bayes odds correction log r, the paper's literal log(f/pi),
a shift fitted on validation images, and none."""
INITS = ("auto", "generalist", "scratch", "distill")
"""How a specialist starts (:class:`SpecialistConfig` ``init``)."""
SPECIALIST_EXTRA = ("group", "classes", "class_names", "examples_seen")
"""Metadata every specialist checkpoint holds (:func:`save_specialist`) besides its dustbin shift; a file
without it is refused."""
SHIFT_KEYS = ("dustbin_shift", "dustbin_correction")
"""Checkpoint ``extra`` keys of the dustbin shift (a float): the current one, then the one checkpoints
written before the rename use (where ``dustbin_correction`` now names only the option)."""


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SpecialistConfig:
    """How to build and train one specialist.

    Attributes:
        model: ``None`` = the generalist's architecture; else a registry name of ``models``
            (``"cnn"``, ``"resnet18"``) for a different (e.g. smaller) specialist.
        width: ``cnn`` width of the specialist; ``None`` = the generalist's.
        depth: ``cnn`` depth of the specialist; ``None`` = the generalist's.
        init: ``"auto"`` -- initialise from the generalist (paper §5.2) when the specialist's
            architecture (name, width, depth) equals the generalist's, else from scratch;
            ``"generalist"`` -- always from the generalist (an error if the architectures differ);
            ``"scratch"`` -- always a fresh random initialisation; ``"distill"`` -- a fresh network of the
            specialist's architecture over all C classes is first distilled from the generalist on all the
            training data (:func:`distil_base`, as many epochs as the specialist's), then specialised from it
            like from a generalist.
        shared_stages: s; 0 = a whole specialist. s > 0 freezes the generalist's first s stages and shares
            them (``models.SharedTrunkClassifier``): the specialist trains and stores only the later stages
            and its head. Needs the generalist's architecture and initialisation from it.
        special_fraction: f, share of each epoch (and each batch) drawn from the special classes
            (the paper: 0.5).
        epoch_size: examples per epoch; ``None`` = 2 x the number of special training examples
            (with f = 0.5: one pass over the special examples and as many from the rest).
        soft_weight: weight w of the generalist's soft targets (paper §6); 0 = hard labels only.
            Overrides ``train.soft_weight``.
        temperature: T of the soft targets (the loop scales the soft term by T²). Overrides
            ``train.temperature``.
        soft_collapse: how the other classes' soft targets enter the dustbin: ``"logits"``
            (collapse at T = 1, then soften; unbiased) or ``"probs"`` (sum the tempered
            probabilities; inflates the dustbin for T > 1). See :func:`collapse_soft_targets`.
        correction: the number added to the dustbin logit at inference (see :data:`CORRECTIONS`):
            ``"odds"`` -- log r, the Bayes correction of the odds special:rest that the enriched
            sampling multiplied by r = [f/(1-f)]/[pi/(1-pi)] (exact for a calibrated model;
            :func:`odds_correction`); ``"paper_literal"`` -- log(f/pi), the paper's words "the log of
            the oversampling factor" read literally (:func:`literal_correction`); ``"prior_match"`` --
            the c that makes the mean corrected dustbin probability over the *validation* images
            equal their share of non-special examples (:func:`prior_matched_correction`; one extra
            inference pass over the validation split); ``"none"`` -- 0 (ablation).
        train: the :class:`training.TrainConfig` of the loop (epochs, lr, batch size, seed, ...).
        delta_rank: r > 0 (with ``shared_stages``): the specialist's own convolutions are stored and trained as rank-r
            deltas on the generalist's (:func:`models.low_rank_delta`); 0 = dense (the default). Its checkpoint stores
            only the deltas (the pipeline setting ``specialist_delta_rank``).
    """

    model: str | None = None
    width: int | None = None
    depth: int | None = None
    init: str = "auto"
    shared_stages: int = 0
    special_fraction: float = 0.5
    epoch_size: int | None = None
    soft_weight: float = 0.0
    temperature: float = 2.0
    soft_collapse: str = "logits"
    correction: str = "prior_match"
    train: training.TrainConfig = field(default_factory=training.TrainConfig)
    delta_rank: int = 0

    def __post_init__(self) -> None:
        if self.correction not in CORRECTIONS:
            raise SpecialistError(
                f"SpecialistConfig.correction={self.correction!r}; use one of {', '.join(CORRECTIONS)}"
            )
        if self.soft_collapse not in ("logits", "probs"):
            raise SpecialistError(f"SpecialistConfig.soft_collapse={self.soft_collapse!r}; use 'logits' or 'probs'")
        if self.init not in INITS:
            raise SpecialistError(f"SpecialistConfig.init={self.init!r}; use one of {', '.join(INITS)}")
        if not 0.0 < self.special_fraction < 1.0:
            raise SpecialistError(
                f"SpecialistConfig.special_fraction={self.special_fraction}: use a share strictly between 0 and 1 "
                f"(the paper uses 0.5)"
            )
        if self.epoch_size is not None and self.epoch_size < 2:
            raise SpecialistError(
                f"SpecialistConfig.epoch_size={self.epoch_size}: use at least 2 (or None for the default)"
            )
        if not 0.0 <= self.soft_weight <= 1.0:
            raise SpecialistError(f"SpecialistConfig.soft_weight={self.soft_weight}: use a value in [0, 1]")
        if self.temperature <= 0:
            raise SpecialistError(f"SpecialistConfig.temperature={self.temperature}: use a positive value (e.g. 2)")
        if not isinstance(self.shared_stages, int) or isinstance(self.shared_stages, bool) or self.shared_stages < 0:
            raise SpecialistError(
                f"SpecialistConfig.shared_stages={self.shared_stages!r}: use a whole number >= 0 (0 = no sharing)"
            )
        if self.shared_stages and self.init in ("scratch", "distill"):
            raise SpecialistError(
                "SpecialistConfig.shared_stages > 0 shares the generalist's trunk, so the specialist must start "
                "from the generalist: use init='auto' or 'generalist', or shared_stages=0"
            )
        if not isinstance(self.delta_rank, int) or self.delta_rank < 0 or (self.delta_rank and not self.shared_stages):
            raise SpecialistError(
                f"SpecialistConfig.delta_rank={self.delta_rank!r}: a whole number >= 0, and > 0 only with "
                "shared_stages > 0 (the deltas sit on the generalist's later stages)"
            )
        for key in ("width", "depth"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise SpecialistError(f"SpecialistConfig.{key}={v!r}: use a positive integer or None")

    def train_config(self) -> training.TrainConfig:
        """``train`` with this config's ``soft_weight`` and ``temperature``."""
        return dataclasses.replace(self.train, soft_weight=self.soft_weight, temperature=self.temperature)


@dataclass(eq=False)
class TrainedSpecialist:
    """A trained specialist and everything needed to use and save it.

    Attributes:
        model: the classifier, ``|S| + 1`` outputs, dustbin last (eval mode).
        classes: (|S|,) int64 special class indices, in output order.
        class_names: (|S|,) their names.
        dustbin_shift: the number added to the dustbin logit at inference (log r for the ``odds``
            correction, :func:`correction_value`).
        history: the :class:`training.History` of the loop (or its list of record dicts when loaded).
        examples_seen: training example-passes used (for the compute-matched baseline).
        model_config: the specialist's :class:`models.ModelConfig` (for its checkpoint).
        special_fraction: the share f of special examples actually sampled.
        initialised_from: ``"generalist"`` or ``"scratch"``.
        correction: the name of the dustbin correction applied (one of :data:`CORRECTIONS`).
    """

    model: torch.nn.Module
    classes: np.ndarray
    class_names: tuple[str, ...]
    dustbin_shift: float
    history: Any
    examples_seen: int
    model_config: models.ModelConfig | None = None
    special_fraction: float | None = None
    initialised_from: str | None = None
    correction: str | None = None

    @property
    def num_outputs(self) -> int:
        """|S| + 1."""
        return len(self.classes) + 1

    def extra(self) -> dict[str, Any]:
        """JSON-able dict for ``checkpoints.save_checkpoint(..., extra=...)``."""
        return {
            "classes": [int(c) for c in self.classes],
            "class_names": list(self.class_names),
            "dustbin_shift": float(self.dustbin_shift),
            "examples_seen": int(self.examples_seen),
            "special_fraction": None if self.special_fraction is None else float(self.special_fraction),
            "initialised_from": self.initialised_from,
            "correction": self.correction,
        }

    def predict(self, x_uint8: torch.Tensor, *, batch_size: int = 512, device: str = "auto") -> np.ndarray:
        """(N, |S| + 1) corrected probabilities (:func:`predict_specialist`)."""
        return predict_specialist(self.model, x_uint8, shift=self.dustbin_shift, batch_size=batch_size, device=device)


# ------------------------------------------------------------------------------------------ targets


def _check_classes(classes: Any, num_classes: int, *, allow_all: bool = False) -> np.ndarray:
    c = np.asarray(classes.cpu() if isinstance(classes, torch.Tensor) else classes)
    if c.ndim != 1 or c.size == 0 or not np.issubdtype(c.dtype, np.integer):
        raise SpecialistError(
            f"classes must be a non-empty 1-D integer array of class indices, got {c.dtype} {c.shape}; "
            f"pass ClusterSpec.indices()[m]"
        )
    if c.min() < 0 or c.max() >= num_classes or np.unique(c).size != c.size:
        raise SpecialistError(f"classes must be distinct indices in [0, {num_classes}), got {c.tolist()}")
    if c.size == num_classes and not allow_all:
        raise SpecialistError(
            "the group covers every class, so the dustbin would be empty and the specialist is just a "
            "generalist: split the group or use the generalist"
        )
    return c.astype(np.int64)


def target_map(classes: Any, num_classes: int) -> np.ndarray:
    """Label map of a specialist: class ``classes[i]`` -> i, every other class -> the dustbin ``|S|``.

    Args:
        classes: (S,) distinct special class indices.
        num_classes: C.

    Returns:
        (C,) int64; index it with generalist labels, e.g. ``target_map(cls, C)[y]``.
    """
    c = _check_classes(classes, num_classes, allow_all=True)
    out = np.full(num_classes, c.size, dtype=np.int64)
    out[c] = np.arange(c.size)
    return out


def collapse_probs(probs: Any, classes: Any) -> np.ndarray:
    """Collapse distributions over C classes onto a specialist's cells.

    Args:
        probs: (N, C) probabilities (e.g. the generalist's at temperature T).
        classes: (S,) special class indices.

    Returns:
        (N, S + 1): ``probs[:, classes]``, then the summed mass of every other class (the dustbin).
        Rows still sum to 1; the dtype of ``probs`` is kept.
    """
    p = np.asarray(probs.cpu() if isinstance(probs, torch.Tensor) else probs)
    if p.ndim != 2:
        raise SpecialistError(f"probs must be (N, C), got shape {p.shape}")
    c = _check_classes(classes, p.shape[1], allow_all=True)
    others = np.ones(p.shape[1], dtype=bool)
    others[c] = False
    return np.concatenate([p[:, c], p[:, others].sum(axis=1, keepdims=True)], axis=1)


# ------------------------------------------------------------------------------------------ the head


def dustbin_head(weight: torch.Tensor, bias: torch.Tensor, classes: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A specialist head cut from a generalist head.

    Rows ``0..S-1`` are the generalist's rows of ``classes``; the dustbin row (last) is

        w_d = mean_{j not in S} w_j,      b_d = mean_{j not in S} b_j + log K,    K = C - S,

    so that, for any features h, the dustbin logit is ``z_d = mean_{j not in S} z_j + log K``. By
    Jensen's inequality this is a lower bound on the log-sum-exp of the other logits -- the logit
    the dustbin would need to carry exactly the generalist's mass on the other classes -- and it
    is tight when those logits are equal:

        LSE(z_others) - (max(z_others) - mean(z_others)) <= z_d <= LSE(z_others).

    Args:
        weight: (C, D) generalist head weight.
        bias: (C,) generalist head bias.
        classes: (S,) special class indices, S < C.

    Returns:
        ``(weight (S+1, D), bias (S+1,))``.
    """
    c = _check_classes(classes, weight.shape[0])
    others = np.ones(weight.shape[0], dtype=bool)
    others[c] = False
    idx = torch.as_tensor(c, device=weight.device)
    oth = torch.as_tensor(np.flatnonzero(others), device=weight.device)
    with torch.no_grad():
        w_d = weight.index_select(0, oth).mean(dim=0, keepdim=True)
        b_d = bias.index_select(0, oth).mean().reshape(1) + math.log(len(oth))
        return (
            torch.cat([weight.index_select(0, idx), w_d]).clone(),
            torch.cat([bias.index_select(0, idx), b_d]).clone(),
        )


def init_from_generalist(generalist: models.Classifier, classes: Any) -> models.Classifier:
    """A specialist initialised from the generalist (paper §5.2) that reproduces it exactly at the start.

    The trunk is a deep copy of the generalist's. The head is a :class:`models.DustbinHead` holding a
    copy of the generalist's full linear layer: the special logits are the generalist's logits of
    ``classes`` and the dustbin logit is the log-sum-exp of all the other classes' logits. So, before
    any training, the specialist's probabilities are the generalist's collapsed onto its cells -- its
    dustbin probability equals the generalist's total mass outside the group on every image. (A single
    dustbin row cannot do that: see :func:`dustbin_head`, kept for the comparison.) The extra cost is
    the C x D head instead of (S + 1) x D, negligible next to the trunk.

    Args:
        generalist: a :class:`models.Classifier` over all C classes (left unchanged).
        classes: (S,) special class indices, S < C.

    Returns:
        A new classifier with S + 1 outputs (``config.num_classes`` = S + 1, ``config.dustbin_of`` = C).
    """
    if not hasattr(generalist, "head") or not isinstance(generalist.head, torch.nn.Linear):
        raise SpecialistError(
            "the generalist must be a models.Classifier with a linear .head; build it with models.build_model"
        )
    c = _check_classes(classes, generalist.head.out_features)
    spec = copy.deepcopy(generalist)
    full = spec.head
    head = models.DustbinHead(full.in_features, full.out_features, c.tolist()).to(full.weight.device)
    head.linear = full
    spec.head = head
    spec.config = dataclasses.replace(
        spec.config, num_classes=len(c) + 1, dustbin_of=full.out_features, special_classes=tuple(int(i) for i in c)
    )
    return spec


HEAD_FITS = ("lstsq", "trained")
"""How :func:`small_head` makes the dustbin row: ``lstsq`` fits its logit, ``trained`` then trains it on probabilities."""


def small_head(
    head: models.DustbinHead, features: torch.Tensor, *, fit: str = "lstsq", steps: int = 100
) -> torch.nn.Linear:
    """A trained specialist's :class:`models.DustbinHead` (C rows) collapsed to an ``nn.Linear`` of S + 1 rows.

    The S special rows are copied, so the special logits -- and with them the argmax within the group and every
    ratio of two special probabilities -- are exactly those of the full head. The dustbin row is made one of two
    ways (issue 22 part 2; the accuracy cost of each is measured, not assumed):

    * ``lstsq``: the least-squares fit of the full head's dustbin logit (the log-sum-exp of the other C - S logits) on
      ``features``, an affine function of the features standing in for a log-sum-exp of affine functions;
    * ``trained``: that fit as the start, then the one row trained (L-BFGS, ``steps`` iterations, float64) to
      minimise the cross-entropy from the full head's S + 1 probabilities to the small head's on ``features``: the
      special rows stay exact, and the loss, convex in the row, is the one the ensemble reads (probabilities, not
      logits).

    Args:
        head: the trained full head.
        features: (N, D) features of validation images (``model.features(x)``), N > D.
        fit: one of :data:`HEAD_FITS`.
        steps: L-BFGS iterations of ``trained``.

    Returns:
        ``nn.Linear(D, S + 1)`` on ``features``'s device and the head's dtype: special rows first, dustbin last.
    """
    if fit not in HEAD_FITS:
        raise SpecialistError(f"fit={fit!r}: choose one of {', '.join(HEAD_FITS)}")
    w, b = head.linear.weight, head.linear.bias
    if features.ndim != 2 or features.shape[1] != w.shape[1] or features.shape[0] <= w.shape[1]:
        raise SpecialistError(
            f"features must be (N, D={w.shape[1]}) with N > D to fit the dustbin row, got {tuple(features.shape)}; "
            "pass model.features(x) of more validation images"
        )
    with torch.no_grad():
        h = features.to(torch.float64).cpu()
        wd, bd = w.detach().double().cpu(), b.detach().double().cpu()
        target = torch.logsumexp(h @ wd.index_select(0, head.others.cpu()).T + bd[head.others.cpu()], dim=1)
        design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
        sol = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    if fit == "trained":
        special = h @ wd.index_select(0, head.special.cpu()).T + bd[head.special.cpu()]
        with torch.no_grad():
            q = torch.softmax(torch.cat([special, target[:, None]], dim=1), dim=1)
        row = sol.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [row], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
        )

        def loss() -> torch.Tensor:
            opt.zero_grad()
            z = torch.cat([special, (design @ row)[:, None]], dim=1)
            out = -(q * torch.log_softmax(z, dim=1)).sum(1).mean()
            out.backward()
            return out

        opt.step(loss)
        sol = row.detach()
    with torch.no_grad():
        out = torch.nn.Linear(w.shape[1], len(head.special) + 1).to(device=w.device, dtype=w.dtype)
        out.weight.copy_(torch.cat([w.index_select(0, head.special), sol[None, :-1].to(w.device, w.dtype)]))
        out.bias.copy_(torch.cat([b.index_select(0, head.special), sol[-1:].to(b.device, b.dtype)]))
    return out


def collapse_head(
    model: models.Classifier, x: torch.Tensor, *, batch_size: int = 512, fit: str = "lstsq"
) -> models.Classifier:
    """A copy of a trained specialist with its full C-row head collapsed to S + 1 rows (:func:`small_head`).

    The copy shares a shared-trunk specialist's trunk and the generalist's layers under its low-rank deltas (not
    copied); ``model`` is unchanged.
    Its config becomes a plain linear head of S + 1 outputs.

    Args:
        model: a specialist with a :class:`models.DustbinHead` (initialised from the generalist and trained).
        x: (N, C, H, W) float validation images in [0, 1] the dustbin row is fitted on (N > D).
        batch_size: images per forward pass.
        fit: how the dustbin row is made (:data:`HEAD_FITS`).

    Returns:
        The collapsed specialist, in eval mode.
    """
    if not isinstance(model.head, models.DustbinHead):
        raise SpecialistError(
            f"the specialist's head is a {type(model.head).__name__}, not a DustbinHead: only a specialist "
            "initialised from the generalist has a full head to collapse"
        )
    shared = [*getattr(model, "_trunk", []), *(m.base for m in model.modules() if isinstance(m, models.LowRankDelta))]
    memo = {id(t): t for t in shared}  # a shared trunk, and the generalist's layers under low-rank deltas, stay shared
    small = copy.deepcopy(model, memo).eval()
    with torch.no_grad():
        feats = torch.cat([small.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    small.head = small_head(model.head, feats, fit=fit)
    small.config = dataclasses.replace(small.config, dustbin_of=None, special_classes=None)
    return small


def collapsed_probs(ds: Any, trained: TrainedSpecialist, x: Any, *, fit: str = "lstsq") -> np.ndarray:
    """A trained specialist's (N, S + 1) probabilities on ``x`` with its head collapsed on the validation images
    (:func:`collapse_head`, ``fit``) and a ``prior_match`` dustbin correction fitted again for the collapsed head, the
    same way on the same images (another correction is kept as it was).

    Args:
        ds: the dataset it was trained on (its validation split fits the row and the correction).
        trained: the specialist, with a full :class:`models.DustbinHead`.
        x: images to predict (uint8 or float).
        fit: how the dustbin row is made (:data:`HEAD_FITS`).

    Returns:
        Probabilities, special classes first, dustbin last.
    """
    from . import dataset

    x_val, y_val = ds.split("val")
    small = collapse_head(trained.model.cpu().eval(), dataset.to_float(x_val), fit=fit)
    shift = trained.dustbin_shift
    if trained.correction == "prior_match":
        shift = correction_value(
            "prior_match",
            y_train=ds.y_train,
            classes=trained.classes,
            special_fraction=trained.special_fraction,
            val_logits=training.predict_logits(small, x_val, device="cpu").numpy(),
            y_val=y_val,
        )
    return predict_specialist(small, x, shift=shift, device="cpu")


def head_rows(model: torch.nn.Module) -> int:
    """Rows of a specialist's head: C for a full :class:`models.DustbinHead`, S + 1 for a small one."""
    head = model.head
    return int(head.linear.out_features if isinstance(head, models.DustbinHead) else head.out_features)


# ------------------------------------------------------------------------------------------ sampling


def _labels(y: Any) -> torch.Tensor:
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype not in (torch.int64, torch.int32):
        raise SpecialistError(f"y_train must be a (N,) integer array, got {y.dtype} {tuple(y.shape)}")
    return y.long().cpu()


def _draw(pool: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` items of ``pool``: whole shuffled passes, then a partial one (without replacement within a pass)."""
    n = len(pool)
    parts = [pool[torch.randperm(n, generator=generator)] for _ in range(k // n)]
    parts.append(pool[torch.randperm(n, generator=generator)[: k - (k // n) * n]])
    return torch.cat(parts)


@dataclass(frozen=True, eq=False)
class EnrichedSampler:
    """``sample_indices(epoch, generator)`` for :func:`training.fit`: enriched epochs (paper §5.2).

    Every epoch holds ``n_special`` examples of the special classes and ``n_rest`` of the other
    classes. Each part is drawn in whole shuffled passes over its pool (no example repeats before
    all of its pool has been used: sampling with replacement only where the pool is smaller than
    needed). The two parts are then interleaved by stratified random positions, so every contiguous
    stretch of the order -- hence every batch -- holds the share ``f`` up to about one example of each
    part, not only the epoch as a whole.

    All randomness comes from the ``generator`` that ``fit`` passes (so a resumed run repeats the
    same order); called with ``generator=None`` it uses ``seed`` and ``epoch``.

    Attributes:
        special_idx: (n_S,) indices into ``x_train`` of the special examples.
        rest_idx: (n_R,) indices of the other examples.
        n_special: special examples per epoch.
        n_rest: other examples per epoch.
        seed: used only when called without a generator.
    """

    special_idx: torch.Tensor
    rest_idx: torch.Tensor
    n_special: int
    n_rest: int
    seed: int = 0

    @property
    def epoch_size(self) -> int:
        """Images drawn per epoch: the group's share plus the others'."""
        return self.n_special + self.n_rest

    @property
    def special_fraction(self) -> float:
        """The share f actually sampled (``n_special / epoch_size``; differs from the request by rounding only)."""
        return self.n_special / self.epoch_size

    def __call__(self, epoch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training-set indices of one epoch, the same for the same seed and epoch."""
        if generator is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        s = _draw(self.special_idx, self.n_special, generator)
        r = _draw(self.rest_idx, self.n_rest, generator)
        f64 = torch.float64
        pos_s = (
            torch.arange(self.n_special, dtype=f64) + torch.rand(self.n_special, generator=generator, dtype=f64)
        ) / self.n_special
        pos_r = (
            torch.arange(self.n_rest, dtype=f64) + torch.rand(self.n_rest, generator=generator, dtype=f64)
        ) / self.n_rest
        order = torch.argsort(torch.cat([pos_s, pos_r]), stable=True)
        return torch.cat([s, r])[order]


def enriched_sampler(
    y_train: Any,
    classes: Any,
    *,
    special_fraction: float = 0.5,
    epoch_size: int | None = None,
    seed: int = 0,
    num_classes: int | None = None,
) -> EnrichedSampler:
    """The paper's enriched sampling: a share ``special_fraction`` of every epoch from the special classes.

    Args:
        y_train: (N,) generalist labels of the training set.
        classes: (S,) special class indices.
        special_fraction: f in (0, 1); the paper uses 0.5 (half special, half "sampled at random
            from the rest").
        epoch_size: examples per epoch; ``None`` = 2 x the number of special training examples.
        seed: used only when the sampler is called without a generator.
        num_classes: C (default ``max(y_train) + 1``).

    Returns:
        An :class:`EnrichedSampler`; pass it as ``fit(..., sample_indices=sampler)``.
    """
    if not 0.0 < special_fraction < 1.0:
        raise SpecialistError(f"special_fraction={special_fraction}: use a share strictly between 0 and 1 (paper: 0.5)")
    y = _labels(y_train)
    c = _check_classes(classes, num_classes or int(y.max()) + 1)
    is_special = torch.from_numpy(np.isin(y.numpy(), c))
    special_idx, rest_idx = torch.nonzero(is_special).flatten(), torch.nonzero(~is_special).flatten()
    if len(special_idx) == 0 or len(rest_idx) == 0:
        which = "special classes" if len(special_idx) == 0 else "other classes"
        raise SpecialistError(
            f"the training set has no example of the {which} {c.tolist()}: check the labels and the group"
        )
    size = 2 * len(special_idx) if epoch_size is None else int(epoch_size)
    if size < 2:
        raise SpecialistError(f"epoch_size={size}: use at least 2 so both parts are represented")
    n_special = min(max(round(special_fraction * size), 1), size - 1)
    return EnrichedSampler(special_idx, rest_idx, n_special, size - n_special, seed)


# ------------------------------------------------------------------------------------------ correction


def natural_special_share(y_train: Any, classes: Any) -> float:
    """pi: share of the training examples whose class is special."""
    y = _labels(y_train).numpy()
    c = _check_classes(classes, max(int(y.max()) + 1, int(np.max(classes)) + 1))
    return float(np.isin(y, c).mean())


def oversampling_factor(natural_share: float, special_fraction: float) -> float:
    """R = [f / (1 - f)] / [pi / (1 - pi)]: the factor by which the sampling multiplied the odds special:rest.

    Args:
        natural_share: pi, the share of special examples in the training set, in (0, 1).
        special_fraction: f, their share in the enriched sampling, in (0, 1).
    """
    pi, f = float(natural_share), float(special_fraction)
    if not 0.0 < pi < 1.0:
        raise SpecialistError(
            f"natural special share pi={pi}: the training set must hold examples of both the special and the "
            f"other classes"
        )
    if not 0.0 < f < 1.0:
        raise SpecialistError(f"special_fraction f={f}: use a share strictly between 0 and 1")
    return (f / (1.0 - f)) / (pi / (1.0 - pi))


def odds_correction(y_train: Any, classes: Any, *, special_fraction: float) -> float:
    """Log r, the number added to the dustbin logit after training (paper §5.2).

    With natural share pi of special-class examples in the training set and share f in the enriched
    sampling, training multiplied the odds special:rest by ``r = [f/(1-f)] / [pi/(1-pi)]``; a model
    fitted to that sampling has special logits too high relative to the dustbin by ``log r``, so
    ``z_dustbin += log r`` at inference restores the natural prior (Bayes' rule; exact for a model
    that learnt the sampling distribution's posterior). Positive when the special classes were
    oversampled (f > pi).

    This is the Bayes reading of the paper's "log of the oversampling factor"; the literal reading,
    log(f/pi), is :func:`literal_correction`.

    Args:
        y_train: (N,) training labels (generalist classes).
        classes: (S,) special class indices.
        special_fraction: f, the share of special examples in the enriched sampling.
    """
    return float(math.log(oversampling_factor(natural_special_share(y_train, classes), special_fraction)))


def literal_correction(y_train: Any, classes: Any, *, special_fraction: float) -> float:
    """log(f / pi): the paper's "log of the oversampling factor" read literally (f: special share in the
    training batches, pi: natural share). Smaller than the Bayes odds correction :func:`odds_correction`
    by log((1 - pi)/(1 - f)) -- about log 2 when pi is small and f = 1/2."""
    pi = natural_special_share(y_train, classes)
    if not 0.0 < special_fraction < 1.0:
        raise SpecialistError(f"special_fraction f={special_fraction}: use a share strictly between 0 and 1")
    return float(math.log(special_fraction / pi))


def correction_value(
    method: str,
    *,
    y_train: Any,
    classes: Any,
    special_fraction: float,
    val_logits: Any | None = None,
    y_val: Any | None = None,
) -> float:
    """The dustbin correction ``method`` (one of :data:`CORRECTIONS`) for one specialist.

    Args:
        method: ``odds`` | ``paper_literal`` | ``prior_match`` | ``none``.
        y_train: (N,) training labels.
        classes: (S,) special classes.
        special_fraction: the fraction f of special images sampled per epoch.
        val_logits: (N_val, S + 1) the specialist's uncorrected logits on the validation images
            (``prior_match`` only).
        y_val: (N_val,) validation labels (``prior_match`` only).
    """
    if method == "odds":
        return odds_correction(y_train, classes, special_fraction=special_fraction)
    if method == "paper_literal":
        return literal_correction(y_train, classes, special_fraction=special_fraction)
    if method == "prior_match":
        if val_logits is None or y_val is None:
            raise SpecialistError("prior_match is fitted on validation images: pass val_logits and y_val")
        return prior_matched_correction(val_logits, 1.0 - natural_special_share(y_val, classes))
    if method == "none":
        return 0.0
    raise SpecialistError(f"unknown dustbin correction {method!r}; use one of {', '.join(CORRECTIONS)}")


def apply_dustbin_shift(logits: Any, shift: float) -> np.ndarray:
    """Softmax of ``logits`` with ``shift`` added to the last (dustbin) column.

    Args:
        logits: (N, S + 1) specialist logits, dustbin last.
        shift: the dustbin shift, e.g. log r (:func:`correction_value`, ``TrainedSpecialist.dustbin_shift``).

    Returns:
        (N, S + 1) float64 probabilities.
    """
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    z = np.array(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise SpecialistError(f"logits must be (N, S + 1) with the dustbin last, got shape {z.shape}")
    z[:, -1] += float(shift)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def prior_matched_correction(logits: Any, dustbin_share: float, *, tol: float = 1e-9) -> float:
    """The dustbin correction c whose corrected predictions match the natural dustbin prior on average.

    Solves ``mean_i softmax(z_i + c e_dustbin)_dustbin = dustbin_share`` for c (the left side rises
    monotonically with c; bisection). On images drawn with the natural class frequencies (the
    training set) this is a data-driven alternative to log r that does not assume the model learnt
    the enriched sampling's posterior -- e.g. with the generalist's soft targets, which carry the
    natural prior already.

    Args:
        logits: (N, S + 1) specialist logits on images with natural class frequencies, dustbin last.
        dustbin_share: 1 - pi, the natural share of examples outside the special classes, in (0, 1).
        tol: bisection tolerance on c.
    """
    if not 0.0 < dustbin_share < 1.0:
        raise SpecialistError(
            f"dustbin_share={dustbin_share}: use the share of non-special examples, strictly in (0, 1)"
        )
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or len(z) == 0:
        raise SpecialistError(f"logits must be (N, S + 1) with N >= 1 and the dustbin last, got shape {z.shape}")
    margin = z[:, -1] - np.logaddexp.reduce(z[:, :-1], axis=1)  # dustbin log-odds against the special cells

    def share(c: float) -> float:
        return float(np.mean(0.5 * (1.0 + np.tanh(0.5 * (margin + c)))))  # mean sigmoid, overflow-free

    lo, hi = -60.0 - float(margin.max()), 60.0 - float(margin.min())
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if share(mid) < dustbin_share else (lo, mid)
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------ soft targets


def collapse_soft_targets(
    teacher_probs: Any, classes: Any, *, temperature: float, method: str = "logits"
) -> np.ndarray:
    """Soft targets for a specialist from the generalist's probabilities at temperature T (paper §6).

    Two ways to put the mass of the other classes into the dustbin:

    * ``"probs"`` -- sum the tempered probabilities: ``collapse_probs(softmax(v / T))``. For T > 1 this
      inflates the dustbin: its implied logit at T = 1 is ``T * LSE(v_others / T)``, up to
      ``(T - 1) * log K`` above the generalist's own ``LSE(v_others)`` (K = number of other classes),
      so the student learns to over-predict the dustbin.
    * ``"logits"`` (default) -- collapse at T = 1, then soften: the cell logits are ``v_S`` and
      ``LSE(v_others)`` (the dustbin carries exactly the generalist's mass on the other classes, as the
      head initialisation aims for), and the targets are their softmax at T. At T = 1 both agree.

    The generalist's logits are recovered from its tempered probabilities as ``v = T log p + const``.

    Args:
        teacher_probs: (N, C) the generalist's ``softmax(v / T)``.
        classes: (S,) special class indices.
        temperature: T at which ``teacher_probs`` were computed (and the targets are returned).
        method: ``"logits"`` or ``"probs"``.

    Returns:
        (N, S + 1) float64 soft targets at temperature T, dustbin last.
    """
    if method not in ("logits", "probs"):
        raise SpecialistError(f"soft-target collapse method {method!r}; use 'logits' or 'probs'")
    if temperature <= 0:
        raise SpecialistError(f"temperature={temperature}: use the positive T the teacher probabilities were made with")
    p = np.asarray(
        teacher_probs.detach().cpu().numpy() if isinstance(teacher_probs, torch.Tensor) else teacher_probs,
        dtype=np.float64,
    )
    if method == "probs":
        return collapse_probs(p, classes)
    if p.ndim != 2:
        raise SpecialistError(f"teacher_probs must be (N, C), got shape {p.shape}")
    c = _check_classes(classes, p.shape[1], allow_all=True)
    others = np.ones(p.shape[1], dtype=bool)
    others[c] = False
    with np.errstate(divide="ignore"):
        v = temperature * np.log(p)
    cells = np.concatenate([v[:, c], np.logaddexp.reduce(v[:, others], axis=1, keepdims=True)], axis=1) / temperature
    cells -= cells.max(axis=1, keepdims=True)
    e = np.exp(cells)
    return e / e.sum(axis=1, keepdims=True)


def teacher_soft_targets(
    generalist: torch.nn.Module,
    x_uint8: torch.Tensor,
    classes: Any,
    *,
    temperature: float,
    method: str = "logits",
    batch_size: int = 512,
    device: str = "auto",
) -> np.ndarray:
    """The generalist's soft targets at temperature T on ``x_uint8``, collapsed onto the specialist's cells.

    Args:
        generalist: the teacher over C classes.
        x_uint8: (N, channels, H, W) training images.
        classes: (S,) special class indices.
        temperature: T.
        method: see :func:`collapse_soft_targets`.
        batch_size: images per forward pass of the teacher.
        device: where the teacher runs.

    Returns:
        (N, S + 1) float32 soft targets, dustbin last.
    """
    p = training.predict_probs(generalist, x_uint8, temperature=temperature, batch_size=batch_size, device=device)
    return collapse_soft_targets(p, classes, temperature=temperature, method=method).astype(np.float32)


def specialist_teacher(
    generalist: torch.nn.Module, classes: Any, *, temperature: float, method: str = "logits"
) -> training.Teacher:
    """The generalist as a per-batch teacher for :func:`training.fit` (``teacher=``): on the very augmented
    batch the specialist trains on, the generalist's soft targets at temperature T collapsed onto the
    specialist's cells (:func:`collapse_soft_targets`, done in torch).

    Args:
        generalist: the teacher over C classes (put in eval mode here).
        classes: (S,) special class indices.
        temperature: T.
        method: ``"logits"`` (collapse at T = 1, then soften) or ``"probs"`` (sum tempered probabilities).
    """
    if method not in ("logits", "probs"):
        raise SpecialistError(f"soft-target collapse method {method!r}; use 'logits' or 'probs'")
    generalist.eval()
    n = generalist.num_outputs if hasattr(generalist, "num_outputs") else None
    c = _check_classes(classes, n or int(np.max(classes)) + 2, allow_all=False)
    special = torch.as_tensor(c)
    others = torch.as_tensor(np.setdiff1d(np.arange(n or int(np.max(classes)) + 2), c))

    @torch.no_grad()
    def teach(x: torch.Tensor) -> torch.Tensor:
        dev = next(generalist.parameters()).device
        if dev != x.device:
            generalist.to(x.device)
        v = generalist(x).float()
        s, o = special.to(v.device), others.to(v.device)
        if method == "probs":
            p = torch.softmax(v / temperature, dim=1)
            return torch.cat([p.index_select(1, s), p.index_select(1, o).sum(1, keepdim=True)], 1)
        cells = torch.cat([v.index_select(1, s), torch.logsumexp(v.index_select(1, o), 1, keepdim=True)], 1)
        return torch.softmax(cells / temperature, dim=1)

    return teach


# ------------------------------------------------------------------------------------------ training


def specialist_model_config(
    config: SpecialistConfig,
    num_outputs: int,
    *,
    generalist: models.Classifier | None = None,
    in_channels: int | None = None,
    image_size: int | None = None,
) -> tuple[models.ModelConfig, bool]:
    """The specialist's model config and whether it is initialised from the generalist.

    Returns:
        ``(ModelConfig with num_classes=num_outputs, from_generalist)``.
    """
    gen_cfg = getattr(generalist, "config", None) if generalist is not None else None
    if gen_cfg is not None:
        cfg = dataclasses.replace(
            gen_cfg,
            name=config.model or gen_cfg.name,
            width=config.width or gen_cfg.width,
            depth=config.depth or gen_cfg.depth,
            num_classes=num_outputs,
        )
        same = (cfg.name, cfg.width, cfg.depth) == (gen_cfg.name, gen_cfg.width, gen_cfg.depth)
    else:
        if in_channels is None or image_size is None:
            raise SpecialistError("without a generalist, pass in_channels and image_size (or pass the generalist)")
        kw = {k: v for k, v in (("width", config.width), ("depth", config.depth)) if v is not None}
        cfg = models.ModelConfig(
            name=config.model or "cnn", num_classes=num_outputs, in_channels=in_channels, image_size=image_size, **kw
        )
        same = False
    if config.init == "generalist" and not same:
        raise SpecialistError(
            "init='generalist' needs the generalist (pass generalist=) and the same architecture: leave "
            "SpecialistConfig.model/width/depth as None, or use init='scratch'"
        )
    return cfg, (same and config.init not in ("scratch", "distill"))


def train_specialist(
    ds: Any,
    classes: Any,
    *,
    config: SpecialistConfig | None = None,
    generalist: models.Classifier | None = None,
    state_path: str | Path | None = None,
    desc: str = "specialist",
) -> TrainedSpecialist:
    """Train one specialist on ``ds`` for the special ``classes`` (the paper's recipe).

    Steps: labels mapped by :func:`target_map`; model from :func:`init_from_generalist` (same
    architecture) or built from scratch (``config.model``/``width``/``depth`` differ from the
    generalist's, or ``init="scratch"``; uses the global torch RNG, so seed it first); epochs from
    :func:`enriched_sampler` (deterministic from ``config.train.seed`` through ``fit``'s generator);
    optional soft targets from the generalist on every augmented batch (:func:`specialist_teacher`);
    ``training.fit``; then the dustbin correction (:func:`correction_value`) with the share actually sampled.

    Args:
        ds: a ``data.Dataset``; the validation split (labels mapped) is evaluated every epoch.
        classes: (S,) special class indices, 0 < S < C.
        config: a :class:`SpecialistConfig` (default ``SpecialistConfig()``).
        generalist: the trained generalist (needed to initialise from it, and for soft targets).
        state_path: resumable training state (see ``training.fit``).
        desc: progress-bar label.

    Returns:
        :class:`TrainedSpecialist` (``examples_seen`` = example-passes of all epochs run).
    """
    config = config or SpecialistConfig()
    num_classes = ds.num_classes
    c = _check_classes(classes, num_classes)
    tmap = torch.from_numpy(target_map(c, num_classes))
    y_train, y_val = tmap[ds.y_train], tmap[ds.y_val]
    model_cfg, from_gen = specialist_model_config(
        config, len(c) + 1, generalist=generalist, in_channels=ds.channels, image_size=ds.image_size
    )
    if config.shared_stages and not from_gen:
        raise SpecialistError(
            f"shared_stages={config.shared_stages} shares the generalist's first stages, so the specialist needs the "
            f"generalist's architecture and initialisation: pass generalist=, leave model/width/depth as None, or set shared_stages=0"
        )
    tc = config.train_config()
    distil_passes = 0
    if config.init == "distill":
        if generalist is None:
            raise SpecialistError("init='distill' distils the generalist first: pass generalist=")
        base_cfg = dataclasses.replace(model_cfg, num_classes=num_classes)
        distil_state = None if state_path is None else Path(str(state_path) + ".distil")
        base, distil_passes = distil_base(ds, generalist, base_cfg, config=config, state_path=distil_state, desc=desc)
        model = init_from_generalist(base, c)
        model_cfg = model.config
    else:
        model = init_from_generalist(generalist, c) if from_gen else models.build_model(model_cfg)
    if config.shared_stages:
        owner = copy.deepcopy(generalist)
        model = models.share_trunk(model, owner.trunk(config.shared_stages))
        if config.delta_rank:
            model = models.low_rank_delta(model, owner, config.delta_rank)
    if from_gen:
        model_cfg = model.config
    sampler = enriched_sampler(
        ds.y_train,
        c,
        special_fraction=config.special_fraction,
        epoch_size=config.epoch_size,
        seed=tc.seed,
        num_classes=num_classes,
    )
    teacher = None
    if config.soft_weight > 0:
        if generalist is None:
            raise SpecialistError(
                "soft_weight > 0 needs the generalist (its soft targets are the specialist's teacher)"
            )
        teacher = specialist_teacher(
            copy.deepcopy(generalist), c, temperature=config.temperature, method=config.soft_collapse
        )
    history = training.fit(
        model,
        ds.x_train,
        y_train,
        config=tc,
        x_val=ds.x_val,
        y_val=y_val,
        hflip=ds.hflip,
        teacher=teacher,
        sample_indices=sampler,
        state_path=state_path,
        desc=desc,
    )
    if distil_passes and state_path is not None:
        Path(str(state_path) + ".distil").unlink(missing_ok=True)
    val_logits = None
    if config.correction == "prior_match":
        val_logits = training.predict_logits(model, ds.x_val, batch_size=tc.eval_batch_size, device=tc.device)
    shift = correction_value(
        config.correction,
        y_train=ds.y_train,
        classes=c,
        special_fraction=sampler.special_fraction,
        val_logits=val_logits,
        y_val=ds.y_val,
    )
    return TrainedSpecialist(
        model=model.eval(),
        classes=c,
        class_names=tuple(ds.class_names[i] for i in c),
        dustbin_shift=shift,
        history=history,
        examples_seen=int(history.examples_seen) + distil_passes,
        model_config=model_cfg,
        special_fraction=sampler.special_fraction,
        initialised_from="generalist" if from_gen else config.init if config.init == "distill" else "scratch",
        correction=config.correction,
    )


def distil_base(
    ds: Any,
    generalist: models.Classifier,
    model_config: models.ModelConfig,
    *,
    config: SpecialistConfig,
    state_path: str | Path | None = None,
    desc: str = "specialist",
) -> tuple[models.Classifier, int]:
    """A fresh network of ``model_config`` (all C classes) distilled from ``generalist`` on all training images.

    Hard labels plus the generalist's soft targets at ``config.temperature`` on every augmented batch
    (soft weight 0.5), for ``config.train.epochs`` epochs of the specialist's loop settings.

    Returns:
        ``(model, example-passes used)``.
    """
    if model_config.num_classes != ds.num_classes or model_config.dustbin_of is not None:
        raise SpecialistError(
            f"the distilled base needs a plain head over the {ds.num_classes} classes; got {model_config}"
        )
    base = models.build_model(model_config)
    teacher_model = copy.deepcopy(generalist).eval()
    temperature = config.temperature

    @torch.no_grad()
    def teach(x: torch.Tensor) -> torch.Tensor:
        if next(teacher_model.parameters()).device != x.device:
            teacher_model.to(x.device)
        return torch.softmax(teacher_model(x).float() / temperature, dim=1)

    tc = dataclasses.replace(config.train, soft_weight=0.5, temperature=temperature)
    history = training.fit(
        base,
        ds.x_train,
        ds.y_train,
        config=tc,
        x_val=ds.x_val,
        y_val=ds.y_val,
        hflip=ds.hflip,
        teacher=teach,
        state_path=state_path,
        desc=f"{desc}: distil the generalist",
    )
    return base.eval(), int(history.examples_seen)


def predict_specialist(
    model: torch.nn.Module,
    x_uint8: torch.Tensor,
    *,
    shift: float,
    batch_size: int = 512,
    device: str = "auto",
) -> np.ndarray:
    """Specialist probabilities with the dustbin correction applied.

    Args:
        model: a specialist (|S| + 1 outputs, dustbin last).
        x_uint8: (N, channels, H, W) ``uint8`` images.
        shift: the number added to the dustbin logit (``TrainedSpecialist.dustbin_shift``).
        batch_size: images per forward pass (see ``training.predict_logits``).
        device: where the model runs.

    Returns:
        (N, |S| + 1) float64 probabilities ``softmax(z + shift * e_dustbin)``.
    """
    logits = training.predict_logits(model, x_uint8, batch_size=batch_size, device=device)
    return apply_dustbin_shift(logits, shift)


def save_specialist(path: str | Path, trained: TrainedSpecialist, *, ds: Any, group: str) -> Path:
    """Write a specialist's self-describing checkpoint (weights, model config, its classes, the dustbin
    correction with its name, the share f sampled, how it was initialised, its history); returns the path."""
    from . import checkpoints

    extra = {"stage": "specialist", "group": group, **trained.extra()}
    if isinstance(trained.model, models.SharedTrunkClassifier):
        extra["shared_trunk"] = {
            "stages": trained.model.shared_stages,
            "generalist_fingerprint": trained.model.trunk_fingerprint,
        }
    return checkpoints.save_checkpoint(
        path,
        trained.model,
        model_config=trained.model_config or trained.model.config,
        class_names=ds.class_names,
        dataset_fingerprint=ds.fingerprint,
        history=trained.history,
        extra=extra,
    )


def _shift_of(path: str | Path, extra: dict[str, Any]) -> float:
    """The dustbin shift a specialist checkpoint records, under its current or its pre-rename key."""
    from .checkpoints import CheckpointError, _fix

    for key in SHIFT_KEYS:
        if isinstance(extra.get(key), (int, float)) and not isinstance(extra.get(key), bool):
            return float(extra[key])
    raise CheckpointError(f"checkpoint {path} has incomplete metadata (no dustbin_shift): {_fix(Path(path))}")


def load_specialist(
    path: str | Path,
    *,
    ds: Any,
    trunk: models.Trunk | None = None,
    generalist: models.Classifier | None = None,
) -> TrainedSpecialist:
    """Load a checkpoint written by :func:`save_specialist` for the dataset ``ds`` (a clear
    ``CheckpointError`` for another dataset, a non-specialist checkpoint or missing metadata).

    A shared-trunk specialist's checkpoint holds only its own stages and head plus the fingerprint of the
    generalist it shares with: pass ``trunk=generalist.trunk(s)`` (or ``generalist=``); a trunk cut from another
    generalist is refused. A low-rank delta specialist's checkpoint (``delta_rank`` > 0) holds only the deltas, the
    batch-norm layers and the head: pass ``generalist=``, whose later stages the deltas are added to.

    Args:
        path: the checkpoint.
        ds: the dataset it was trained on.
        trunk: the shared trunk (defaults to ``generalist.trunk(s)`` when ``generalist`` is given).
        generalist: the generalist it was trained with (needed for low-rank deltas).

    Returns:
        The specialist, in eval mode.
    """
    from . import checkpoints

    model, info = checkpoints.load_checkpoint(
        path, class_names=ds.class_names, dataset_fingerprint=ds.fingerprint, required_extra=SPECIALIST_EXTRA
    )
    e = info.extra
    if isinstance(model, models.SharedTrunkClassifier):
        ref = e.get("shared_trunk") or {}
        if trunk is None and generalist is not None:
            trunk = generalist.trunk(model.shared_stages)
        _attach_trunk(path, model, ref, trunk)
        if model.config.delta_rank:
            _attach_deltas(path, model, ref, generalist)
    return TrainedSpecialist(
        model=model.eval(),
        classes=np.asarray(e["classes"], dtype=np.int64),
        class_names=tuple(e["class_names"]),
        dustbin_shift=_shift_of(path, e),
        history=[] if info.history is None else info.history.to_dict()["records"],
        examples_seen=int(e["examples_seen"]),
        model_config=info.model_config,
        special_fraction=e.get("special_fraction"),
        initialised_from=e.get("initialised_from"),
        correction=e.get("correction"),
    )


def _attach_trunk(
    path: str | Path, model: models.SharedTrunkClassifier, ref: dict[str, Any], trunk: models.Trunk | None
) -> None:
    """Attach ``trunk`` to a loaded shared-trunk specialist after checking it is cut from the generalist recorded in ``ref``."""
    from .checkpoints import CheckpointError

    s, fp = model.shared_stages, ref.get("generalist_fingerprint")
    if not isinstance(fp, str):
        raise CheckpointError(
            f"checkpoint {path} shares a trunk but records no generalist fingerprint: retrain the specialist"
        )
    if trunk is None:
        raise CheckpointError(
            f"checkpoint {path} holds a specialist that shares the first {s} stages of generalist {fp}: "
            f"pass trunk=generalist.trunk({s}) of that generalist to load_specialist"
        )
    if trunk.owner_fingerprint != fp or trunk.stages != s:
        raise CheckpointError(
            f"checkpoint {path} was trained on the first {s} stages of generalist {fp}, but the trunk given is "
            f"{trunk.stages} stages of generalist {trunk.owner_fingerprint}: load it with the generalist it was "
            f"trained with, or retrain the specialists"
        )
    model.trunk_fingerprint = fp
    model.attach(trunk)


def _attach_deltas(
    path: str | Path, model: models.SharedTrunkClassifier, ref: dict[str, Any], generalist: models.Classifier | None
) -> None:
    """Put a loaded low-rank delta specialist's deltas on ``generalist`` after checking it is the one in ``ref``."""
    from .checkpoints import CheckpointError

    fp = ref.get("generalist_fingerprint")
    if generalist is None:
        raise CheckpointError(
            f"checkpoint {path} stores rank-{model.config.delta_rank} deltas on the later stages of generalist {fp}: "
            "pass generalist=<that generalist> to load_specialist"
        )
    if models.fingerprint(generalist) != fp:
        raise CheckpointError(
            f"checkpoint {path} stores deltas on generalist {fp}, but the generalist given is "
            f"{models.fingerprint(generalist)}: load it with the generalist it was trained with, or retrain"
        )
    models.attach_deltas(model, generalist)


def train_flops_per_example(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """Training FLOPs of one example-pass (:func:`specialkit.cost.train_flops_per_example`)."""
    return cost.train_flops_per_example(model, input_shape)


def specialist_examples_seen(specialists: Sequence[TrainedSpecialist]) -> int:
    """Total training example-passes of all specialists (for ``evaluation.compute_matched_epochs``)."""
    return int(sum(int(s.examples_seen) for s in specialists))


# ---------------------------------------------------------------------------------------------- the stage's recipe
# The ``specialists`` stage of a run (``pipeline.Run.get("specialists")``): one specialist per group, each in its own
# folder with its own key, so editing one group retrains only that specialist and jobs can fan out.


def run_config(run: Any) -> SpecialistConfig:
    """The specialists' settings of ``run`` (architecture, sampling, dustbin correction, training).

    Args:
        run: the run.

    Returns:
        The :class:`SpecialistConfig`.
    """
    c = run.config
    tc = run.train_config(
        epochs=c.specialist_epochs,
        lr=c.specialist_lr,
        seed_offset=stages.by_name("specialists").seed_offset,
        soft_weight=c.specialist_soft_weight,
        temperature=c.specialist_temperature,
    )
    model, width, depth = c.specialist_model, c.specialist_width, c.specialist_depth
    if run.scratch_reason():
        model, width, depth = model or c.model, width or c.width, depth or c.depth
    return SpecialistConfig(
        model=model,
        width=width,
        depth=depth,
        special_fraction=c.special_fraction,
        soft_weight=c.specialist_soft_weight,
        temperature=c.specialist_temperature,
        correction=c.dustbin_correction,
        train=tc,
        init=c.specialist_init,
        shared_stages=c.specialist_shared_stages,
        delta_rank=c.specialist_delta_rank,
    )


def key_of(run: Any, index: int) -> str:
    """The key of specialist ``index`` of ``run`` alone: the specialist settings, the stages before it and its own group
    (name, position, classes), so editing one group retrains only that specialist.

    Args:
        run: the run.
        index: the group's position in ``clusters.json``.

    Returns:
        The key (:func:`specialkit.store.hash_key`).
    """
    spec = run.clusters()
    name = list(spec.groups)[index]
    return store.hash_key(
        {
            "stage": "specialist",
            "format": store.RESULTS_FORMAT,
            "settings": run.settings("data"),
            "generalist": run.settings("generalist"),
            "specialists": run.settings("specialists"),
            "index": index,
            "group": name,
            "classes": list(spec.groups[name]),
            "class_names": list(spec.class_names),
        }
    )


def folder_of(run: Any, index: int) -> Path:
    """``specialists/<index>-<group name>`` of ``run``; a long or odd group name is shortened to a safe file name.

    Args:
        run: the run.
        index: the group's position in ``clusters.json``.

    Returns:
        The specialist's folder.
    """
    name = list(run.clusters().groups)[index]
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_") else "_" for ch in name)
    if len(safe) > 48 or safe != name:
        safe = f"{safe[:40]}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    return run.stage_dir("specialists") / f"{index:02d}-{safe}"


def make_one(run: Any, index: int) -> TrainedSpecialist:
    """Train (resumably) or load specialist ``index`` of ``run``; independent of the others, so jobs can fan out.

    Args:
        run: the run.
        index: the group's position in ``clusters.json``.

    Returns:
        The specialist.
    """
    spec, ds = run.clusters(), run.dataset()
    if not 0 <= index < len(spec.groups):
        raise IndexError(
            f"specialist index {index} out of range: this run has {len(spec.groups)} groups (0..{len(spec.groups) - 1})"
        )
    key, folder = run.specialist_key(index), folder_of(run, index)
    if not run.is_done("specialists", key, folder):
        t0 = time.perf_counter()
        run.begin(folder, key)
        group, classes = list(spec.groups)[index], spec.indices()[index]
        gen = run.generalist()
        cfg = run_config(run)
        if run.scratch_reason():
            run.log(f"[specialists] {run.scratch_reason()} ({cfg.model}, width {cfg.width}, depth {cfg.depth})")
        training.seed_everything(cfg.train.seed + index)
        trained = train_specialist(
            ds,
            classes,
            config=cfg,
            generalist=gen.model,
            state_path=folder / "state.pt",
            desc=f"specialist {index} ({group})",
        )
        save_specialist(folder / "model.pt", trained, ds=ds, group=group)
        for split in ("val", "test"):
            logits = split_logits(run, trained.model, split).numpy()
            runs.save_array(folder / f"logits_{split}.npy", logits)
            runs.save_array(folder / f"probs_{split}.npy", apply_dustbin_shift(logits, trained.dustbin_shift))
        (folder / "state.pt").unlink(missing_ok=True)
        run.add_time("specialists", time.perf_counter() - t0)
        run.finish(folder, key, seconds=round(time.perf_counter() - t0, 2), group=group)
    return run.memo(
        f"specialist-{index}",
        lambda: load_specialist(
            folder_of(run, index) / "model.pt",
            ds=run.dataset(),
            trunk=shared_trunk_of(run),
            generalist=run.generalist().model if run.config.specialist_delta_rank else None,
        ),
    )


class _OwnStages(torch.nn.Module):
    """A shared-trunk specialist's own stages and head, as a module of the trunk's output (batched prediction)."""

    def __init__(self, model: models.SharedTrunkClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the trunk's output ``h``."""
        return self.model.forward_shared(h)


def split_logits(run: Any, model: torch.nn.Module, split: str) -> torch.Tensor:
    """A specialist's logits on ``split`` of ``run``'s dataset, as ``training.predict_logits(model, x)`` gives them.

    A shared-trunk specialist does not run the trunk again: the trunk's output on the split is computed once per run
    (the same batches of ``training.predict_logits``, so every number is the same) and each specialist runs only its
    own stages on it (issue 22).

    Args:
        run: the run.
        model: the specialist.
        split: ``"val"`` or ``"test"``.

    Returns:
        (N, |S|+1) float32 logits on the CPU.
    """
    x, _ = run.dataset().split(split)
    device = run.config.device
    if not isinstance(model, models.SharedTrunkClassifier):
        return training.predict_logits(model, x, device=device)
    trunk = model.shared_trunk
    h = run.memo(
        f"trunk-output-{split}-{trunk.owner_fingerprint}-{trunk.stages}",
        lambda: training.predict_logits(trunk, x, device=device),
    )
    return training.predict_logits(_OwnStages(model), h, device=device)


def shared_trunk_of(run: Any) -> models.Trunk | None:
    """The generalist's first ``specialist_shared_stages`` stages, one object every specialist of ``run`` runs on.

    Args:
        run: the run.

    Returns:
        The trunk, or ``None`` when the specialists share nothing.
    """
    s = run.config.specialist_shared_stages
    return run.memo("trunk", lambda: run.generalist().model.trunk(s)) if s else None


def make_all(run: Any) -> list[TrainedSpecialist]:
    """Stage 3: every specialist of ``run`` (finished ones are loaded, not retrained).

    Args:
        run: the run.

    Returns:
        The specialists, in the order of ``clusters.json``.
    """
    n = len(run.clusters().groups)
    out = [make_one(run, i) for i in range(n)]
    if not run.is_done("specialists"):
        run.finish(run.stage_dir("specialists"), run.key("specialists"), count=n)
    return out


def probs_of(run: Any, split: str) -> list[np.ndarray]:
    """Per specialist of ``run``, (N, |S_m| + 1) probabilities on ``split`` (val/test), dustbin last.

    Args:
        run: the run (its specialists are made first if missing).
        split: ``"val"`` or ``"test"``.

    Returns:
        One array per specialist.
    """
    make_all(run)
    return [runs.load_array(folder_of(run, i) / f"probs_{split}.npy") for i in range(len(run.clusters().groups))]
