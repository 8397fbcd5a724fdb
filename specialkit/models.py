"""Model registry: classifiers for small images that run on a CPU and scale on a GPU.

Every model is a :class:`Classifier`: ``features(x) -> (N, D)`` then ``head: nn.Linear(D, K)``,
so ``forward(x) == head(features(x))``. Inputs are float images in [0, 1] of shape
``(N, C, H, W)``; each model normalises them itself with fixed mean/std buffers, so a saved
state dict is self-contained.

Registry names:

* ``cnn`` -- a small CNN family: ``depth`` stages of ``blocks_per_stage`` conv3x3-BN-ReLU blocks,
  ``width * 2**stage`` channels, 2x2 max-pool between stages, global average pool, linear head.
  ``width=32, depth=3`` (the default) has ~0.29 M parameters; ``width=16`` or ``depth=2`` give a
  smaller specialist.
* ``resnet18`` -- torchvision's ResNet-18 adapted to 32 px: a 3x3 stride-1 stem, no max-pool, any
  number of input channels (``width``/``depth``/``blocks_per_stage`` are not used).
* ``torchvision:<arch>`` -- any torchvision classifier unchanged (``torchvision.models.get_model(arch,
  weights=None)``), for a generalist brought from elsewhere (:class:`TorchvisionClassifier`).

>>> from specialkit import models
>>> m = models.build_model(models.ModelConfig(num_classes=62, in_channels=1))
>>> m(torch.rand(2, 1, 32, 32)).shape
torch.Size([2, 62])
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import SpecialkitError

__all__ = [
    "ModelConfig",
    "ModelError",
    "Classifier",
    "SmallCNN",
    "ResNet18",
    "build_model",
    "build_model_by_name",
    "available_models",
    "register_model",
    "count_parameters",
    "count_flops",
    "replace_head",
    "DustbinHead",
    "LowRankDelta",
    "low_rank_delta",
    "attach_deltas",
    "merge_deltas",
    "Trunk",
    "SharedTrunkClassifier",
    "share_trunk",
    "fingerprint",
    "TorchvisionClassifier",
    "TORCHVISION_PREFIX",
    "CifarResNetNet",
    "CIFAR_RESNET_PREFIX",
    "cifar_resnet_depth",
    "cifar_resnet_state",
]

TORCHVISION_PREFIX = "torchvision:"


class ModelError(SpecialkitError, ValueError):
    """A model could not be built or changed; the message names the problem and the fix."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model (saved inside every checkpoint).

    Attributes:
        name: registry name, one of :func:`available_models` (``"cnn"``, ``"resnet18"``).
        num_classes: K, the number of outputs of the head.
        in_channels: image channels C (1 for glyphs/MNIST, 3 for CIFAR).
        image_size: image side in pixels (32 for the CPU settings).
        width: ``cnn`` channels of the first stage (doubled at every later stage).
        depth: ``cnn`` number of stages (a 2x2 max-pool between consecutive stages).
        blocks_per_stage: ``cnn`` conv-BN-ReLU blocks in every stage.
        dropout: dropout probability applied to the features before the head (0 = off).
        mean: per-channel mean used to normalise [0, 1] input (length 1 or C); ``None`` = 0.5.
        std: per-channel standard deviation (length 1 or C); ``None`` = 0.5.
        dustbin_of: ``None`` for a plain linear head; for a specialist initialised from a generalist,
            the number C of the generalist's classes: the head is then a :class:`DustbinHead` that keeps
            all C rows and outputs the special logits plus the log-sum-exp of the others.
        special_classes: with ``dustbin_of``, the (S,) special class indices (``num_classes`` = S + 1).
        shared_stages: 0 for a whole model; s > 0 for a specialist that runs the first s stages of its
            generalist's body (the shared trunk, not part of this model: see :class:`SharedTrunkClassifier`).
        input_size: ``torchvision:<arch>`` models only: resize the (float) input to this side before the
            network (e.g. 224 for ImageNet-pretrained weights); ``None`` = keep the images' size.
        delta_rank: with ``shared_stages``, r > 0 when the specialist's own convolutions are stored as rank-r
            deltas on its generalist's (:class:`LowRankDelta`); such a model runs only after
            :func:`attach_deltas` gives it that generalist. 0 = dense layers.
    """

    name: str = "cnn"
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    width: int = 32
    depth: int = 3
    blocks_per_stage: int = 2
    dropout: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dustbin_of: int | None = None
    special_classes: tuple[int, ...] | None = None
    shared_stages: int = 0
    input_size: int | None = None
    delta_rank: int = 0

    def __post_init__(self) -> None:
        if self.special_classes is not None:
            object.__setattr__(self, "special_classes", tuple(int(c) for c in self.special_classes))
        if (self.dustbin_of is None) != (self.special_classes is None):
            raise ModelError(
                "ModelConfig.dustbin_of and special_classes go together: set both (a specialist's head) or neither"
            )
        if self.dustbin_of is not None:
            sc = self.special_classes
            if len(set(sc)) != len(sc) or min(sc) < 0 or max(sc) >= self.dustbin_of or len(sc) >= self.dustbin_of:
                raise ModelError(
                    f"ModelConfig.special_classes={sc} must be distinct indices in [0, {self.dustbin_of}) leaving other classes"
                )
            if self.num_classes != len(sc) + 1:
                raise ModelError(
                    f"ModelConfig.num_classes={self.num_classes} must be len(special_classes) + 1 = {len(sc) + 1}"
                )
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None:
                value = tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=float)))
                object.__setattr__(self, key, value)
                if len(value) not in (1, self.in_channels):
                    raise ModelError(
                        f"ModelConfig.{key} has {len(value)} values but in_channels={self.in_channels}: "
                        f"pass one value or one per channel"
                    )
        if self.std is not None and min(self.std) <= 0:
            raise ModelError(f"ModelConfig.std must be positive, got {self.std}")
        for key in ("num_classes", "in_channels", "image_size", "width", "depth", "blocks_per_stage"):
            value = getattr(self, key)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ModelError(f"ModelConfig.{key} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        if (
            not isinstance(self.shared_stages, (int, np.integer))
            or isinstance(self.shared_stages, bool)
            or self.shared_stages < 0
        ):
            raise ModelError(f"ModelConfig.shared_stages must be a whole number >= 0, got {self.shared_stages!r}")
        if (
            not isinstance(self.delta_rank, (int, np.integer))
            or isinstance(self.delta_rank, bool)
            or self.delta_rank < 0
            or (self.delta_rank and not self.shared_stages)
        ):
            raise ModelError(
                f"ModelConfig.delta_rank must be a whole number >= 0, and > 0 only with shared_stages > 0, "
                f"got {self.delta_rank!r}"
            )
        if self.input_size is not None and (not isinstance(self.input_size, (int, np.integer)) or self.input_size < 1):
            raise ModelError(f"ModelConfig.input_size must be a positive integer or None, got {self.input_size!r}")

    @classmethod
    def for_dataset(cls, dataset: Any, **kwargs: Any) -> ModelConfig:
        """A config whose classes, channels and image size match ``dataset`` (a ``data.Dataset``)."""
        return cls(
            num_classes=dataset.num_classes,
            in_channels=dataset.channels,
            image_size=dataset.image_size,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        out = asdict(self)
        for key in ("mean", "std", "special_classes"):
            if out[key] is not None:
                out[key] = list(out[key])
        for key in ("shared_stages", "delta_rank"):
            if not out[key]:
                del out[key]  # models without them keep the config files they always had
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelError(
                f"unknown ModelConfig keys {sorted(unknown)}: the config was written by a newer specialkit; "
                f"upgrade specialkit or remove those keys"
            )
        kw = dict(d)
        for key in ("mean", "std", "special_classes"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)


class Classifier(nn.Module):
    """Base class: ``forward(x) = head(features(x))``; input float (N, C, H, W) in [0, 1].

    Subclasses set ``self.body`` (mapping normalised images to (N, D) features) and ``self.head``.

    Attributes:
        config: the :class:`ModelConfig` the model was built from (updated by :func:`replace_head`).
        head: ``nn.Linear(D, K)``.
    """

    head: nn.Linear

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        mean = torch.tensor(config.mean if config.mean is not None else (0.5,), dtype=torch.float32)
        std = torch.tensor(config.std if config.std is not None else (0.5,), dtype=torch.float32)
        mean = mean.expand(config.in_channels).reshape(1, -1, 1, 1).clone()
        std = std.expand(config.in_channels).reshape(1, -1, 1, 1).clone()
        self.register_buffer("input_scale", 1.0 / std)
        self.register_buffer("input_shift", -mean / std)
        self.body: nn.Module = nn.Identity()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def feature_dim(self) -> int:
        """D, the length of a feature vector."""
        return self.head.in_features

    @property
    def num_outputs(self) -> int:
        """K, the number of logits."""
        return self.head.out_features

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> (x - mean) / std."""
        return torch.addcmul(self.input_shift.to(x.dtype), x, self.input_scale.to(x.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> (N, D) features (dropout applied in training mode)."""
        return self.dropout(self.body(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> (N, K) logits."""
        return self.head(self.features(x))

    def stage_ends(self) -> list[int]:
        """Index into ``body`` just after each stage (one entry per stage), for :meth:`trunk`."""
        raise ModelError(
            f"{type(self).__name__} does not define its stages: give it a stage_ends() method to share its trunk"
        )

    @property
    def num_stages(self) -> int:
        """Number of stages a trunk can share (``cnn``: depth; ``resnet18``: 4)."""
        return len(self.stage_ends())

    def _split(self, stages: int) -> int:
        n = self.num_stages
        if not isinstance(stages, int) or isinstance(stages, bool) or not 1 <= stages <= n:
            raise ModelError(
                f"shared stages={stages!r}: this {self.config.name} has {n} stages, so share 1..{n} of them (0 = no sharing)"
            )
        return self.stage_ends()[stages - 1]

    def trunk(self, stages: int) -> Trunk:
        """The first ``stages`` stages as a :class:`Trunk` that shares this model's modules (no copy)."""
        return Trunk(self, stages)

    def forward_from(self, h: torch.Tensor, stages: int) -> torch.Tensor:
        """Logits from the output ``h`` of ``self.trunk(stages)``: the later stages, then the head."""
        for layer in itertools.islice(self.body, self._split(stages), None):  # no new Sequential per call
            h = layer(h)
        return self.head(self.dropout(h))


class Trunk(nn.Module):
    """The first ``stages`` stages of a classifier (input normalisation included), sharing its modules.

    Always in eval mode and run without gradients: a shared trunk is frozen (BN uses its running statistics).

    Attributes:
        stages: s.  layers: ``body[:end]`` of the owner (the same module objects).
        owner_fingerprint: :func:`fingerprint` of the owner when the trunk was cut.
    """

    def __init__(self, owner: Classifier, stages: int) -> None:
        super().__init__()
        end = owner._split(stages)
        self.stages = stages
        self.register_buffer("input_scale", owner.input_scale.detach().clone())
        self.register_buffer("input_shift", owner.input_shift.detach().clone())
        self.layers = nn.Sequential(*list(owner.body)[:end])
        self.owner_fingerprint = fingerprint(owner)
        super().train(False)
        self._modules_of_layers = tuple(self.layers.modules())  # checked every call: walked once here

    def train(self, mode: bool = True) -> Trunk:
        """Stay in evaluation mode whatever ``mode`` says: a frozen trunk never updates its batch-norm statistics."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> (N, D_s, H_s, W_s) shared features."""
        if any(m.training for m in self._modules_of_layers):
            self.layers.eval()  # the owner was put back in training mode; the shared trunk stays frozen
        with torch.no_grad():
            return self.layers(torch.addcmul(self.input_shift.to(x.dtype), x, self.input_scale.to(x.dtype)))


def fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of a model's state dict: names, shapes and values of every tensor."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class SharedTrunkClassifier(Classifier):
    """A specialist that owns only the stages after a shared trunk, plus its head.

    ``forward(x) = head(stages_after_s(trunk(x)))``, where the trunk (the generalist's first s stages,
    :class:`Trunk`) is attached with :meth:`attach` and is **not** a submodule: it is not in
    ``state_dict()``, ``parameters()`` (so training never moves it) or the parameter count.

    Attributes:
        shared_stages: s.  body: the owned stages (``generalist.body[end_s:]``, pooling included).
        trunk_fingerprint: :func:`fingerprint` of the generalist whose trunk this specialist was trained on.
    """

    def __init__(self, config: ModelConfig, whole: Classifier | None = None) -> None:
        super().__init__(config)
        if whole is None:
            whole = build_model(replace(config, shared_stages=0))
        self.shared_stages = config.shared_stages
        end = whole._split(config.shared_stages)
        self.body = nn.Sequential(*list(whole.body)[end:])
        self.head = whole.head
        self.dropout = whole.dropout
        self._trunk: list[Trunk] = []
        self.trunk_fingerprint: str | None = None

    @property
    def shared_trunk(self) -> Trunk:
        """The attached :class:`Trunk` (a clear error when none is attached)."""
        if not self._trunk:
            raise ModelError(
                "this shared-trunk specialist has no trunk attached: load it with "
                "specialists.load_specialist(path, ds=..., generalist=<its generalist>)"
            )
        return self._trunk[0]

    def attach(self, trunk: Trunk) -> SharedTrunkClassifier:
        """Run on ``trunk`` (its fingerprint must match the one recorded at training, if any); returns self."""
        if trunk.stages != self.shared_stages:
            raise ModelError(
                f"the trunk has {trunk.stages} stages but this specialist shares {self.shared_stages}: "
                f"cut it with generalist.trunk({self.shared_stages})"
            )
        if self.trunk_fingerprint is not None and trunk.owner_fingerprint != self.trunk_fingerprint:
            raise ModelError(
                f"this specialist was trained on the trunk of generalist {self.trunk_fingerprint}, not of "
                f"generalist {trunk.owner_fingerprint}: use the generalist it was trained with, or retrain it"
            )
        self._trunk[:] = [trunk]
        self.trunk_fingerprint = trunk.owner_fingerprint
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The specialist's features (the shared trunk, then its own body) before the head."""
        return self.dropout(self.body(self.shared_trunk(x)))

    def forward_shared(self, h: torch.Tensor) -> torch.Tensor:
        """(N, D_s, H_s, W_s) trunk output -> (N, K) logits: only this specialist's own stages and head."""
        return self.head(self.dropout(self.body(h)))

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> SharedTrunkClassifier:
        super()._apply(fn, *args, **kwargs)
        if self._trunk:
            self._trunk[0]._apply(fn, *args, **kwargs)  # moved with the specialist (it is shared with the generalist)
        return self


def share_trunk(model: Classifier, trunk: Trunk) -> SharedTrunkClassifier:
    """``model`` (a whole classifier with the generalist's architecture, e.g. a specialist initialised from
    it) cut after ``trunk.stages`` stages: a :class:`SharedTrunkClassifier` that reuses ``model``'s later
    stages and head (no copy) and runs on ``trunk``."""
    config = replace(model.config, shared_stages=trunk.stages)
    out = SharedTrunkClassifier(config, whole=model)
    out.input_scale.copy_(model.input_scale)
    out.input_shift.copy_(model.input_shift)
    return out.attach(trunk)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DustbinHead(nn.Module):
    """A specialist head that keeps the generalist's full linear layer (C rows) and outputs S + 1 logits:
    the special classes' logits, then the log-sum-exp of every other class's logit (the dustbin).

    At initialisation (the generalist's weights) the specialist's softmax is exactly the generalist's
    softmax collapsed onto its cells: special-class probabilities equal, dustbin probability equal to
    the generalist's total mass outside the group. Training moves all C rows.

    Attributes:
        linear: ``nn.Linear(D, C)``.
        in_features: D.  out_features: S + 1.
    """

    def __init__(self, in_features: int, num_full: int, special_classes: Sequence[int]) -> None:
        super().__init__()
        special = torch.as_tensor(list(special_classes), dtype=torch.long)
        others = torch.as_tensor([c for c in range(num_full) if c not in set(special.tolist())], dtype=torch.long)
        self.linear = nn.Linear(in_features, num_full)
        self.register_buffer("special", special, persistent=False)
        self.register_buffer("others", others, persistent=False)
        self.in_features, self.out_features = in_features, len(special) + 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the group's classes plus one dustbin logit (the logsumexp of the other classes' logits)."""
        z = self.linear(h)
        return torch.cat(
            [z.index_select(1, self.special), torch.logsumexp(z.index_select(1, self.others), 1, keepdim=True)], 1
        )


class LowRankDelta(nn.Module):
    """A convolution or linear layer stored as the generalist's layer plus a rank-r delta (LoRA-style).

    ``weight = base.weight + (up @ down).view_as(base.weight)`` with ``down: (r, fan_in)`` and ``up: (out, r)``;
    ``up`` starts at zero, so the layer starts as exactly the generalist's. The base layer is **not** a submodule:
    it is the generalist's own (held by reference, read detached, so training never moves it), out of
    ``parameters()``, ``state_dict()`` and the parameter count. A bias, when the base has one, is the layer's own
    (trained, starting at the base's).

    Args:
        base: the generalist's ``nn.Conv2d`` (groups 1) or ``nn.Linear``.
        rank: r >= 1.
    """

    def __init__(self, base: nn.Conv2d | nn.Linear, rank: int) -> None:
        super().__init__()
        if not isinstance(base, (nn.Conv2d, nn.Linear)) or getattr(base, "groups", 1) != 1:
            raise ModelError(f"a low-rank delta wraps an nn.Conv2d (groups 1) or nn.Linear, got {base!r}")
        out, fan_in = base.weight.shape[0], base.weight[0].numel()
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(out, fan_in):
            raise ModelError(f"rank={rank!r}: use a whole number in [1, {min(out, fan_in)}] for this layer")
        self._base = [base]
        w = base.weight
        self.down = nn.Parameter(torch.randn(rank, fan_in, device=w.device, dtype=w.dtype) / fan_in**0.5)
        self.up = nn.Parameter(torch.zeros(out, rank, device=w.device, dtype=w.dtype))
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone())
        self.rank = rank
        self.base_attached = True

    @property
    def base(self) -> nn.Conv2d | nn.Linear:
        """The generalist's layer this delta is added to."""
        if not self.base_attached:
            raise ModelError(
                "this low-rank delta specialist has no generalist attached (a checkpoint stores only the deltas): "
                "load it with specialists.load_specialist(path, ds=..., generalist=<its generalist>) or call "
                "models.attach_deltas(model, generalist)"
            )
        return self._base[0]

    def set_base(self, base: nn.Conv2d | nn.Linear) -> None:
        """Add this delta to ``base`` from now on (same type and weight shape as the layer it was built on)."""
        old = self._base[0]
        if type(base) is not type(old) or base.weight.shape != old.weight.shape:
            raise ModelError(
                f"a delta built on {type(old).__name__}{tuple(old.weight.shape)} cannot sit on "
                f"{type(base).__name__}{tuple(base.weight.shape)}: attach the generalist it was trained on"
            )
        self._base[0] = base
        self.base_attached = True

    def weight(self) -> torch.Tensor:
        """The effective weight, base plus delta (the base detached, on the delta's device)."""
        w = self.base.weight.detach().to(self.up.device)
        return w + (self.up @ self.down).view_as(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with the effective weight (base plus the low-rank delta)."""
        b = self.base
        if isinstance(b, nn.Linear):
            return nn.functional.linear(x, self.weight(), self.bias)
        return nn.functional.conv2d(x, self.weight(), self.bias, b.stride, b.padding, b.dilation, b.groups)


def _delta_places(
    specialist: SharedTrunkClassifier, generalist: Classifier
) -> list[tuple[nn.Module, str, nn.Module, nn.Conv2d]]:
    """``(parent, attribute, the specialist's layer, the generalist's convolution)`` for every convolution (or delta
    on one) of ``specialist.body``, paired with the generalist's layer at the same place."""
    if not isinstance(specialist, SharedTrunkClassifier):
        raise ModelError("low-rank deltas need a shared-trunk specialist (models.share_trunk) of the generalist")
    own = list(specialist.body)
    theirs = list(generalist.body)[generalist._split(specialist.shared_stages) :]
    if len(own) != len(theirs):
        raise ModelError("the specialist's own stages do not match the generalist's later stages: same architecture?")
    places = []
    for mine, gen in zip(own, theirs):
        if isinstance(mine, (nn.Conv2d, LowRankDelta)):
            raise ModelError("a bare convolution as a stage of body is not supported: wrap it in nn.Sequential")
        for name, layer in mine.named_modules():
            if name and isinstance(layer, (nn.Conv2d, LowRankDelta)):
                gconv = gen.get_submodule(name)
                if not isinstance(gconv, nn.Conv2d) or gconv.weight.shape != (
                    layer.weight.shape if isinstance(layer, nn.Conv2d) else layer._base[0].weight.shape
                ):
                    raise ModelError(f"layer {name!r}: shapes differ from the generalist's; same architecture?")
                parent, _, leaf = name.rpartition(".")
                places.append((mine.get_submodule(parent) if parent else mine, leaf, layer, gconv))
    return places


def low_rank_delta(specialist: SharedTrunkClassifier, generalist: Classifier, rank: int) -> SharedTrunkClassifier:
    """A shared-trunk specialist whose own stages store only low-rank deltas on the generalist's later stages
    (Super-Sub's ``0.2N + 1`` idea): every convolution of ``specialist.body`` becomes a :class:`LowRankDelta` on
    the generalist's convolution at the same place. Batch-norm layers and the head stay the specialist's own.
    Changed in place and returned (its ``config.delta_rank`` becomes ``rank``, so a checkpoint rebuilds the deltas).
    Freshly initialised from the generalist, it computes exactly what it did.

    Args:
        specialist: a :class:`SharedTrunkClassifier` cut from a specialist with the generalist's architecture.
        generalist: the generalist whose later stages the deltas are added to (kept unchanged).
        rank: r of every delta.

    Returns:
        ``specialist``.
    """
    places = _delta_places(specialist, generalist)
    if not places:
        raise ModelError(
            f"the specialist owns no convolution after the {specialist.shared_stages} shared stages, so there is "
            "nothing to store as a delta: share fewer stages, or use delta rank 0"
        )
    for parent, leaf, layer, gconv in places:
        if isinstance(layer, LowRankDelta):
            raise ModelError("this specialist holds low-rank deltas already")
        setattr(parent, leaf, LowRankDelta(gconv, rank))
    specialist.config = replace(specialist.config, delta_rank=rank)
    return specialist


def attach_deltas(specialist: SharedTrunkClassifier, generalist: Classifier) -> SharedTrunkClassifier:
    """Put every :class:`LowRankDelta` of ``specialist`` on the generalist's convolution at the same place (what a
    loader does after reading a checkpoint that stores only the deltas); returns ``specialist``.

    Args:
        specialist: a shared-trunk specialist with low-rank deltas (e.g. rebuilt by :func:`build_model`).
        generalist: the generalist it was trained on (checked by the caller: see ``specialists.load_specialist``).

    Returns:
        ``specialist``, ready to run.
    """
    places = _delta_places(specialist, generalist)
    if not any(isinstance(layer, LowRankDelta) for _, _, layer, _ in places):
        raise ModelError("this specialist holds no low-rank deltas: nothing to attach")
    for _, _, layer, gconv in places:
        if isinstance(layer, LowRankDelta):
            layer.set_base(gconv)
    return specialist


def merge_deltas(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with every :class:`LowRankDelta` replaced by a dense layer holding its
    effective weight (base + delta): the same outputs in one convolution, no product of the factors per call. What is
    stored stays the deltas; this is what a loader builds in memory. A shared trunk stays shared.

    Args:
        model: a model with low-rank deltas (e.g. from :func:`low_rank_delta`).

    Returns:
        The merged copy (``model`` is unchanged).
    """
    memo = {id(t): t for t in getattr(model, "_trunk", [])}
    memo.update({id(m.base): m.base for m in model.modules() if isinstance(m, LowRankDelta)})
    out = copy.deepcopy(model, memo)
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, LowRankDelta)]:
        b = layer.base
        if isinstance(b, nn.Linear):
            dense: nn.Module = nn.Linear(b.in_features, b.out_features, bias=layer.bias is not None)
        else:
            dense = nn.Conv2d(
                b.in_channels,
                b.out_channels,
                b.kernel_size,
                b.stride,
                b.padding,
                b.dilation,
                bias=layer.bias is not None,
            )
        dense = dense.to(device=b.weight.device, dtype=b.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(layer.weight())
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf, dense.train(layer.training))
    return out


class SmallCNN(Classifier):
    """``depth`` stages of ``blocks_per_stage`` conv3x3-BN-ReLU blocks; D = ``width * 2**(depth-1)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.image_size < 2 ** (config.depth - 1):
            raise ModelError(
                f"cnn depth={config.depth} halves the image {config.depth - 1} times, too often for "
                f"{config.image_size} px: use depth <= {int(np.log2(config.image_size)) + 1}"
            )
        layers: list[nn.Module] = []
        c_in = config.in_channels
        for stage in range(config.depth):
            c_out = config.width * 2**stage
            for _ in range(config.blocks_per_stage):
                layers.append(_conv_bn_relu(c_in, c_out))
                c_in = c_out
            if stage < config.depth - 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, config.num_classes)

    def stage_ends(self) -> list[int]:
        """Stage i ends after its blocks and the max-pool that follows it (none after the last)."""
        d, b = self.config.depth, self.config.blocks_per_stage
        return [(i + 1) * b + min(i + 1, d - 1) for i in range(d)]


class ResNet18(Classifier):
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (for 32 px); D = 512."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=config.num_classes)
        net.conv1 = nn.Conv2d(config.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.body = nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
            net.avgpool,
            nn.Flatten(),
        )
        self.head = net.fc

    def stage_ends(self) -> list[int]:
        """Stage 1 = stem + layer1, then layer2, layer3, layer4."""
        return [4, 5, 6, 7]


class _CifarBlock(nn.Module):
    """A basic block (two 3x3 conv + BN) with an option-A shortcut: stride-2 subsampling and zero
    channel padding when the shape changes (He et al. 2016, section 4.2)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
        if self.pad:
            short = nn.functional.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return torch.relu(out + short)


class CifarResNetNet(nn.Module):
    """The CIFAR ResNet-(6n+2) network: a 3x3 16-channel stem, 3 stages of n basic blocks with 16/32/64
    channels (stride 2 at the start of stages 2 and 3), global average pooling and a linear layer ``fc``.

    Args:
        depth: 20, 32, 44, 56, 110 (any 6n+2). num_classes: outputs. in_channels: image channels.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"cifar_resnet depth {depth} is not 6n+2 (20, 32, 44, 56, 110); choose one of those")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, c_in = (16, 32, 64), 16
        for i, c_out in enumerate(widths):
            blocks = [_CifarBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images."""
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


CIFAR_RESNET_PREFIX = "cifar_resnet"


def cifar_resnet_depth(arch: str) -> int | None:
    """The depth of an arch named ``cifar_resnet<depth>`` (e.g. ``cifar_resnet20``), else ``None``."""
    tail = arch[len(CIFAR_RESNET_PREFIX) :] if arch.startswith(CIFAR_RESNET_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def cifar_resnet_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CIFAR ResNet state dict as saved elsewhere, in :class:`CifarResNetNet`'s names: a final layer
    called ``linear`` becomes ``fc``; BatchNorm counters missing from old checkpoints are set to 0."""
    out = {("fc." + k[len("linear.") :] if k.startswith("linear.") else k): v for k, v in state.items()}
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def _final_linear(net: nn.Module, arch: str) -> tuple[nn.Module, str, str]:
    """(parent module, attribute name, state-dict prefix) of a torchvision classifier's last linear layer."""
    for path in ("fc", "classifier", "head", "heads.head"):
        parent, attr = net, path
        if "." in path:
            first, attr = path.split(".")
            parent = getattr(net, first, None)
        layer = getattr(parent, attr, None) if parent is not None else None
        if isinstance(layer, nn.Sequential) and len(layer) and isinstance(layer[-1], nn.Linear):
            return layer, str(len(layer) - 1), f"{path}.{len(layer) - 1}."
        if isinstance(layer, nn.Linear):
            return parent, attr, f"{path}."
    raise ModelError(
        f"torchvision model {arch!r} has no final linear layer at fc, classifier[-1], head or heads.head: "
        "bring it as TorchScript (generalist_from='torchscript:<file>') instead"
    )


class TorchvisionClassifier(Classifier):
    """A torchvision classifier as it comes (``get_model(arch, weights=None, num_classes=K)``), split into
    ``body`` (everything up to the last linear layer, which becomes the identity) and ``head`` (that layer:
    ``fc``, ``classifier[-1]``, ``head`` or ``heads.head``), so specialists get the usual head surgery.

    Input handling, in this order: images with one channel are repeated to the network's 3 (when
    ``in_channels`` is 3); the images are resized to ``input_size`` (bilinear, antialiased) when set;
    then ``(x - mean) / std`` with the config's ``mean``/``std`` (e.g. ImageNet's). A state dict of the
    plain torchvision model loads with :meth:`load_torchvision_state`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        import torchvision

        arch = config.name[len(TORCHVISION_PREFIX) :]
        depth = cifar_resnet_depth(arch)
        try:
            net = (
                CifarResNetNet(depth, config.num_classes, config.in_channels)
                if depth is not None
                else torchvision.models.get_model(arch, weights=None, num_classes=config.num_classes)
            )
        except ValueError as err:
            raise ModelError(
                f"torchvision has no model {arch!r} ({err}); use a name from torchvision.models.list_models()"
            ) from err
        parent, attr, self._head_prefix = _final_linear(net, arch)
        head = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        self.body, self.head = net, head

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Bring ``x`` to what the wrapped network expects: grey to RGB, resized to its input size, normalised."""
        if x.shape[1] == 1 and self.config.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        size = self.config.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return super().normalize(x)

    def load_torchvision_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load the state dict of the plain torchvision model (``torchvision.models.get_model(arch)``); strict:
        a missing or unexpected key, or a tensor of another shape, raises ``RuntimeError`` naming it."""
        if cifar_resnet_depth(self.config.name[len(TORCHVISION_PREFIX) :]) is not None:
            state = cifar_resnet_state(state)
        p = self._head_prefix
        head = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        body = {k: v for k, v in state.items() if not k.startswith(p)}
        self.head.load_state_dict(head)
        self.body.load_state_dict(body)


_REGISTRY: dict[str, Callable[[ModelConfig], Classifier]] = {"cnn": SmallCNN, "resnet18": ResNet18}


def register_model(name: str, builder: Callable[[ModelConfig], Classifier]) -> None:
    """Register ``builder(config) -> Classifier`` under ``name`` for :func:`build_model`."""
    _REGISTRY[name] = builder


def available_models() -> list[str]:
    """Names :func:`build_model` accepts."""
    return sorted(_REGISTRY)


def build_model(config: ModelConfig | dict[str, Any]) -> Classifier:
    """Build a freshly initialised model (uses the global torch RNG: call ``seed_everything`` first).

    Args:
        config: a :class:`ModelConfig` or its ``to_dict()``.
    """
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    builder = TorchvisionClassifier if config.name.startswith(TORCHVISION_PREFIX) else _REGISTRY.get(config.name)
    if builder is None:
        raise ModelError(
            f"unknown model {config.name!r}; choose one of {', '.join(available_models())} or torchvision:<arch>"
        )
    if config.shared_stages:
        dense = SharedTrunkClassifier(replace(config, delta_rank=0))
        if not config.delta_rank:
            return dense
        placeholder = builder(replace(config, shared_stages=0, delta_rank=0, dustbin_of=None, special_classes=None))
        model = low_rank_delta(dense, placeholder, config.delta_rank)
        for m in model.modules():
            if isinstance(m, LowRankDelta):
                m.base_attached = False  # the deltas' generalist is attached after loading (attach_deltas)
        return model
    model = builder(config)
    if not isinstance(model, Classifier):
        raise ModelError(f"model builder {config.name!r} returned {type(model).__name__}, not a Classifier")
    if config.dustbin_of is not None:
        model.head = DustbinHead(model.head.in_features, config.dustbin_of, config.special_classes)
    return model


def build_model_by_name(name: str, num_classes: int, **kwargs: Any) -> Classifier:
    """``build_model(ModelConfig(name=name, num_classes=num_classes, **kwargs))``."""
    return build_model(ModelConfig(name=name, num_classes=num_classes, **kwargs))


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> int:
    """Floating-point operations of one forward pass, per image (a multiply-add counts as 2).

    Counted with ``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products;
    normalisation, activations and pooling are not counted.

    Args:
        model: any module taking one (N, C, H, W) tensor.
        input_shape: (N, C, H, W); default ``(1, in_channels, image_size, image_size)`` from
            ``model.config``. The count is divided by N.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if input_shape is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ModelError("count_flops needs input_shape=(1, C, H, W) for a model without a .config")
        input_shape = (1, config.in_channels, config.image_size, config.image_size)
    if len(input_shape) != 4:
        raise ModelError(f"input_shape must be (N, C, H, W), got {tuple(input_shape)}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(input_shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // int(input_shape[0])


def replace_head(model: Classifier, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray) -> Classifier:
    """Give ``model`` a new head (in place) and return it; ``model.config.num_classes`` follows.

    Used for specialists: keep the generalist's features, cut the head down to the special classes
    plus a dustbin (``specialists`` builds ``weight`` and ``bias``).

    Args:
        model: a :class:`Classifier` with feature size D.
        weight: (K', D) new head weight.
        bias: (K',) new head bias.
    """
    weight = torch.as_tensor(weight)
    bias = torch.as_tensor(bias)
    d = model.head.in_features
    if weight.ndim != 2 or weight.shape[1] != d:
        raise ModelError(
            f"head weight must have shape (K', {d}) for this model's {d} features, got {tuple(weight.shape)}"
        )
    if bias.shape != (weight.shape[0],):
        raise ModelError(f"head bias must have shape ({weight.shape[0]},) to match the weight, got {tuple(bias.shape)}")
    old = model.head.weight
    head = nn.Linear(d, weight.shape[0], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    model.head = head
    model.config = replace(model.config, num_classes=int(weight.shape[0]))
    return model
