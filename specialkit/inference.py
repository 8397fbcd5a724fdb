"""An ensemble prepared once for routed inference (issue 22): the cheapest exact form of conditional execution.

:func:`specialkit.evaluation.routed_forward` runs the networks as they were trained. :class:`RoutedEnsemble` first
rewrites them into an equivalent form that does less work per call, then routes the same way:

* **batch norm folded, layers called directly** (:func:`prepared_layers`): every eval-mode batch norm that follows a
  convolution is folded into it, and the leaf layers are called one after another without ``nn.Sequential`` or
  module hooks. This speeds any network up, so it is done to the generalist too; :class:`PreparedClassifier` is the
  generalist alone prepared the same way, the fair baseline for the ensemble's cost;
* **low-rank delta specialists reuse the generalist's work**: a specialist whose first own layer is the generalist's
  convolution plus a rank-r delta (:func:`specialkit.models.low_rank_delta`) sees the same input as the generalist's
  layer, so its output is the generalist's (computed anyway; rescaled per channel by the two batch norms) plus the
  delta's two thin convolutions ``U(V(h))`` (a ``r``-channel k x k convolution, then a 1 x 1 one). Later layers are
  merged into dense ones (:func:`specialkit.models.merge_deltas`). Used from two rows up: for one image the merged
  dense layer is one operation instead of three;
* **the specialists of one image in one call** (:class:`FusedSpecialists`): for one image, the specialists its
  generalist's top class switches on (two or three where groups overlap) run as one network whose first convolution
  holds all of theirs side by side and whose later convolutions are grouped (``groups`` = their number);
* **a memory layout per part** (:func:`layout_steps`): ``"nchw"`` (PyTorch's default), ``"channels_last"`` or
  ``"blocked"`` (oneDNN's own blocked tensors, CPU only), chosen separately for the generalist's parts and for the
  specialists. Which is fastest depends on the machine and the batch size: on a 2-core CPU at batch 256 the
  generalist ran about 2.9x faster blocked than in NCHW, at batch 1 slower (``bench/inference_cost.py`` times them);
* **a dustbin head in two operations**: ``softmax([z_S, logsumexp(z_others) + c])`` equals the full softmax of the C
  logits (with ``c`` added to the other classes' biases) summed into the |S|+1 cells by a fixed 0/1 matrix, so the
  dustbin correction ``c`` is folded into the head's bias once.

The outputs equal :func:`~specialkit.evaluation.routed_forward`'s on the merged networks, with each specialist's
dustbin correction applied, to float rounding (tested). Nothing here trains or changes the models it is built from.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from . import models
from .errors import SpecialkitError
from .evaluation import group_membership, routed_activation, shared_trunk_of

__all__ = [
    "LAYOUTS",
    "InferenceError",
    "prepared_layers",
    "check_layout",
    "layout_steps",
    "to_layout",
    "to_strided",
    "PreparedClassifier",
    "FastSpecialist",
    "FusedSpecialists",
    "RoutedEnsemble",
]


class InferenceError(SpecialkitError, ValueError):
    """Models that cannot be prepared for routed inference (mixed or missing trunks, unsupported heads)."""


def _leaves(layers: Iterable[nn.Module]) -> list[nn.Module]:
    """The layers in order, nested ``nn.Sequential`` containers opened."""
    out: list[nn.Module] = []
    for layer in layers:
        out += _leaves(layer) if isinstance(layer, nn.Sequential) else [layer]
    return out


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor of an eval-mode batch norm: ``weight / sqrt(running_var + eps)``."""
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    return scale if bn.weight is None else scale * bn.weight.detach()


def _folds(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution computing ``bn(conv(x))`` with ``bn``'s running statistics (the originals unchanged)."""
    out = copy.deepcopy(conv).eval()
    with torch.no_grad():
        w, b = fuse_conv_bn_weights(
            conv.weight.detach(),
            None if conv.bias is None else conv.bias.detach(),
            bn.running_mean.detach(),
            bn.running_var.detach(),
            bn.eps,
            None if bn.weight is None else bn.weight.detach(),
            None if bn.bias is None else bn.bias.detach(),
        )
    out.weight, out.bias = nn.Parameter(w.detach(), requires_grad=False), nn.Parameter(b.detach(), requires_grad=False)
    return out


def prepared_layers(layers: Iterable[nn.Module]) -> list[nn.Module]:
    """The leaf layers of ``layers`` in order (nested ``nn.Sequential`` opened), every batch norm that directly
    follows a convolution folded into a new convolution with its running statistics.

    What the list computes, layer after layer, equals what ``layers`` computes in eval mode, to float rounding, in
    fewer operations. Layers that are not folded are the same objects; the given modules never change.

    Args:
        layers: modules applied in order (e.g. a model's ``body``).

    Returns:
        The prepared leaf layers.
    """
    out: list[nn.Module] = []
    for layer in _leaves(layers):
        if out and _folds(out[-1], layer):
            out[-1] = _fold(out[-1], layer)
        else:
            out.append(layer)
    return out


LAYOUTS = ("nchw", "channels_last", "blocked")
"""The memory layouts prepared networks can run in: PyTorch's default (N, C, H, W) strides, channels-last strides
(``torch.channels_last``), and oneDNN's blocked tensors (``Tensor.to_mkldnn``; CPU only)."""

_CHANNELWISE = (
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
)
"""Layers that act on every channel alike: one of them serves several specialists' channels side by side
(:class:`FusedSpecialists`)."""


def _runs_blocked(layer: nn.Module) -> bool:
    """Whether ``layer`` runs on oneDNN's blocked tensors as it is (checked on torch 2.14: adaptive max pooling
    and adaptive average pooling to anything but one cell do not)."""
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return layer.output_size in (1, (1, 1))
    return isinstance(layer, (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity))


def _known_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InferenceError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def check_layout(layout: str, device: torch.device | str) -> None:
    """Raise :class:`InferenceError` unless ``layout`` is one of :data:`LAYOUTS` and can run on ``device``."""
    _known_layout(layout)
    if layout == "blocked" and (torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available()):
        raise InferenceError(
            f"layout 'blocked' (oneDNN's tensors) runs on a CPU with oneDNN only, not on {torch.device(device)}: "
            "use 'channels_last' or 'nchw'"
        )


class _BlockedConv2d:
    """A convolution on oneDNN's blocked tensors (``torch.mkldnn_convolution``), its weights converted once."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise InferenceError(
                "layout 'blocked' needs convolutions with numeric zero padding; use 'channels_last' or 'nchw'"
            )
        if conv.weight.dtype != torch.float32:
            raise InferenceError(
                f"layout 'blocked' runs float32 networks only, not {conv.weight.dtype}: use 'channels_last' or 'nchw'"
            )
        weight = conv.weight.detach().float()
        bias = torch.zeros(conv.out_channels) if conv.bias is None else conv.bias.detach().float()
        self.weight, self.bias = weight.to_mkldnn(), bias.to_mkldnn()
        self.args = (conv.padding, conv.stride, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.weight, self.bias, *self.args)


def _in_layout(layer: nn.Module, layout: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if layout == "nchw":
        return layer.forward
    if layout == "channels_last":
        has_4d = any(p.dim() == 4 for p in layer.parameters())
        return (copy.deepcopy(layer).to(memory_format=torch.channels_last) if has_4d else layer).forward
    if type(layer) is nn.Conv2d:
        return _BlockedConv2d(layer).forward
    if _runs_blocked(layer):
        return layer.forward
    raise InferenceError(
        f"a {type(layer).__name__} layer cannot run in layout 'blocked': use 'channels_last' or 'nchw'"
    )


def layout_steps(layers: Iterable[nn.Module], layout: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """The forward calls of ``layers`` (e.g. :func:`prepared_layers`' output) for tensors in ``layout``.

    ``"nchw"`` gives the layers' own ``forward``; ``"channels_last"`` copies of the layers with 4-d weights in
    channels-last strides; ``"blocked"`` convolutions on oneDNN's blocked tensors (weights converted once), for
    float32 convolutions, ReLU, max and average pooling, global average pooling, flatten and identity only. Feed the
    first call :func:`to_layout`'s output; the results equal the layers' own to float rounding (:func:`to_strided`
    turns a blocked one back). The layers never change.

    Args:
        layers: modules applied in order.
        layout: one of :data:`LAYOUTS`.

    Returns:
        One callable per layer.

    Raises:
        InferenceError: an unknown layout, or a layer the blocked layout cannot run.
    """
    _known_layout(layout)
    return tuple(_in_layout(layer, layout) for layer in layers)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (N, C, H, W), in any layout, in ``layout`` (a no-op where it already is; a tensor of another shape is
    only made strided for ``"nchw"`` and ``"channels_last"``). A convolution follows its input's strides, so an
    ``"nchw"`` network fed channels-last rows would run channels-last: they are copied into NCHW order."""
    if layout == "blocked":
        return x if x.is_mkldnn else x.to_mkldnn()
    x = to_strided(x)
    if x.dim() != 4:
        return x
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def to_strided(x: torch.Tensor) -> torch.Tensor:
    """An ordinary strided tensor from any layout (a blocked tensor converted back; others as they are)."""
    return x.to_dense() if x.is_mkldnn else x


def _run(steps: Sequence[Callable[[torch.Tensor], torch.Tensor]], h: torch.Tensor) -> torch.Tensor:
    for step in steps:
        h = step(h)
    return h


class PreparedClassifier:
    """A classifier prepared for inference as :class:`RoutedEnsemble` prepares its generalist (:func:`prepared_layers`:
    batch norm folded, leaf layers called directly; in ``layout``): ``PreparedClassifier(model)(x)`` equals
    ``model.eval()(x)`` to float rounding. Benchmarks time the ensemble against this, so a speed-up any network gets
    is not counted as the ensemble's.

    Args:
        model: a :class:`~specialkit.models.Classifier` (unchanged).
        layout: the memory layout the body runs in (:data:`LAYOUTS`; ``"blocked"`` on a CPU only).
    """

    def __init__(self, model: models.Classifier, *, layout: str = "nchw") -> None:
        check_layout(layout, model.input_scale.device)
        self.layout = layout
        self.input_scale = model.input_scale.detach().clone()
        self.input_shift = model.input_shift.detach().clone()
        self.layers = prepared_layers(model.body)
        self.head = model.head
        self._steps = layout_steps(self.layers, layout)  # no module hooks per call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float in [0, 1] -> (N, K) logits, without gradients."""
        with torch.no_grad():
            x = torch.addcmul(self.input_shift.to(x.dtype), x, self.input_scale.to(x.dtype))
            return self.head.forward(to_strided(_run(self._steps, to_layout(x, self.layout))))


def _first_conv(stage: nn.Module) -> nn.Module | None:
    """The first layer of a ``conv-BN-ReLU`` stage (an ``nn.Sequential``), or None for any other stage."""
    return stage[0] if isinstance(stage, nn.Sequential) and len(stage) else None


def _head_and_collapse(head: nn.Module, shift: float) -> tuple[nn.Linear, torch.Tensor]:
    """A plain linear layer whose softmax, times the returned (K, |S|+1) 0/1 matrix, gives the head's corrected
    probabilities ``softmax(logits + shift * e_dustbin)``."""
    if isinstance(head, models.DustbinHead):
        linear = head.linear
        special = head.special
        k = linear.out_features
        collapse = torch.zeros(k, len(special) + 1)
        collapse[special, torch.arange(len(special))] = 1.0
        others = torch.ones(k, dtype=torch.bool)
        others[special] = False
        collapse[others, -1] = 1.0
    elif isinstance(head, nn.Linear):
        linear, k = head, head.out_features
        collapse = torch.eye(k)
        others = torch.zeros(k, dtype=torch.bool)
        others[-1] = True  # the dustbin is the last output
    else:
        raise InferenceError(f"a specialist head must be a DustbinHead or nn.Linear, got {type(head).__name__}")
    out = nn.Linear(linear.in_features, k, device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight)
        out.bias.copy_(linear.bias if linear.bias is not None else torch.zeros(k))
        out.bias[others.to(out.bias.device)] += float(shift)
    return out.eval(), collapse.to(linear.weight.device, linear.weight.dtype)


class FastSpecialist(nn.Module):
    """One shared-trunk specialist rewritten for routed inference (see the module's text).

    Args:
        specialist: a :class:`~specialkit.models.SharedTrunkClassifier` (dense or with low-rank deltas).
        generalist_block: the generalist's first stage block after the trunk (an ``nn.Sequential`` starting
            ``Conv2d, BatchNorm2d``; its convolution's output is reused when the specialist's first layer is a
            low-rank delta on exactly that convolution), or None.
        dustbin_shift: the number added to the dustbin logit (``TrainedSpecialist.dustbin_shift``).
        layout: the memory layout its layers run in (:data:`LAYOUTS`); its input may come in any layout.

    Attributes:
        reuses: whether :meth:`forward` can take the generalist's (folded) first later convolution's output (never
            in the blocked layout).
        layers: the own layers, deltas merged and batch norm folded (:func:`prepared_layers`).
    """

    def __init__(
        self,
        specialist: models.SharedTrunkClassifier,
        generalist_block: nn.Module | None,
        *,
        dustbin_shift: float,
        layout: str = "nchw",
    ) -> None:
        super().__init__()
        merged = models.merge_deltas(specialist).eval()
        check_layout(layout, next(merged.parameters()).device)
        self.layout = layout
        self.layers = nn.ModuleList(prepared_layers(merged.body))
        self.head, collapse = _head_and_collapse(merged.head, dustbin_shift)
        self.register_buffer("collapse", collapse.float())
        self._dense = layout_steps(self.layers, layout)  # walked once per call: no module hooks
        self.reuses = layout != "blocked" and self._prepare_reuse(specialist, generalist_block)
        self._after_first = self._dense[1:]
        if self.reuses:
            self._delta = layout_steps([self.down, self.up], layout)
        self.eval()

    def _prepare_reuse(self, specialist: models.SharedTrunkClassifier, block: nn.Module | None) -> bool:
        """Build ``down``, ``up`` and ``scale`` so that ``addcmul(up(down(h)), f, scale)`` equals the specialist's
        folded first convolution, ``f`` being the generalist's folded one: with ``a`` the batch norms' factors and
        ``B`` the folded biases, ``a_s (W + U V) h + B_s = (a_s / a_g) f + (a_s U)(V h) + B_s - (a_s / a_g) B_g``."""
        own = specialist.body[0] if len(specialist.body) else None
        first = _first_conv(own) if own is not None else None
        gconv = _first_conv(block) if block is not None else None
        if not (
            isinstance(first, models.LowRankDelta)
            and first.base_attached
            and first.base is gconv
            and isinstance(gconv, nn.Conv2d)
            and len(own) > 1
            and len(block) > 1
            and _folds(gconv, block[1])
            and isinstance(own[1], nn.BatchNorm2d)
            and own[1].running_mean is not None
            and isinstance(self.layers[0], nn.Conv2d)
        ):
            return False
        a_g, a_s = _bn_scale(block[1]), _bn_scale(own[1])
        if bool((a_g.abs() < 1e-12).any()):
            return False  # a channel the generalist's batch norm zeroes cannot be recovered from its output
        ratio = a_s / a_g
        folded_g = _fold(gconv, block[1])
        rank = first.rank
        self.down = nn.Conv2d(
            gconv.in_channels, rank, gconv.kernel_size, gconv.stride, gconv.padding, gconv.dilation, bias=False
        )
        self.up = nn.Conv2d(rank, gconv.out_channels, 1)
        with torch.no_grad():
            self.down.weight.copy_(first.down.detach().view(rank, gconv.in_channels, *gconv.kernel_size))
            self.up.weight.copy_((a_s[:, None] * first.up.detach()).view(gconv.out_channels, rank, 1, 1))
            self.up.bias.copy_(self.layers[0].bias.detach() - ratio * folded_g.bias.detach())
        self.register_buffer("scale", ratio.view(1, -1, 1, 1).clone())
        self.down.to(gconv.weight.device).eval()
        self.up.to(gconv.weight.device).eval()
        return True

    def forward(self, h: torch.Tensor, first_out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, |S|+1) corrected probabilities from the trunk's output ``h`` (and, when :attr:`reuses` and given, the
        generalist's folded first later convolution's output ``first_out`` on the same rows)."""
        h = to_layout(h, self.layout)
        if first_out is not None and self.reuses:
            h = _run(self._after_first, torch.addcmul(_run(self._delta, h), first_out, self.scale))
        else:
            h = _run(self._dense, h)
        return _probs(self.head.forward(to_strided(h)), self.collapse)


def _probs(z: torch.Tensor, collapse: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z if z.dtype == torch.float32 else z.float(), dim=1) @ collapse


class FusedSpecialists(nn.Module):
    """Several prepared specialists that see the same rows, run as one network (issue 22's fused specialists).

    Their first convolutions (over the shared trunk's output) become one convolution with all their output channels
    side by side; every later convolution becomes a grouped one (``groups`` = the number of specialists), each group
    holding one specialist's weights; channel-wise layers (ReLU, pooling, flatten) serve all at once; the heads become
    one block-diagonal linear layer (shorter heads padded with rows of logit -inf, which the softmax gives 0). The
    outputs equal each specialist's own to float rounding; the call count is one network's instead of several.

    Args:
        specialists: two or more :class:`FastSpecialist` of the same architecture.

    Raises:
        InferenceError: a layer that cannot be fused (anything but convolutions without groups, each batch norm
            folded into one, and the channel-wise layers), or specialists of different shapes.
    """

    def __init__(self, specialists: Sequence[FastSpecialist]) -> None:
        super().__init__()
        n = len(specialists)
        if n < 2:
            raise InferenceError(f"fusing needs two or more specialists, got {n}")
        layers: list[nn.Module] = []
        seen_conv = False
        for same in zip(*(s.layers for s in specialists), strict=True):
            layers.append(_fused_layer(same, grouped=seen_conv))
            seen_conv = seen_conv or isinstance(same[0], nn.Conv2d)
        self.layers = nn.ModuleList(layers)
        heads = [s.head for s in specialists]
        d, k = heads[0].in_features, max(h.out_features for h in heads)
        if any(h.in_features != d for h in heads):
            raise InferenceError("the specialists' heads read features of different lengths: same architecture?")
        sizes = [int(s.collapse.shape[1]) for s in specialists]
        ref = heads[0].weight
        weight = torch.zeros(n * k, n * d, dtype=ref.dtype, device=ref.device)
        bias = torch.full((n * k,), float("-inf"), dtype=ref.dtype, device=ref.device)
        collapse = torch.zeros(n * k, sum(sizes), device=ref.device)
        col = 0
        for m, (head, s) in enumerate(zip(heads, specialists)):
            rows = slice(m * k, m * k + head.out_features)
            weight[rows, m * d : (m + 1) * d] = head.weight.detach()
            bias[rows] = head.bias.detach()
            collapse[rows, col : col + sizes[m]] = s.collapse
            col += sizes[m]
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("collapse", collapse)
        self.count, self.rows_per_head, self.sizes = n, k, sizes
        self._steps = tuple(layer.forward for layer in self.layers)
        self.eval()

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each specialist's (N, |S|+1) corrected probabilities from the trunk's output ``h``, in the given order."""
        z = nn.functional.linear(_run(self._steps, h), self.weight, self.bias)
        z = z if z.dtype == torch.float32 else z.float()
        p = torch.softmax(z.view(len(z), self.count, self.rows_per_head), dim=2).view(len(z), -1)
        return list((p @ self.collapse).split(self.sizes, dim=1))


def _bias_of(conv: nn.Conv2d) -> torch.Tensor:
    return torch.zeros(conv.out_channels, device=conv.weight.device) if conv.bias is None else conv.bias.detach()


def _fused_layer(same: Sequence[nn.Module], *, grouped: bool) -> nn.Module:
    """One layer doing the work of ``same`` (one layer per specialist, at the same place) side by side."""
    ref, n = same[0], len(same)
    if any(type(layer) is not type(ref) for layer in same):
        raise InferenceError("the specialists' layers differ in type: fuse specialists of one architecture only")
    if type(ref) is nn.Conv2d:
        if ref.groups != 1 or any(layer.weight.shape != ref.weight.shape for layer in same):
            raise InferenceError("only convolutions without groups, of one shape, can be fused")
        conv = nn.Conv2d(
            ref.in_channels * (n if grouped else 1),
            ref.out_channels * n,
            ref.kernel_size,
            ref.stride,
            ref.padding,
            ref.dilation,
            groups=n if grouped else 1,
            padding_mode=ref.padding_mode,
            device=ref.weight.device,
            dtype=ref.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.cat([layer.weight.detach() for layer in same]))
            conv.bias.copy_(torch.cat([_bias_of(layer) for layer in same]))
        return conv.eval()
    if isinstance(ref, _CHANNELWISE):
        if any(repr(layer) != repr(ref) for layer in same):
            raise InferenceError(f"the specialists' {type(ref).__name__} layers differ: fuse one architecture only")
        return ref
    raise InferenceError(f"a {type(ref).__name__} layer cannot be fused with FusedSpecialists")


class RoutedEnsemble:
    """A generalist and its shared-trunk specialists, prepared once, run with conditional execution.

    Calling it on a batch gives what :func:`specialkit.evaluation.routed_forward` gives on the same networks (deltas
    merged), with each specialist's dustbin correction applied: ``(p_gen (B, C), per specialist its (B, |S|+1)
    probabilities with NaN rows where inactive or None where it ran on no row, active (B, M) bool)``.

    Args:
        generalist: the generalist.
        specialists: M specialists sharing one trunk cut from ``generalist``
            (:class:`~specialkit.models.SharedTrunkClassifier`).
        groups: the specialists' class indices (over the generalist's C classes).
        dustbin_shifts: per specialist, the number added to its dustbin logit (default 0).
        top_n: the generalist's classes that switch specialists on.
        threshold: the group mass a specialist needs to run (0: none skipped).
        confident: the generalist's top-1 probability above which an image runs no specialist (1: none skipped;
            ``ensemble.activation``'s ``confident``).
        max_active: the most specialists one image runs, those whose group holds the most generalist mass (0: no
            limit; ``ensemble.activation``'s ``max_active``).
        fuse: run the specialists one image switches on as one :class:`FusedSpecialists` call (batch 1, top-1
            routing, no group-mass threshold) instead of one by one; the same outputs. Off by default: on a 2-core
            CPU the grouped convolutions were slower than separate calls (``bench/inference_cost.py`` times both).
            Needs ``specialist_layout="nchw"``.
        layout: the memory layout the trunk and the generalist's later layers run in (:data:`LAYOUTS`).
        specialist_layout: the layout the specialists run in (default: ``layout``). They see few rows each, where
            another layout may be faster than for the generalist's whole batch (``bench/inference_cost.py``).
    """

    def __init__(
        self,
        generalist: models.Classifier,
        specialists: Sequence[nn.Module],
        groups: Sequence[np.ndarray],
        *,
        dustbin_shifts: Sequence[float] | None = None,
        top_n: int = 1,
        threshold: float = 0.0,
        confident: float = 1.0,
        max_active: int = 0,
        fuse: bool = False,
        layout: str = "nchw",
        specialist_layout: str | None = None,
    ) -> None:
        trunk = shared_trunk_of(specialists) if specialists else None
        if trunk is None:
            raise InferenceError(
                "RoutedEnsemble needs specialists that share one trunk of the generalist "
                "(specialist_shared_stages > 0); run others with evaluation.ensemble_forward"
            )
        if trunk.owner_fingerprint != models.fingerprint(generalist):
            raise InferenceError(
                "the specialists' trunk was not cut from this generalist: pass the generalist they share"
            )
        if len(groups) != len(specialists):
            raise InferenceError(
                f"{len(specialists)} specialists but {len(groups)} groups: give one group per specialist"
            )
        if not 0.0 < float(confident) <= 1.0:
            raise InferenceError(f"confident must be in (0, 1] (1 skips nothing), got {confident!r}")
        if not isinstance(max_active, int) or isinstance(max_active, bool) or max_active < 0:
            raise InferenceError(f"max_active must be a whole number >= 0 (0 = no limit), got {max_active!r}")
        own_layout = layout if specialist_layout is None else specialist_layout
        device = next(generalist.parameters()).device
        check_layout(layout, device)
        check_layout(own_layout, device)
        if fuse and own_layout != "nchw":
            raise InferenceError(f"fuse runs the specialists in layout 'nchw', not {own_layout!r}: drop one of them")
        shifts = [0.0] * len(specialists) if dustbin_shifts is None else [float(s) for s in dustbin_shifts]
        self.trunk = trunk
        self.generalist = generalist.eval()
        self.layout, self.specialist_layout = layout, own_layout
        later = list(generalist.body)[generalist._split(trunk.stages) :]
        block = later[0] if later else None
        self.specialists = [
            FastSpecialist(s, block, dustbin_shift=c, layout=own_layout)
            for s, c in zip(specialists, shifts, strict=True)
        ]
        # the specialists take the generalist's first later convolution's output where both are strided tensors
        self.reuses = layout != "blocked" and bool(self.specialists) and all(s.reuses for s in self.specialists)
        self._trunk_steps = layout_steps(prepared_layers(trunk.layers), layout)
        # with reuse, the first later layer is the folded convolution whose output the specialists take
        self._later_steps = layout_steps(prepared_layers(later), layout)
        dropout = generalist.dropout
        self._dropout = None if isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0 else dropout
        self.member = group_membership(groups, generalist.num_outputs, next(generalist.parameters()).device)
        self.top_n, self.threshold, self.confident, self.max_active = top_n, threshold, float(confident), max_active
        # batch 1 with the paper's top-1 routing: the specialists each class switches on, looked up, not computed
        self._rows = self.member > 0
        self._of_class = [row.nonzero().flatten().tolist() for row in self._rows]
        self._no_row = torch.zeros(1, len(self.specialists), dtype=torch.bool, device=self.member.device)
        fused: dict[tuple[int, ...], FusedSpecialists] = {}
        if fuse:
            for ms in {tuple(ms) for ms in self._of_class if len(ms) > 1}:
                fused[ms] = FusedSpecialists([self.specialists[m] for m in ms])
        self._fused_of_class = [fused.get(tuple(ms)) for ms in self._of_class]

    def _generalist_later(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generalist's logits from the trunk's output, and its first later layer's output when reused."""
        first_out = None
        if self.reuses:
            h = first_out = self._later_steps[0](h)
            h = _run(self._later_steps[1:], h)
        else:
            h = _run(self._later_steps, h)
        h = to_strided(h)
        return self.generalist.head.forward(h if self._dropout is None else self._dropout(h)), first_out

    def __call__(
        self, xb: torch.Tensor, routing_probs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        """Route one batch of (B, channels, H, W) float images in [0, 1] (see the class text for the outputs);
        ``routing_probs`` (B, C) replaces the generalist's softmax in the routing only. Runs without gradients."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._route(xb, routing_probs)
        return self._route(xb, routing_probs)

    def _route(
        self, xb: torch.Tensor, routing_probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        t = self.trunk
        x = torch.addcmul(t.input_shift.to(xb.dtype), xb, t.input_scale.to(xb.dtype))
        h = _run(self._trunk_steps, to_layout(x, self.layout))
        logits, first_out = self._generalist_later(h)
        h = to_strided(h)  # the specialists' rows are picked from it
        p_gen = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=1)
        if len(xb) == 1 and self.top_n == 1 and self.threshold == 0:
            return self._route_one(h, p_gen, p_gen if routing_probs is None else routing_probs)
        active = routed_activation(
            p_gen if routing_probs is None else routing_probs,
            self.member,
            top_n=self.top_n,
            threshold=self.threshold,
            confident=self.confident,
            max_active=self.max_active,
        )
        outs: list[torch.Tensor | None] = [None] * len(self.specialists)
        if len(xb) == 1:  # one row: the merged dense layers, one operation where the reuse takes three
            for m in active[0].nonzero().flatten().tolist():
                outs[m] = self.specialists[m].forward(h)
            return p_gen, outs, active
        for m in active.any(dim=0).nonzero().flatten().tolist():
            rows = active[:, m].nonzero().flatten()
            got = self.specialists[m].forward(
                h.index_select(0, rows), None if first_out is None else first_out.index_select(0, rows)
            )
            out = torch.full((len(xb), got.shape[1]), float("nan"), device=got.device)
            outs[m] = out.index_copy_(0, rows, got)
        return p_gen, outs, active

    def _route_one(
        self, h: torch.Tensor, p_gen: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        """One image, top-1 routing, no group-mass threshold: what :func:`~specialkit.evaluation.routed_activation`
        gives, from one ``max`` and a table (at batch 1 every tensor operation costs as much as a small layer); with
        ``fuse``, the specialists of the image in one grouped call where there are several."""
        outs: list[torch.Tensor | None] = [None] * len(self.specialists)
        top, cls = p[0].max(dim=0)
        if self.confident < 1 and float(top) > self.confident:
            return p_gen, outs, self._no_row.clone()
        c = int(cls)
        ms = self._of_class[c]
        if 0 < self.max_active < len(ms):  # the switched-on specialists with the most group mass, ties to the lower
            mass = p[0].to(self.member.dtype) @ self.member[:, ms]
            ms = sorted(
                ms[i] for i in torch.sort(mass, descending=True, stable=True).indices[: self.max_active].tolist()
            )
            row = self._no_row.clone()
            row[0, ms] = True
            for m in ms:
                outs[m] = self.specialists[m].forward(h)
            return p_gen, outs, row
        fused = self._fused_of_class[c]
        if fused is not None:
            for m, o in zip(self._of_class[c], fused.forward(h), strict=True):
                outs[m] = o
        else:
            for m in self._of_class[c]:
                outs[m] = self.specialists[m].forward(h)
        return p_gen, outs, self._rows[c : c + 1].clone()
