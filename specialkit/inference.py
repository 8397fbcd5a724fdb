"""An ensemble prepared once for routed inference (issue 22): the cheapest exact form of conditional execution.

:func:`specialkit.evaluation.routed_forward` runs the networks as they were trained. :class:`RoutedEnsemble` first
rewrites them into an equivalent form that does less work per call, then routes the same way:

* **low-rank delta specialists reuse the generalist's work**: a specialist whose first own layer is the generalist's
  convolution plus a rank-r delta (:func:`specialkit.models.low_rank_delta`) sees the same input as the generalist's
  layer, so its output is the generalist's (computed anyway) plus the delta's two thin convolutions
  ``U(V(h))`` (a ``r``-channel k x k convolution, then a 1 x 1 one). Later layers are merged into dense ones
  (:func:`specialkit.models.merge_deltas`);
* **a dustbin head in two operations**: ``softmax([z_S, logsumexp(z_others) + c])`` equals the full softmax of the C
  logits (with ``c`` added to the other classes' biases) summed into the |S|+1 cells by a fixed 0/1 matrix, so the
  dustbin correction ``c`` is folded into the head's bias once.

The outputs equal :func:`~specialkit.evaluation.routed_forward`'s on the merged networks, with each specialist's
dustbin correction applied, to float rounding (tested). Nothing here trains or changes the models it is built from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import models
from .errors import SpecialkitError
from .evaluation import group_membership, routed_activation, shared_trunk_of

__all__ = ["InferenceError", "FastSpecialist", "RoutedEnsemble"]


class InferenceError(SpecialkitError, ValueError):
    """Models that cannot be prepared for routed inference (mixed or missing trunks, unsupported heads)."""


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
        generalist_first: the generalist's first layer after the trunk (its output is reused when the specialist's
            first layer is a low-rank delta on exactly this layer), or None.
        dustbin_shift: the number added to the dustbin logit (``TrainedSpecialist.dustbin_shift``).

    Attributes:
        reuses: whether the first layer reuses the generalist's output (a delta on ``generalist_first``).
    """

    def __init__(
        self, specialist: models.SharedTrunkClassifier, generalist_first: nn.Module | None, *, dustbin_shift: float
    ) -> None:
        super().__init__()
        first = _first_conv(specialist.body[0]) if len(specialist.body) else None
        self.reuses = (
            isinstance(first, models.LowRankDelta)
            and first.base_attached
            and first.base is generalist_first
            and isinstance(first.base, nn.Conv2d)
        )
        merged = models.merge_deltas(specialist).eval()
        body = list(merged.body)
        if self.reuses:
            base, rank = first.base, first.rank
            self.down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=first.bias is not None)
            with torch.no_grad():
                self.down.weight.copy_(first.down.detach().view(rank, base.in_channels, *base.kernel_size))
                self.up.weight.copy_(first.up.detach().view(base.out_channels, rank, 1, 1))
                if first.bias is not None:
                    self.up.bias.copy_(first.bias.detach() - (base.bias.detach() if base.bias is not None else 0))
            self.down.to(base.weight.device)
            self.up.to(base.weight.device)
            self.after_first = nn.ModuleList(list(body[0])[1:])
            body = body[1:]
        self.body = nn.ModuleList(body)
        self.head, collapse = _head_and_collapse(merged.head, dustbin_shift)
        self.register_buffer("collapse", collapse.float())
        self._layers = tuple(self.body)  # walked once per call: a tuple, no container call
        self._after_first = tuple(self.after_first) if self.reuses else ()
        self.eval()

    def forward(self, h: torch.Tensor, first_out: torch.Tensor | None = None) -> torch.Tensor:
        """(N, |S|+1) corrected probabilities from the trunk's output ``h`` (and, when :attr:`reuses`, the
        generalist's first layer's output ``first_out`` on the same rows)."""
        if self.reuses:
            h = first_out + self.up(self.down(h))
            for layer in self._after_first:
                h = layer(h)
        for layer in self._layers:
            h = layer(h)
        z = self.head(h)
        return torch.softmax(z if z.dtype == torch.float32 else z.float(), dim=1) @ self.collapse


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
        shifts = [0.0] * len(specialists) if dustbin_shifts is None else [float(s) for s in dustbin_shifts]
        self.trunk = trunk
        self.generalist = generalist.eval()
        later = list(generalist.body)[generalist._split(trunk.stages) :]
        first = _first_conv(later[0]) if later else None
        self.specialists = [FastSpecialist(s, first, dustbin_shift=c) for s, c in zip(specialists, shifts, strict=True)]
        self.reuses = bool(self.specialists) and all(s.reuses for s in self.specialists)
        if self.reuses:
            self._first, self._after_first, self._later = first, tuple(later[0])[1:], tuple(later[1:])
        else:
            self._first, self._after_first, self._later = None, (), tuple(later)
        dropout = generalist.dropout
        self._dropout = None if isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0 else dropout
        self.member = group_membership(groups, generalist.num_outputs, next(generalist.parameters()).device)
        if not 0.0 < float(confident) <= 1.0:
            raise InferenceError(f"confident must be in (0, 1] (1 skips nothing), got {confident!r}")
        self.top_n, self.threshold, self.confident = top_n, threshold, float(confident)
        # batch 1 with the paper's top-1 routing: the specialists each class switches on, looked up, not computed
        self._rows = self.member > 0
        self._of_class = [row.nonzero().flatten().tolist() for row in self._rows]
        self._no_row = torch.zeros(1, len(self.specialists), dtype=torch.bool, device=self.member.device)

    def _generalist_later(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The generalist's logits from the trunk's output, and its first later layer's output when reused."""
        first_out = None
        if self._first is not None:
            h = first_out = self._first(h)
            for layer in self._after_first:
                h = layer(h)
        for layer in self._later:
            h = layer(h)
        return self.generalist.head(h if self._dropout is None else self._dropout(h)), first_out

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
        h = self.trunk(xb)
        logits, first_out = self._generalist_later(h)
        p_gen = torch.softmax(logits if logits.dtype == torch.float32 else logits.float(), dim=1)
        if len(xb) == 1 and self.top_n == 1 and self.threshold == 0:
            return self._route_one(h, first_out, p_gen, p_gen if routing_probs is None else routing_probs)
        active = routed_activation(
            p_gen if routing_probs is None else routing_probs,
            self.member,
            top_n=self.top_n,
            threshold=self.threshold,
            confident=self.confident,
        )
        outs: list[torch.Tensor | None] = [None] * len(self.specialists)
        if len(xb) == 1:
            for m in active[0].nonzero().flatten().tolist():
                outs[m] = self.specialists[m].forward(h, first_out)  # no hooks: skip Module.__call__
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
        self, h: torch.Tensor, first_out: torch.Tensor | None, p_gen: torch.Tensor, p: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        """One image, top-1 routing, no group-mass threshold: what :func:`~specialkit.evaluation.routed_activation`
        gives, from one ``max`` and a table (at batch 1 every tensor operation costs as much as a small layer)."""
        outs: list[torch.Tensor | None] = [None] * len(self.specialists)
        top, cls = p[0].max(dim=0)
        if self.confident < 1 and float(top) > self.confident:
            return p_gen, outs, self._no_row.clone()
        c = int(cls)
        for m in self._of_class[c]:
            outs[m] = self.specialists[m].forward(h, first_out)  # no hooks: skip Module.__call__
        return p_gen, outs, self._rows[c : c + 1].clone()
