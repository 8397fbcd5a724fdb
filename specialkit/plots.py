"""Plotly figures for every stage of the pipeline: pure functions from arrays to ``go.Figure``.

Every function takes plain data (numpy arrays, torch tensors, lists, pandas DataFrames), computes
nothing that needs a model, and returns a :class:`plotly.graph_objects.Figure` in one template
(:data:`TEMPLATE`). Nothing here reads or writes files except :func:`save_html`.

>>> import numpy as np
>>> from specialkit import plots
>>> fig = plots.confusion_heatmap(np.eye(3), ("cat", "dog", "fox"))
>>> fig.data[0].type
'heatmap'

Conventions the widgets and the report rely on:

* Class labels are shown by name; duplicate names are made unique with a ``" #<index>"`` suffix
  (:func:`display_names`), so categorical axes never merge two classes.
* Heatmaps (:func:`confusion_heatmap`, :func:`covariance_heatmap`): trace 0 is the heatmap,
  ``z[i][j] == matrix[order[i], order[j]]``; its ``x``/``y`` are the reordered display names and its
  ``meta["order"]`` is the permutation. Rows are true classes (top to bottom), columns predicted.
  Group outlines are ``layout.shapes`` named ``"group:<name>"``, one per contiguous run of a group's
  classes along the diagonal (so one per group when ``order`` keeps each group together, e.g.
  :func:`group_order`).
* :func:`class_map`: trace 0 holds all C classes in class-index order, ``customdata[i] == i``, so a
  ``FigureWidget`` click/selection's ``point_inds`` are class indices. Traces 1.. are legend-only
  entries (no points). Recolour with ``fig.data[0].marker.color = group_colors(labels)``.
* Image grids: trace 0 is a ``go.Image`` whose ``source`` is a PNG data URI of the composed grid;
  the next trace is a transparent heatmap giving one hover text per cell.
* :func:`save_html` embeds plotly.js (works offline); :func:`figures_to_html_fragment` embeds it in
  the first fragment only, for a report that holds many figures.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import plotly.colors as pcolors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .errors import SpecialkitError

__all__ = [
    "PAPER_TABLE4",
    "TEMPLATE",
    "PlotInputError",
    "accuracy_bars",
    "study_gains",
    "accuracy_vs_cost",
    "frontier",
    "class_map",
    "confused_examples_grid",
    "confusion_heatmap",
    "covariance_heatmap",
    "dendrogram",
    "dendrogram_order",
    "display_names",
    "figure_to_html_fragment",
    "figures_to_html_fragment",
    "fixed_broken_grid",
    "group_colors",
    "group_order",
    "per_class_change",
    "quality_bars",
    "sample_grid",
    "save_html",
    "specialist_curves",
    "table4_chart",
    "training_curves",
]

TEMPLATE = "plotly_white"
"""The plotly template every figure uses."""

PAPER_TABLE4: Mapping[str, float] = MappingProxyType(
    {
        "0": 0.0,
        "1": 0.034,
        "2": 0.074,
        "3": 0.088,
        "4": 0.105,
        "5": 0.111,
        "6": 0.113,
        "7": 0.128,
        "8": 0.136,
        "9": 0.166,
        "10+": 0.141,
    }
)
"""Hinton, Vinyals & Dean (2015) Table 4 (JFT): relative top-1 gain by the number of specialists
covering the true class, as fractions (read-only)."""

PALETTE: tuple[str, ...] = tuple(
    dict.fromkeys(pcolors.qualitative.Plotly + pcolors.qualitative.D3 + pcolors.qualitative.Alphabet)
)
"""Qualitative colours for groups, in order; group ``g`` gets ``PALETTE[g % len(PALETTE)]``."""

UNCOVERED_COLOR = "#B8B8B8"
POSITIVE_COLOR = "#2CA02C"
NEGATIVE_COLOR = "#D62728"
NEUTRAL_COLOR = "#636EFA"
BASELINE_COLOR = "#8C8C8C"
_TRANSPARENT = [[0.0, "rgba(0,0,0,0)"], [1.0, "rgba(0,0,0,0)"]]
_GAP_GREY = 224
_LINKAGES = ("single", "complete", "average", "weighted", "ward")


class PlotInputError(SpecialkitError, ValueError):
    """The data handed to a figure function has the wrong shape or content; the message says the fix."""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(x: Any, name: str, *, n: int | None = None, num_classes: int | None = None) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise PlotInputError(
            f"{name} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}; pass labels as int64"
        )
    if n is not None and arr.shape[0] != n:
        raise PlotInputError(f"{name} has {arr.shape[0]} entries but there are {n} images; pass one label per image")
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise PlotInputError(
            f"{name} must lie in [0, {num_classes}) (one per class name), got range [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64)


def display_names(class_names: Sequence[str]) -> list[str]:
    """Class names made unique for display: a repeated name gets a ``" #<index>"`` suffix.

    Args:
        class_names: (C,) class names, index = label.

    Returns:
        (C,) strings, all distinct, equal to ``class_names`` where those are already distinct.
    """
    names = [str(n) for n in class_names]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} #{i}" if seen[n] > 1 else n for i, n in enumerate(names)]


def _check_names(class_names: Sequence[str], num_classes: int, what: str) -> list[str]:
    if isinstance(class_names, str) or len(class_names) != num_classes:
        got = "a string" if isinstance(class_names, str) else f"{len(class_names)} names"
        raise PlotInputError(
            f"{what} has {num_classes} classes but class_names has {got}; pass one name per class (index = label)"
        )
    return display_names(class_names)


def _check_order(order: Any, num_classes: int) -> np.ndarray:
    if order is None:
        return np.arange(num_classes)
    arr = _to_numpy(order)
    if (
        arr.shape != (num_classes,)
        or not np.issubdtype(arr.dtype, np.integer)
        or not np.array_equal(np.sort(arr), np.arange(num_classes))
    ):
        raise PlotInputError(
            f"order must be a permutation of range({num_classes}) (each class index once), got shape {arr.shape}; "
            "build one with np.argsort(...) or plots.group_order(groups, num_classes)"
        )
    return arr.astype(np.int64)


def _check_groups(groups: Sequence[Sequence[int]] | None, num_classes: int) -> list[np.ndarray]:
    if groups is None:
        return []
    if isinstance(groups, Mapping):
        raise PlotInputError(
            "groups must be a list of lists of class indices, not a dict; "
            "pass list(spec.indices()) or list(groups.values()) as indices"
        )
    out = []
    for g, members in enumerate(groups):
        arr = _to_numpy(sorted(members) if isinstance(members, (set, frozenset)) else members)
        if arr.ndim != 1 or arr.size == 0:
            raise PlotInputError(f"group {g} is empty or not 1-D; every group must list at least one class index")
        if not np.issubdtype(arr.dtype, np.integer):
            raise PlotInputError(
                f"group {g} must hold integer class indices, got dtype {arr.dtype}; pass spec.indices()"
            )
        if arr.min() < 0 or arr.max() >= num_classes:
            raise PlotInputError(
                f"group {g} holds class indices outside [0, {num_classes}); pass class indices, not names"
            )
        out.append(np.unique(arr))
    return out


def _group_names(group_names: Sequence[str] | Mapping[int, str] | None, n_groups: int) -> list[str]:
    if group_names is None:
        return [f"group {g}" for g in range(n_groups)]
    if isinstance(group_names, Mapping):
        return [str(group_names.get(g, f"group {g}")) for g in range(n_groups)]
    if isinstance(group_names, str) or len(group_names) < n_groups:
        raise PlotInputError(
            f"group_names must hold a name for each of the {n_groups} groups (index = group id); pass a list or a dict"
        )
    return [str(n) for n in group_names]


def group_colors(group_labels: Any) -> list[str]:
    """One colour per class from its group: ``PALETTE[g % len(PALETTE)]``, grey for ``-1`` (uncovered).

    Args:
        group_labels: (C,) int group id of every class, ``-1`` for a class in no group.

    Returns:
        (C,) CSS colour strings; the same group always gets the same colour in every figure.
    """
    labels = _labels(group_labels, "group_labels")
    if labels.size and labels.min() < -1:
        raise PlotInputError("group_labels must be >= -1 (-1 marks an uncovered class)")
    return [UNCOVERED_COLOR if g < 0 else PALETTE[g % len(PALETTE)] for g in labels.tolist()]


def group_order(groups: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """A class permutation that puts each group's classes next to each other.

    Groups come in the order given; a class in several groups is placed with the first; classes in
    no group come last, in index order.

    Args:
        groups: list of lists of class indices.
        num_classes: C.

    Returns:
        (C,) int64 permutation, usable as ``order=`` in the heatmaps.
    """
    checked = _check_groups(groups, num_classes)
    placed = np.zeros(num_classes, bool)
    order: list[int] = []
    for members in checked:
        for c in members.tolist():
            if not placed[c]:
                placed[c] = True
                order.append(c)
    order.extend(np.flatnonzero(~placed).tolist())
    return np.asarray(order, dtype=np.int64)


def _base_layout(
    fig: go.Figure, *, title: str | None, height: int | None = None, width: int | None = None
) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left") if title else None,
        height=height,
        width=width,
        margin=dict(l=60, r=30, t=70 if title else 30, b=60),
        hoverlabel=dict(namelength=-1),
    )
    return fig


def _percent_format(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return finite.size > 0 and float(np.abs(finite).max()) <= 1.0


def _percent_ticks(values: np.ndarray, *, sign: bool = False) -> str:
    finite = values[np.isfinite(values)]
    spread = float(finite.max() - finite.min()) if finite.size else 1.0
    return ("+" if sign else "") + (".0%" if spread > 0.1 else ".1%")


# --------------------------------------------------------------------------------------------
# Image grids
# --------------------------------------------------------------------------------------------


def _images_hwc(images: Any) -> np.ndarray:
    """(N, C, H, W) uint8 (or float in [0, 1]) -> (N, H, W, 3) uint8."""
    arr = _to_numpy(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise PlotInputError(
            f"images must be (N, channels, H, W) with 1 or 3 channels, got shape {arr.shape}; "
            "for channels-last arrays pass x.transpose(0, 3, 1, 2)"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
            raise PlotInputError("float images must lie in [0, 1]; pass the uint8 images (data.Dataset.x_*) instead")
        arr = np.rint(arr * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise PlotInputError(
            f"images must be uint8 (or float in [0, 1]), got {arr.dtype}; pass the dataset's uint8 tensors"
        )
    arr = np.transpose(arr, (0, 2, 3, 1))
    return np.repeat(arr, 3, axis=3) if arr.shape[3] == 1 else arr


def _png_data_uri(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grid_geometry(n: int, h: int, w: int, *, ncols: int, gap: int, caption_px: int) -> tuple[int, int, int, int]:
    ncols_eff = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols_eff))
    height = nrows * (h + caption_px) + (nrows - 1) * gap
    width = ncols_eff * w + (ncols_eff - 1) * gap
    return nrows, ncols_eff, height, width


def _compose_grid(cells: np.ndarray, *, ncols: int, gap: int, caption_px: int) -> np.ndarray:
    n, h, w, _ = cells.shape
    nrows, ncols_eff, height, width = _grid_geometry(n, h, w, ncols=ncols, gap=gap, caption_px=caption_px)
    grid = np.full((height, width, 3), _GAP_GREY, dtype=np.uint8)
    if caption_px:
        for r in range(nrows):
            top = r * (h + caption_px + gap) + h
            grid[top : top + caption_px] = 255
    for k in range(n):
        r, c = divmod(k, ncols_eff)
        top, left = r * (h + caption_px + gap), c * (w + gap)
        grid[top : top + h, left : left + w] = cells[k]
    for k in range(n, nrows * ncols_eff):
        r, c = divmod(k, ncols_eff)
        top, left = r * (h + caption_px + gap), c * (w + gap)
        grid[max(0, top - gap) : top + h + caption_px, max(0, left - gap) : left + w + gap] = 255
    return grid


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(1, max_chars - 1)] + "…"


def _add_image_grid(
    fig: go.Figure,
    cells: np.ndarray,
    hover: Sequence[str],
    captions: Sequence[str] | None,
    *,
    ncols: int,
    gap: int,
    scale: float,
    row: int | None = None,
    col: int | None = None,
) -> None:
    """Add the composed image (trace), a transparent hover heatmap and caption annotations."""
    n, h, w, _ = cells.shape
    caption_px = int(math.ceil(14.0 / scale)) + 1 if captions is not None else 0
    nrows, ncols_eff, height, width = _grid_geometry(n, h, w, ncols=ncols, gap=gap, caption_px=caption_px)
    grid = _compose_grid(cells, ncols=ncols, gap=gap, caption_px=caption_px)
    where = dict(row=row, col=col) if row is not None else {}
    fig.add_trace(
        go.Image(source=_png_data_uri(grid), x0=0, dx=1, y0=0, dy=1, hoverinfo="skip", name="images"), **where
    )
    z = np.full((nrows, ncols_eff), np.nan)
    text = [["" for _ in range(ncols_eff)] for _ in range(nrows)]
    for k in range(n):
        r, c = divmod(k, ncols_eff)
        z[r, c] = k
        text[r][c] = hover[k]
    fig.add_trace(
        go.Heatmap(
            z=z,
            x0=(w - 1) / 2,
            dx=w + gap,
            y0=(h + caption_px - 1) / 2,
            dy=h + caption_px + gap,
            text=text,
            hovertemplate="%{text}<extra></extra>",
            hoverongaps=False,
            colorscale=_TRANSPARENT,
            showscale=False,
            name="cells",
        ),
        **where,
    )
    subplot = fig.get_subplot(row, col) if row is not None else None
    xref = subplot.xaxis.plotly_name.replace("axis", "") if subplot else "x"
    yref = subplot.yaxis.plotly_name.replace("axis", "") if subplot else "y"
    if captions is not None:
        max_chars = max(3, int(w * scale / 6.0))
        for k in range(n):
            r, c = divmod(k, ncols_eff)
            fig.add_annotation(
                x=c * (w + gap) + (w - 1) / 2,
                y=r * (h + caption_px + gap) + h + caption_px / 2 - 0.5,
                xref=xref,
                yref=yref,
                text=_truncate(captions[k], max_chars),
                showarrow=False,
                font=dict(size=10, color="#333333"),
            )
    axis = dict(showgrid=False, zeroline=False, showticklabels=False, ticks="", showline=False)
    fig.update_xaxes(range=[-0.5, width - 0.5], constrain="domain", **axis, **where)
    fig.update_yaxes(range=[height - 0.5, -0.5], scaleanchor=xref, constrain="domain", **axis, **where)


def _grid_scale(width_px: int, *, target: int = 1000) -> float:
    return float(min(4.0, max(0.5, min(target, max(300, 3 * width_px)) / max(1, width_px))))


def _single_grid_figure(
    cells: np.ndarray, hover: Sequence[str], captions: Sequence[str] | None, *, ncols: int, gap: int, title: str | None
) -> go.Figure:
    n, h, w, _ = cells.shape
    _, _, _, width = _grid_geometry(n, h, w, ncols=ncols, gap=gap, caption_px=0)
    scale = _grid_scale(width)
    caption_px = int(math.ceil(14.0 / scale)) + 1 if captions is not None else 0
    _, _, height, _ = _grid_geometry(n, h, w, ncols=ncols, gap=gap, caption_px=caption_px)
    fig = go.Figure()
    _add_image_grid(fig, cells, hover, captions, ncols=ncols, gap=gap, scale=scale)
    top = 60 if title else 20
    _base_layout(fig, title=title, width=int(width * scale) + 40, height=int(height * scale) + top + 20)
    fig.update_layout(margin=dict(l=20, r=20, t=top, b=20))
    return fig


def sample_grid(
    images: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    ncols: int = 16,
    gap: int = 2,
    captions: bool = False,
    title: str | None = "Sample images",
) -> go.Figure:
    """A grid of images with their class names on hover (and optionally as captions).

    Args:
        images: (N, channels, H, W) ``uint8`` torch tensor or numpy array, 1 (grayscale) or 3
            (RGB) channels; float images in [0, 1] are accepted too.
        labels: (N,) int class index of every image.
        class_names: (C,) class names, index = label.
        ncols: images per row.
        gap: pixels of grey between images.
        captions: write the class name under every image (best for up to ~64 images).
        title: figure title.

    Returns:
        Figure: trace 0 a ``go.Image`` holding the composed grid of
        ``rows * H + (rows - 1) * gap`` by ``ncols * W + (ncols - 1) * gap`` pixels (taller by a
        caption band per row with ``captions=True``), trace 1 the per-cell hover.
    """
    cells = _images_hwc(images)
    if cells.shape[0] == 0:
        raise PlotInputError("sample_grid got no images; pass at least one image")
    if ncols < 1 or gap < 0:
        raise PlotInputError(f"ncols must be >= 1 and gap >= 0, got ncols={ncols}, gap={gap}")
    y = _labels(labels, "labels", n=cells.shape[0], num_classes=len(class_names))
    names = display_names(class_names)
    hover = [f"#{k}: {names[c]} (class {c})" for k, c in enumerate(y.tolist())]
    return _single_grid_figure(
        cells, hover, [names[c] for c in y] if captions else None, ncols=ncols, gap=gap, title=title
    )


def confused_examples_grid(
    images: Any,
    true_labels: Any,
    pred_labels: Any,
    class_names: Sequence[str],
    *,
    ncols: int = 8,
    max_images: int = 64,
    scores: Any = None,
    gap: int = 2,
    captions: bool = True,
    title: str | None = "Most confused examples",
) -> go.Figure:
    """Misclassified examples captioned ``"true → pred"``, in the order given.

    The caller chooses and orders the examples (e.g. the most confident mistakes); the first
    ``max_images`` are shown.

    Args:
        images: (N, channels, H, W) ``uint8`` images.
        true_labels: (N,) int true class.
        pred_labels: (N,) int predicted class.
        class_names: (C,) class names.
        ncols: images per row.
        max_images: show at most this many.
        scores: optional (N,) float shown on hover (e.g. the probability of the wrong class).
        gap: pixels between images.
        captions: write ``"true → pred"`` under every image (hover always has it).
        title: figure title.

    Returns:
        Figure laid out like :func:`sample_grid`.
    """
    cells = _images_hwc(images)
    n = cells.shape[0]
    if n == 0:
        raise PlotInputError("confused_examples_grid got no images; pass at least one example")
    t = _labels(true_labels, "true_labels", n=n, num_classes=len(class_names))
    p = _labels(pred_labels, "pred_labels", n=n, num_classes=len(class_names))
    s = None if scores is None else _to_numpy(scores).astype(float)
    if s is not None and s.shape != (n,):
        raise PlotInputError(f"scores must have shape ({n},), got {s.shape}; pass one score per image or None")
    keep = min(n, max_images)
    names = display_names(class_names)
    caps = [f"{names[t[k]]} → {names[p[k]]}" for k in range(keep)]
    hover = [
        f"#{k}: true {names[t[k]]} → predicted {names[p[k]]}" + (f"<br>score {s[k]:.3f}" if s is not None else "")
        for k in range(keep)
    ]
    return _single_grid_figure(cells[:keep], hover, caps if captions else None, ncols=ncols, gap=gap, title=title)


def fixed_broken_grid(
    images: Any,
    labels: Any,
    gen_pred: Any,
    ens_pred: Any,
    class_names: Sequence[str],
    *,
    max_images: int = 32,
    ncols: int = 8,
    gap: int = 2,
    captions: bool = True,
    title: str | None = "What the ensemble fixed and broke",
) -> go.Figure:
    """Two panels: images the ensemble fixed (generalist wrong, ensemble right) and broke.

    The first ``max_images`` of each kind in index order are shown; the panel titles give the full
    counts.

    Args:
        images: (N, channels, H, W) ``uint8`` images (files streamed from disk: only those shown are decoded).
        labels: (N,) int true class.
        gen_pred: (N,) int generalist prediction.
        ens_pred: (N,) int ensemble prediction.
        class_names: (C,) class names.
        max_images: at most this many images per panel.
        ncols: images per row in each panel.
        gap: pixels between images.
        captions: caption each image ``"generalist's class → ensemble's class"``.
        title: figure title.

    Returns:
        Figure with two stacked subplots (row 1 fixed, row 2 broken); each non-empty panel holds a
        ``go.Image`` and a hover heatmap; ``layout.meta`` has ``n_fixed`` and ``n_broken``.
    """
    lazy = hasattr(images, "decode")  # files on disk (streaming.ImageFiles): decode only the images shown
    cells = _images_hwc(images[:1] if lazy else images)
    n, h, w = (len(images), *cells.shape[1:3]) if lazy else cells.shape[:3]
    c = len(class_names)
    y = _labels(labels, "labels", n=n, num_classes=c)
    g = _labels(gen_pred, "gen_pred", n=n, num_classes=c)
    e = _labels(ens_pred, "ens_pred", n=n, num_classes=c)
    names = display_names(class_names)
    fixed = np.flatnonzero((g != y) & (e == y))
    broken = np.flatnonzero((g == y) & (e != y))
    ncols_eff = max(1, min(ncols, max_images))
    _, _, _, width = _grid_geometry(ncols_eff, h, w, ncols=ncols_eff, gap=gap, caption_px=0)
    scale = _grid_scale(width, target=900)
    caption_px = int(math.ceil(14.0 / scale)) + 1 if captions else 0
    panels = [
        ("fixed", fixed[:max_images], "Fixed by the ensemble", len(fixed), "generalist wrong, ensemble right"),
        ("broken", broken[:max_images], "Broken by the ensemble", len(broken), "generalist right, ensemble wrong"),
    ]
    panel_px = [max(1, math.ceil(len(idx) / ncols_eff)) * (h + caption_px + gap) * scale for _, idx, *_ in panels]
    spacing_px = 70.0
    fig = make_subplots(
        rows=2,
        cols=1,
        subplot_titles=[
            f"{head}: {count} ({what}; captions generalist → ensemble)" for _, _, head, count, what in panels
        ],
        row_heights=panel_px,
        vertical_spacing=spacing_px / (sum(panel_px) + spacing_px),
    )
    fig.update_annotations(font_size=13)
    for row, (kind, chosen, *_rest) in enumerate(panels, start=1):
        if chosen.size == 0:
            subplot = fig.get_subplot(row, 1)
            fig.add_annotation(
                text=f"no {kind} examples",
                showarrow=False,
                xref="paper",
                yref="paper",
                x=float(np.mean(subplot.xaxis.domain)),
                y=float(np.mean(subplot.yaxis.domain)),
                font=dict(size=13, color="#666666"),
            )
            fig.update_xaxes(visible=False, row=row, col=1)
            fig.update_yaxes(visible=False, row=row, col=1)
            continue
        ks = chosen.tolist()
        hover = [f"#{k}: true {names[y[k]]}<br>generalist: {names[g[k]]}<br>ensemble: {names[e[k]]}" for k in ks]
        caps = [f"{names[g[k]]} → {names[e[k]]}" for k in ks] if captions else None
        shown = _images_hwc(images[chosen]) if lazy else cells[chosen]
        _add_image_grid(fig, shown, hover, caps, ncols=ncols_eff, gap=gap, scale=scale, row=row, col=1)
    fig.layout.meta = {"n_fixed": int(len(fixed)), "n_broken": int(len(broken))}
    top = 110 if title else 60
    _base_layout(
        fig, title=title, width=max(720, int(width * scale) + 60), height=int(sum(panel_px) + spacing_px) + top + 20
    )
    fig.update_layout(margin=dict(l=20, r=20, t=top, b=20))
    return fig


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def _record_value(record: Any, key: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def _history_records(history: Any, name: str) -> list[Any]:
    records = getattr(history, "records", history)
    if isinstance(records, (str, bytes, Mapping)) or not hasattr(records, "__iter__"):
        raise PlotInputError(
            f"history {name!r} must be a list of per-epoch records (dicts with epoch, train_loss, ...)"
        )
    return list(records)


def _as_float(v: Any) -> float:
    return float("nan") if v is None else float(v)


def training_curves(
    histories: Mapping[str, Any],
    *,
    show_lr: bool = False,
    title: str | None = "Training curves",
) -> go.Figure:
    """Loss and accuracy per epoch for one or more models.

    Args:
        histories: model name -> list of per-epoch records (dicts, dataclasses or objects) with
            ``epoch, train_loss, train_acc, val_loss, val_acc, lr``; ``val_*`` may be ``None``.
            A ``training.History`` works as is.
        show_lr: add a third panel with the learning rate.
        title: figure title.

    Returns:
        Figure with subplots loss | accuracy (| lr). One colour per model (legend group = model
        name); train curves dashed, validation solid. Traces are named ``"<model> train"`` /
        ``"<model> val"``; a validation series that is all ``None`` is left out.
    """
    if not isinstance(histories, Mapping) or not histories:
        raise PlotInputError("histories must be a non-empty dict {model name: list of per-epoch records}")
    panels = ["loss", "accuracy"] + (["learning rate"] if show_lr else [])
    fig = make_subplots(
        rows=1, cols=len(panels), subplot_titles=[p.capitalize() for p in panels], horizontal_spacing=0.08
    )
    all_acc: list[float] = []
    for m, (name, history) in enumerate(histories.items()):
        records = _history_records(history, name)
        if not records:
            raise PlotInputError(f"history {name!r} has no epochs; train for at least one epoch or leave it out")
        color = PALETTE[m % len(PALETTE)]
        epochs = [_record_value(r, "epoch") for r in records]
        epochs = [i + 1 if e is None else e for i, e in enumerate(epochs)]
        for split, dash in (("train", "dash"), ("val", "solid")):
            for col, metric in ((1, "loss"), (2, "acc")):
                ys = np.array([_as_float(_record_value(r, f"{split}_{metric}")) for r in records])
                if np.all(np.isnan(ys)):
                    continue
                if metric == "acc":
                    all_acc.extend(ys[np.isfinite(ys)].tolist())
                fig.add_trace(
                    go.Scatter(
                        x=epochs,
                        y=ys,
                        mode="lines+markers" if len(records) <= 30 else "lines",
                        name=f"{name} {split}",
                        legendgroup=name,
                        showlegend=col == 1,
                        line=dict(color=color, dash=dash, width=2),
                        marker=dict(size=5),
                        hovertemplate=f"{name} {split}<br>epoch %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>",
                    ),
                    row=1,
                    col=col,
                )
        if show_lr:
            lr = np.array([_as_float(_record_value(r, "lr")) for r in records])
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=lr,
                    mode="lines",
                    name=f"{name} lr",
                    legendgroup=name,
                    showlegend=False,
                    line=dict(color=color, width=2),
                    hovertemplate=f"{name}<br>epoch %{{x}}<br>lr %{{y:.3g}}<extra></extra>",
                ),
                row=1,
                col=3,
            )
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="accuracy", row=1, col=2)
    if _percent_format(np.asarray(all_acc, float)):
        fig.update_yaxes(tickformat=_percent_ticks(np.asarray(all_acc, float)), row=1, col=2)
    if show_lr:
        fig.update_yaxes(title_text="lr", type="log", row=1, col=3)
    _base_layout(fig, title=title, height=420)
    fig.update_layout(legend=dict(groupclick="togglegroup"))
    return fig


def specialist_curves(
    histories: Mapping[str, Any], *, show_lr: bool = False, title: str | None = "Specialist training"
) -> go.Figure:
    """:func:`training_curves` for a set of specialists (one colour per specialist)."""
    return training_curves(histories, show_lr=show_lr, title=title)


# --------------------------------------------------------------------------------------------
# Matrices
# --------------------------------------------------------------------------------------------


def _square(matrix: Any, name: str) -> np.ndarray:
    arr = _to_numpy(matrix).astype(float)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise PlotInputError(f"{name} must be a square (C, C) matrix, got shape {arr.shape}")
    return arr


def _group_shapes(groups: list[np.ndarray], order: np.ndarray, names: list[str], *, line_width: float) -> list[dict]:
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    shapes = []
    for g, members in enumerate(groups):
        pos = np.sort(position[members])
        breaks = np.flatnonzero(np.diff(pos) > 1)
        starts = np.concatenate([[pos[0]], pos[breaks + 1]])
        ends = np.concatenate([pos[breaks], [pos[-1]]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            shapes.append(
                dict(
                    type="rect",
                    xref="x",
                    yref="y",
                    x0=a - 0.5,
                    x1=b + 0.5,
                    y0=a - 0.5,
                    y1=b + 0.5,
                    line=dict(color=PALETTE[g % len(PALETTE)], width=line_width),
                    fillcolor="rgba(0,0,0,0)",
                    name=f"group:{names[g]}",
                    layer="above",
                )
            )
    return shapes


def _matrix_figure(
    z: np.ndarray,
    class_names: Sequence[str],
    *,
    order: Any,
    groups: Any,
    group_names: Any,
    title: str | None,
    heatmap: dict,
    x_title: str,
    y_title: str,
) -> go.Figure:
    c = z.shape[0]
    names = _check_names(class_names, c, "the matrix")
    perm = _check_order(order, c)
    checked = _check_groups(groups, c)
    shown = [names[i] for i in perm]
    zz = z[np.ix_(perm, perm)]
    fig = go.Figure(go.Heatmap(z=zz, x=shown, y=shown, meta={"order": perm.tolist()}, hoverongaps=False, **heatmap))
    tick_size = 11 if c <= 40 else 9 if c <= 80 else 7
    axis = dict(type="category", showgrid=False, tickfont=dict(size=tick_size), ticks="")
    fig.update_xaxes(title_text=x_title, tickangle=-90 if c > 12 else 0, constrain="domain", **axis)
    fig.update_yaxes(title_text=y_title, autorange="reversed", scaleanchor="x", constrain="domain", **axis)
    side = int(min(760, max(420, 9 * c)))
    label_margin = int(min(160, 12 + 6.5 * max(len(s) for s in shown)))
    fig.update_layout(
        shapes=_group_shapes(checked, perm, _group_names(group_names, len(checked)), line_width=2.0 if c <= 80 else 1.2)
    )
    _base_layout(fig, title=title, width=side + label_margin + 120, height=side + label_margin + 80)
    fig.update_layout(margin=dict(l=label_margin + 30, b=label_margin + 30))
    return fig


def confusion_heatmap(
    matrix: Any,
    class_names: Sequence[str],
    *,
    order: Any = None,
    groups: Sequence[Sequence[int]] | None = None,
    group_names: Sequence[str] | None = None,
    normalised: bool = True,
    hide_diagonal: bool = False,
    zmax: float | None = None,
    title: str | None = "Confusion matrix",
) -> go.Figure:
    """Confusion matrix heatmap, rows = true class, columns = predicted, optionally reordered.

    Args:
        matrix: (C, C) counts (or already row-normalised), ``matrix[t, p]`` = examples of class t
            predicted as p.
        class_names: (C,) class names.
        order: (C,) permutation: row/column i of the figure shows class ``order[i]``.
        groups: list of lists of class indices; each group's block on the diagonal gets an outline
            (one per contiguous run after reordering; see :func:`group_order`).
        group_names: names for the groups (legend-free; shown as shape names).
        normalised: divide each row by its sum (rows summing to 0 stay 0), so cells read as
            P(predicted | true).
        hide_diagonal: blank the diagonal (correct predictions) so confusions use the full colour
            range.
        zmax: top of the colour scale; default the largest shown value.
        title: figure title.

    Returns:
        Figure: trace 0 the heatmap with ``z[i][j] == M[order[i], order[j]]`` (M normalised if
        asked, ``nan`` on a hidden diagonal), ``x``/``y`` the reordered names; hover reads
        ``"true X → predicted Y: value"``.
    """
    m = _square(matrix, "matrix")
    if not np.all(np.isfinite(m)) or (m < 0).any():
        raise PlotInputError(
            "matrix must hold finite, non-negative counts or rates; compute it with confusion.confusion_matrix"
        )
    if normalised:
        sums = m.sum(axis=1, keepdims=True)
        m = np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)
    if hide_diagonal:
        m = m.copy()
        np.fill_diagonal(m, np.nan)
    finite = m[np.isfinite(m)]
    top = float(zmax) if zmax is not None else float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    integral = not normalised and finite.size and np.allclose(finite, np.round(finite))
    fmt = ".3f" if normalised else ",.0f" if integral else ".4g"
    heat = dict(
        colorscale="Blues",
        zmin=0.0,
        zmax=top,
        colorbar=dict(title=dict(text="P(pred | true)" if normalised else "count"), thickness=14),
        hovertemplate=f"true %{{y}} → predicted %{{x}}: %{{z:{fmt}}}<extra></extra>",
    )
    return _matrix_figure(
        m,
        class_names,
        order=order,
        groups=groups,
        group_names=group_names,
        title=title,
        heatmap=heat,
        x_title="predicted class",
        y_title="true class",
    )


def covariance_heatmap(
    cov: Any,
    class_names: Sequence[str],
    *,
    order: Any = None,
    groups: Sequence[Sequence[int]] | None = None,
    group_names: Sequence[str] | None = None,
    hide_diagonal: bool = False,
    zmax: float | None = None,
    title: str | None = "Covariance of predicted probabilities",
) -> go.Figure:
    """Covariance (or any signed class-by-class matrix) on a diverging scale centred at 0.

    Args:
        cov: (C, C) symmetric matrix, e.g. ``confusion.prediction_covariance(probs)``.
        class_names: (C,) class names.
        order: (C,) permutation, as in :func:`confusion_heatmap`.
        groups: list of lists of class indices to outline.
        group_names: names for the groups.
        hide_diagonal: blank the diagonal (the variances).
        zmax: colour range is ``[-zmax, zmax]``; default the largest off-diagonal ``|value|``
            (so the much larger variances saturate instead of washing out the structure).
        title: figure title.

    Returns:
        Figure laid out like :func:`confusion_heatmap` (trace 0 the heatmap, ``zmid=0``).
    """
    m = _square(cov, "cov")
    if not np.all(np.isfinite(m)):
        raise PlotInputError("cov holds nan or inf; compute it from finite probabilities")
    if hide_diagonal:
        m = m.copy()
        np.fill_diagonal(m, np.nan)
    if zmax is None:
        off = np.abs(m[~np.eye(m.shape[0], dtype=bool)]) if m.shape[0] > 1 else np.abs(np.diag(m))
        off = off[np.isfinite(off)]
        zmax = float(off.max()) if off.size and off.max() > 0 else 1.0
    heat = dict(
        colorscale="RdBu_r",
        zmid=0.0,
        zmin=-float(zmax),
        zmax=float(zmax),
        colorbar=dict(title=dict(text="covariance"), thickness=14),
        hovertemplate="%{y} × %{x}: %{z:.3g}<extra></extra>",
    )
    return _matrix_figure(
        m,
        class_names,
        order=order,
        groups=groups,
        group_names=group_names,
        title=title,
        heatmap=heat,
        x_title="class",
        y_title="class",
    )


# --------------------------------------------------------------------------------------------
# Class map and dendrogram
# --------------------------------------------------------------------------------------------


def class_map(
    coords: Any,
    class_names: Sequence[str],
    *,
    group_labels: Any = None,
    group_names: Sequence[str] | Mapping[int, str] | None = None,
    show_text: bool | None = None,
    marker_size: int = 10,
    title: str | None = "Class map",
) -> go.Figure:
    """2-D map of the classes (e.g. UMAP of classifier weights), coloured by group.

    Args:
        coords: (C, 2) float position of every class.
        class_names: (C,) class names.
        group_labels: optional (C,) int group of every class, ``-1`` = in no group.
        group_names: names of groups 0..G-1 (list, or dict group id -> name).
        show_text: write class names next to the points; default when C <= 120.
        marker_size: point size.
        title: figure title.

    Returns:
        Figure. **Trace 0 holds all C classes in class-index order** with ``customdata[i] == i``,
        ``text`` the class names and ``marker.color`` one colour per class
        (:func:`group_colors`); a widget maps ``point_inds`` straight to class indices. Traces
        1.. are legend entries only (``x == [None]``), one per group present, then "uncovered".
    """
    xy = _to_numpy(coords).astype(float)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.all(np.isfinite(xy)):
        raise PlotInputError(
            f"coords must be a finite (C, 2) array, got shape {xy.shape}; use confusion.class_map(...)"
        )
    c = xy.shape[0]
    names = _check_names(class_names, c, "coords")
    labels = np.full(c, -1, np.int64) if group_labels is None else _labels(group_labels, "group_labels")
    if labels.shape != (c,):
        raise PlotInputError(
            f"group_labels must have shape ({c},) (one group per class, -1 for none), got {labels.shape}"
        )
    colors = group_colors(labels)
    n_groups = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    gnames = _group_names(group_names, n_groups)
    group_text = ["uncovered" if g < 0 else gnames[g] for g in labels.tolist()]
    show_text = c <= 120 if show_text is None else show_text
    fig = go.Figure(
        go.Scatter(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers+text" if show_text else "markers",
            text=names,
            textposition="top center",
            textfont=dict(size=10 if c <= 60 else 8),
            customdata=np.arange(c),
            hovertext=[f"{names[i]} (class {i})<br>{group_text[i]}" for i in range(c)],
            hovertemplate="%{hovertext}<extra></extra>",
            marker=dict(color=colors, size=marker_size, line=dict(width=0.5, color="white")),
            showlegend=False,
            name="classes",
        )
    )
    if group_labels is not None:
        present = sorted(set(labels.tolist()))
        for g in [g for g in present if g >= 0] + ([-1] if -1 in present else []):
            fig.add_trace(
                go.Scatter(
                    x=[None],
                    y=[None],
                    mode="markers",
                    name="uncovered" if g < 0 else gnames[g],
                    marker=dict(color=UNCOVERED_COLOR if g < 0 else PALETTE[g % len(PALETTE)], size=marker_size),
                    showlegend=True,
                    hoverinfo="skip",
                )
            )
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, title_text="")
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, title_text="", scaleanchor="x")
    _base_layout(fig, title=title, height=650)
    fig.update_layout(legend=dict(itemclick=False, itemdoubleclick=False, title=dict(text="group")))
    return fig


def _distance_linkage(distance: Any, linkage: str) -> np.ndarray:
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    d = _square(distance, "distance")
    if d.shape[0] < 2:
        raise PlotInputError("distance must cover at least 2 classes")
    if not np.all(np.isfinite(d)) or (d < 0).any():
        raise PlotInputError(
            "distance must be finite and non-negative; turn similarities into distances first (e.g. 1 - similarity)"
        )
    if not np.allclose(d, d.T, rtol=1e-6, atol=1e-9):
        raise PlotInputError("distance must be symmetric; pass (D + D.T) / 2")
    if linkage not in _LINKAGES:
        raise PlotInputError(f"unknown linkage {linkage!r}; choose one of {', '.join(_LINKAGES)}")
    return hierarchy.linkage(squareform(d, checks=False), method=linkage)


def dendrogram_order(distance: Any, *, linkage: str = "average") -> np.ndarray:
    """Leaf order of the hierarchical clustering of ``distance``: (C,) permutation for ``order=``.

    Args:
        distance: (C, C) symmetric non-negative distances (diagonal ignored).
        linkage: ``"single" | "complete" | "average" | "weighted" | "ward"``.
    """
    from scipy.cluster import hierarchy

    return np.asarray(hierarchy.leaves_list(_distance_linkage(distance, linkage)), dtype=np.int64)


def dendrogram(
    distance: Any,
    class_names: Sequence[str],
    *,
    linkage: str = "average",
    orientation: str = "left",
    color_threshold: float | None = None,
    title: str | None = "Class dendrogram",
) -> go.Figure:
    """Hierarchical clustering of the classes from a distance matrix (e.g. HD-CNN's D).

    Args:
        distance: (C, C) symmetric non-negative distances (diagonal ignored).
        class_names: (C,) class names (leaf labels).
        linkage: ``"single" | "complete" | "average" | "weighted" | "ward"`` (scipy).
        orientation: ``"left"`` (leaves listed top to bottom, good for many classes) or
            ``"bottom"`` (leaves along the x axis).
        color_threshold: merges below this height share a colour; default scipy's 0.7 * max.
        title: figure title.

    Returns:
        Figure: link traces (one per colour), then a leaf-marker trace whose ``customdata`` are
        class indices; ``layout.meta["leaf_order"]`` is the (C,) leaf order (same as
        :func:`dendrogram_order`).
    """
    from scipy.cluster import hierarchy

    if orientation not in ("left", "bottom"):
        raise PlotInputError(f"orientation must be 'left' or 'bottom', got {orientation!r}")
    z = _distance_linkage(distance, linkage)
    c = z.shape[0] + 1
    names = _check_names(class_names, c, "distance")
    dn = hierarchy.dendrogram(z, no_plot=True, color_threshold=color_threshold, above_threshold_color="above")
    segments: dict[str, tuple[list, list]] = {}
    for ic, dc, col in zip(dn["icoord"], dn["dcoord"], dn["color_list"]):
        xs, ys = segments.setdefault(col, ([], []))
        xs.extend(list(ic) + [None])
        ys.extend(list(dc) + [None])
    leaves = [int(i) for i in dn["leaves"]]
    positions = [5.0 + 10.0 * k for k in range(c)]
    left = orientation == "left"
    fig = go.Figure()
    for k, (col, (pos, height)) in enumerate(sorted(segments.items())):
        color = BASELINE_COLOR if col == "above" else PALETTE[k % len(PALETTE)]
        fig.add_trace(
            go.Scatter(
                x=height if left else pos,
                y=pos if left else height,
                mode="lines",
                line=dict(color=color, width=1.5),
                hoverinfo="skip",
                showlegend=False,
                name=f"links {col}",
            )
        )
    zeros = [0.0] * c
    fig.add_trace(
        go.Scatter(
            x=zeros if left else positions,
            y=positions if left else zeros,
            mode="markers",
            marker=dict(size=4, color="#444444"),
            customdata=leaves,
            hovertext=[f"{names[i]} (class {i})" for i in leaves],
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
            name="leaves",
        )
    )
    leaf_axis = dict(
        tickmode="array",
        tickvals=positions,
        ticktext=[names[i] for i in leaves],
        showgrid=False,
        zeroline=False,
        tickfont=dict(size=10 if c <= 60 else 8),
    )
    dist_axis = dict(title_text=f"{linkage} linkage distance", zeroline=False, rangemode="tozero")
    extent = int(min(3000, max(420, 14 * c + 160)))
    if left:
        fig.update_yaxes(autorange="reversed", **leaf_axis)
        fig.update_xaxes(**dist_axis)
        _base_layout(fig, title=title, height=extent)
    else:
        fig.update_xaxes(tickangle=-90, **leaf_axis)
        fig.update_yaxes(**dist_axis)
        _base_layout(fig, title=title, height=520, width=extent)
    fig.layout.meta = {"leaf_order": leaves}
    return fig


# --------------------------------------------------------------------------------------------
# Tables and comparisons
# --------------------------------------------------------------------------------------------


def _numeric_column(table: pd.DataFrame, column: str, what: str) -> np.ndarray:
    if column not in table.columns:
        raise PlotInputError(f"{what} needs a column {column!r}; the table has {list(table.columns)}")
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
    if np.isnan(values).sum() > table[column].isna().sum():
        raise PlotInputError(f"column {column!r} must be numeric; convert it with pd.to_numeric")
    return values


def quality_bars(
    table: pd.DataFrame,
    *,
    metric: str | Sequence[str],
    title: str | None = "Clustering quality",
) -> go.Figure:
    """Bars comparing clustering methods on one or more quality metrics.

    Args:
        table: one row per method (index = method name), one column per metric.
        metric: column name, or several (one subplot each, sharing the method axis).
        title: figure title.

    Returns:
        Figure with one bar trace per metric, ``x`` the method names in table order, ``y`` the
        metric values.
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise PlotInputError("quality_bars needs a non-empty pandas DataFrame (index = method, columns = metrics)")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if not metrics:
        raise PlotInputError("metric is empty; pass a column name such as 'silhouette'")
    methods = [str(i) for i in table.index]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=metrics if len(metrics) > 1 else None)
    for k, name in enumerate(metrics, start=1):
        values = _numeric_column(table, name, "quality_bars")
        fig.add_trace(
            go.Bar(
                x=methods,
                y=values,
                name=name,
                marker_color=PALETTE[(k - 1) % len(PALETTE)],
                text=[f"{v:.3g}" if np.isfinite(v) else "n/a" for v in values],
                textposition="outside",
                hovertemplate=f"%{{x}}<br>{name}: %{{y:.4g}}<extra></extra>",
                showlegend=False,
            ),
            row=1,
            col=k,
        )
    fig.update_xaxes(title_text="method")
    if len(metrics) == 1:
        fig.update_yaxes(title_text=metrics[0])
    _base_layout(fig, title=title, height=420)
    return fig


def accuracy_bars(
    results: Mapping[str, float],
    *,
    baseline: str | float | None = None,
    title: str | None = "Test top-1 accuracy",
    intervals: Mapping[str, Sequence[float]] | None = None,
) -> go.Figure:
    """Accuracy per model or combination rule, with the change relative to a baseline.

    Args:
        results: name -> accuracy as a fraction in [0, 1] (insertion order is kept).
        baseline: a key of ``results`` (e.g. ``"generalist"``) or an accuracy; bars then carry
            the relative change ``(acc - base) / base`` in their text and hover, and a dashed line
            marks the baseline.
        title: figure title.
        intervals: optional name -> ``[lo, hi]`` 95% interval of each accuracy, drawn as error bars.

    Returns:
        Figure: trace 0 the bars (``x`` names, ``y`` accuracies, ``customdata`` rows
        ``[absolute change, relative change]`` when a baseline is given; ``error_y`` with ``intervals``).
    """
    if not isinstance(results, Mapping) or not results:
        raise PlotInputError("results must be a non-empty dict {name: accuracy}")
    names = [str(k) for k in results]
    acc = np.array([float(v) for v in results.values()])
    if not np.all(np.isfinite(acc)) or (acc < 0).any() or (acc > 1).any():
        raise PlotInputError("accuracies must be fractions in [0, 1] (e.g. 0.431, not 43.1)")
    if isinstance(baseline, str):
        if baseline not in results:
            raise PlotInputError(f"baseline {baseline!r} is not a key of results; choose one of {names}")
        base: float | None = float(results[baseline])
    else:
        base = None if baseline is None else float(baseline)
    colors = [BASELINE_COLOR if isinstance(baseline, str) and n == baseline else NEUTRAL_COLOR for n in names]
    if base is None:
        text = [f"{a:.1%}" for a in acc]
        bar = go.Bar(
            x=names, y=acc, text=text, marker_color=colors, hovertemplate="%{x}<br>accuracy %{y:.2%}<extra></extra>"
        )
    else:
        diff = acc - base
        rel = diff / base if base > 0 else np.full_like(acc, np.nan)
        text = [
            f"{a:.1%}<br>baseline"
            if isinstance(baseline, str) and n == baseline
            else f"{a:.1%}<br>{r:+.1%} rel."
            if np.isfinite(r)
            else f"{a:.1%}"
            for n, a, r in zip(names, acc, rel)
        ]
        bar = go.Bar(
            x=names,
            y=acc,
            text=text,
            marker_color=colors,
            customdata=np.stack([diff, rel], axis=1),
            hovertemplate=(
                "%{x}<br>accuracy %{y:.2%}<br>change %{customdata[0]:+.2%} (absolute)"
                "<br>relative change %{customdata[1]:+.1%}<extra></extra>"
            ),
        )
    fig = go.Figure(bar)
    fig.update_traces(textposition="outside", cliponaxis=False, showlegend=False)
    if intervals is not None:
        lo = np.array([float(intervals[n][0]) if n in intervals else a for n, a in zip(names, acc)])
        hi = np.array([float(intervals[n][1]) if n in intervals else a for n, a in zip(names, acc)])
        fig.update_traces(error_y=dict(type="data", symmetric=False, array=hi - acc, arrayminus=acc - lo, color="#444"))
    if base is not None:
        fig.add_hline(y=base, line=dict(color=BASELINE_COLOR, dash="dash", width=1.5), name="baseline")
    top = float(max(acc.max(), base or 0.0))
    fig.update_yaxes(title_text="top-1 accuracy", tickformat=".0%", range=[0, min(1.0, top * 1.18 + 0.02)])
    _base_layout(fig, title=title, height=440)
    return fig


def _coverage_key(label: str) -> tuple[float, str]:
    digits = "".join(ch for ch in label if ch.isdigit())
    value = float(digits) if digits else math.inf
    return (value + (0.5 if "+" in label else 0.0), label)


def table4_chart(
    table: pd.DataFrame,
    *,
    paper_reference: bool = True,
    title: str | None = "Relative top-1 gain by number of specialists covering the true class",
) -> go.Figure:
    """The paper's Table 4 for this kit: relative gain against coverage, with the JFT numbers.

    Args:
        table: one row per coverage bucket with columns ``coverage`` (int, or a label such as
            ``"3+"``), ``n_examples`` (test examples in the bucket) and ``relative_gain``
            (fraction, e.g. 0.034; ``nan`` for an empty bucket).
        paper_reference: add :data:`PAPER_TABLE4` as a second series.
        title: figure title.

    Returns:
        Figure: trace 0 bars of this kit's gain (``x`` coverage labels as strings, ``customdata``
        n_examples); trace 1 (with ``paper_reference``) the paper's series, ``x`` the keys and
        ``y`` the values of :data:`PAPER_TABLE4`. The category axis runs 0, 1, 2, 3, 3+, 4, ...
    """
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise PlotInputError(
            "table4_chart needs a non-empty DataFrame with columns coverage, n_examples, relative_gain"
        )
    if "coverage" not in table.columns:
        raise PlotInputError(f"table4_chart needs a column 'coverage'; the table has {list(table.columns)}")
    labels = [str(v) for v in table["coverage"].tolist()]
    if len(set(labels)) != len(labels):
        raise PlotInputError("coverage values must be distinct (one row per bucket); aggregate the table first")
    gain = _numeric_column(table, "relative_gain", "table4_chart")
    n = _numeric_column(table, "n_examples", "table4_chart")
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=gain,
            name="this kit",
            marker_color=NEUTRAL_COLOR,
            customdata=n,
            text=[f"{g:+.1%}" if np.isfinite(g) else "" for g in gain],
            textposition="outside",
            cliponaxis=False,
            hovertemplate=(
                "covered by %{x} specialists<br>relative gain %{y:+.1%}<br>"
                "test examples %{customdata:,.0f}<extra>this kit</extra>"
            ),
        )
    )
    categories = list(labels)
    if paper_reference:
        fig.add_trace(
            go.Scatter(
                x=list(PAPER_TABLE4.keys()),
                y=list(PAPER_TABLE4.values()),
                name="paper (JFT, Table 4)",
                mode="lines+markers",
                line=dict(color=BASELINE_COLOR, dash="dot"),
                marker=dict(size=8, symbol="diamond"),
                hovertemplate="covered by %{x} specialists<br>relative gain %{y:+.1%}<extra>paper (JFT)</extra>",
            )
        )
        categories += [k for k in PAPER_TABLE4 if k not in categories]
    fig.update_xaxes(
        title_text="number of specialists covering the true class",
        type="category",
        categoryorder="array",
        categoryarray=sorted(categories, key=_coverage_key),
    )
    span = np.concatenate([gain, list(PAPER_TABLE4.values())]) if paper_reference else gain
    fig.update_yaxes(
        title_text="relative top-1 gain",
        tickformat=_percent_ticks(span, sign=True),
        zeroline=True,
        zerolinecolor="#888888",
    )
    _base_layout(fig, title=title, height=460)
    fig.update_layout(legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"))
    return fig


def _pareto_front(cost: np.ndarray, acc: np.ndarray) -> np.ndarray:
    idx = np.lexsort((-acc, cost))
    front, best = [], -np.inf
    for i in idx.tolist():
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return np.asarray(front, dtype=np.int64)


def accuracy_vs_cost(
    points: pd.DataFrame,
    *,
    cost_label: str = "cost per image",
    log_x: bool = False,
    frontier: bool = True,
    title: str | None = "Accuracy against cost",
) -> go.Figure:
    """Scatter of accuracy against inference cost, one labelled point per model or ensemble.

    Args:
        points: columns ``name``, ``accuracy`` (fraction) and ``cost`` (e.g. FLOPs or ms per image);
            optional ``lo``/``hi`` (the accuracy's 95% interval) draw error bars.
        cost_label: x-axis title (say the unit).
        log_x: logarithmic cost axis.
        frontier: join the Pareto-optimal points (no other point is cheaper and more accurate).
        title: figure title.

    Returns:
        Figure: trace 0 the points in table order (``text`` = names); trace 1 the Pareto front
        (with ``frontier`` and at least 2 points).
    """
    if not isinstance(points, pd.DataFrame) or points.empty:
        raise PlotInputError("accuracy_vs_cost needs a non-empty DataFrame with columns name, accuracy, cost")
    if "name" not in points.columns:
        raise PlotInputError(f"accuracy_vs_cost needs a column 'name'; the table has {list(points.columns)}")
    acc = _numeric_column(points, "accuracy", "accuracy_vs_cost")
    cost = _numeric_column(points, "cost", "accuracy_vs_cost")
    if not (np.all(np.isfinite(acc)) and np.all(np.isfinite(cost))):
        raise PlotInputError("accuracy and cost must be finite numbers; drop incomplete rows first")
    if log_x and (cost <= 0).any():
        raise PlotInputError("log_x needs positive costs; use log_x=False or drop zero-cost rows")
    names = [str(v) for v in points["name"].tolist()]
    pct = _percent_format(acc)
    err = None
    if {"lo", "hi"} <= set(points.columns):
        err = dict(
            type="data",
            symmetric=False,
            array=points["hi"].to_numpy(float) - acc,
            arrayminus=acc - points["lo"].to_numpy(float),
            color="#888",
        )
    fig = go.Figure(
        go.Scatter(
            x=cost,
            y=acc,
            mode="markers+text",
            text=names,
            textposition="top center",
            name="models",
            error_y=err,
            marker=dict(size=11, color=[PALETTE[k % len(PALETTE)] for k in range(len(names))]),
            hovertemplate=f"%{{text}}<br>accuracy %{{y:{'.2%' if pct else '.4g'}}}<br>{cost_label} %{{x:.4g}}<extra></extra>",
            showlegend=False,
        )
    )
    if frontier and len(names) >= 2:
        front = _pareto_front(cost, acc)
        fig.add_trace(
            go.Scatter(
                x=cost[front],
                y=acc[front],
                mode="lines",
                name="Pareto front",
                line=dict(color=BASELINE_COLOR, dash="dash", shape="hv"),
                hoverinfo="skip",
            )
        )
    fig.update_xaxes(title_text=cost_label, type="log" if log_x else "linear")
    fig.update_yaxes(title_text="top-1 accuracy", tickformat=_percent_ticks(acc) if pct else None)
    _base_layout(fig, title=title, height=480)
    return fig


_KIND_SYMBOL = {"generalist": "circle", "ensemble": "diamond", "student": "square"}


def frontier(
    points: pd.DataFrame, *, latency: str = "ms_b256", title: str | None = "Accuracy against inference cost"
) -> go.Figure:
    """Two panels of the same points: accuracy against MFLOPs per image, and against measured latency.

    Args:
        points: a frontier table (``frontier.COLUMNS``): ``name``, ``kind`` (generalist | ensemble | student),
            ``accuracy``, ``lo``/``hi`` (its 95% interval), ``mflops`` and the latency column.
        latency: ``ms_b256`` or ``ms_b1`` (ms per image at that batch size); rows without it are left out of
            the right panel.
        title: figure title.

    Returns:
        Figure with one trace per point kind and panel (markers with interval bars, names as text) and the
        Pareto front of each panel (no other point cheaper and more accurate) as a dashed line.
    """
    if not isinstance(points, pd.DataFrame) or points.empty:
        raise PlotInputError(
            "frontier needs a non-empty frontier table (name, kind, accuracy, lo, hi, mflops, ms_b256)"
        )
    missing = {"name", "kind", "accuracy", "lo", "hi", "mflops", latency} - set(points.columns)
    if missing:
        raise PlotInputError(f"frontier table lacks the columns {sorted(missing)}: make it with specialkit.frontier")
    batch = latency.split("_b")[-1]
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.06,
        subplot_titles=("FLOPs per image (counted)", f"latency per image, batch {batch} (measured)"),
    )
    for col, xcol, label in ((1, "mflops", "MFLOPs per image"), (2, latency, f"ms per image (batch {batch})")):
        df = points[np.isfinite(points[xcol].astype(float))]
        for kind, part in df.groupby("kind", sort=False):
            acc = part["accuracy"].to_numpy(float)
            fig.add_trace(
                go.Scatter(
                    x=part[xcol].to_numpy(float),
                    y=acc,
                    mode="markers+text",
                    text=part["name"].tolist(),
                    textposition="top center",
                    name=str(kind),
                    legendgroup=str(kind),
                    showlegend=col == 1,
                    marker=dict(size=11, symbol=_KIND_SYMBOL.get(str(kind), "circle")),
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=part["hi"].to_numpy(float) - acc,
                        arrayminus=acc - part["lo"].to_numpy(float),
                        color="#888",
                    ),
                    hovertemplate=f"%{{text}}<br>accuracy %{{y:.2%}}<br>{label} %{{x:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        if len(df) >= 2:
            x, y = df[xcol].to_numpy(float), df["accuracy"].to_numpy(float)
            front = _pareto_front(x, y)
            line = dict(color=BASELINE_COLOR, dash="dash", shape="hv")
            fig.add_trace(
                go.Scatter(
                    x=x[front],
                    y=y[front],
                    mode="lines",
                    name="Pareto front",
                    showlegend=col == 1,
                    line=line,
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text=label, type="log", row=1, col=col)
    fig.update_yaxes(title_text="top-1 accuracy (95% interval)", tickformat=".1%", row=1, col=1)
    _base_layout(fig, title=title, height=500)
    return fig


def per_class_change(
    change: Any,
    class_names: Sequence[str],
    *,
    order: Any = None,
    sort: bool = False,
    coverage: Any = None,
    title: str | None = "Per-class accuracy change (ensemble − generalist)",
) -> go.Figure:
    """Bars of the per-class accuracy change, green for gains and red for losses.

    Args:
        change: (C,) accuracy change per class, or the pair ``(gen_acc, ens_acc)`` of (C,)
            per-class accuracies (a (2, C) array); the change is ``ens_acc - gen_acc``.
        class_names: (C,) class names.
        order: (C,) permutation of the bars (e.g. the cluster order); not with ``sort``.
        sort: order the bars by change, largest gain first.
        coverage: optional (C,) int number of specialists covering each class (hover).
        title: figure title.

    Returns:
        Figure: trace 0 bars with ``x`` the (reordered) names, ``y`` the changes and
        ``customdata[i]`` the class index of bar i.
    """
    arr = _to_numpy(change).astype(float)
    if arr.ndim == 2 and arr.shape[0] == 2:
        gen, ens = arr
        delta = ens - gen
    elif arr.ndim == 1:
        gen = ens = None
        delta = arr
    else:
        raise PlotInputError(
            f"change must be (C,) deltas or the pair (gen_acc, ens_acc) of (C,) arrays, got shape {arr.shape}"
        )
    c = delta.shape[0]
    names = _check_names(class_names, c, "change")
    if sort and order is not None:
        raise PlotInputError("pass either order= or sort=True, not both")
    perm = np.argsort(-np.nan_to_num(delta, nan=-np.inf), kind="stable") if sort else _check_order(order, c)
    cov = None if coverage is None else _labels(coverage, "coverage")
    if cov is not None and cov.shape != (c,):
        raise PlotInputError(f"coverage must have shape ({c},), got {cov.shape}")
    hover = []
    for i in perm.tolist():
        line = f"{names[i]} (class {i})<br>change {delta[i]:+.1%}"
        if gen is not None:
            line += f"<br>generalist {gen[i]:.1%} → ensemble {ens[i]:.1%}"
        if cov is not None:
            line += f"<br>covered by {cov[i]} specialist(s)"
        hover.append(line)
    colors = [POSITIVE_COLOR if d > 0 else NEGATIVE_COLOR if d < 0 else BASELINE_COLOR for d in delta[perm]]
    fig = go.Figure(
        go.Bar(
            x=[names[i] for i in perm],
            y=delta[perm],
            marker_color=colors,
            customdata=perm,
            hovertext=hover,
            hovertemplate="%{hovertext}<extra></extra>",
            showlegend=False,
        )
    )
    fig.update_xaxes(
        type="category", title_text="class", tickangle=-90 if c > 12 else 0, tickfont=dict(size=10 if c <= 60 else 7)
    )
    fig.update_yaxes(
        title_text="accuracy change",
        tickformat=_percent_ticks(delta, sign=True),
        zeroline=True,
        zerolinecolor="#888888",
    )
    _base_layout(fig, title=title, height=440, width=int(min(1400, max(700, 9 * c + 160))))
    fig.update_layout(bargap=0.15)
    return fig


# --------------------------------------------------------------------------------------------
# HTML output
# --------------------------------------------------------------------------------------------

_HTML_CONFIG = {"displaylogo": False, "responsive": True}


def figure_to_html_fragment(fig: go.Figure, *, include_plotlyjs: bool = False, div_id: str | None = None) -> str:
    """One figure as an HTML ``<div>`` (no ``<html>``), plotly.js embedded only if asked."""
    if not isinstance(fig, go.Figure):
        raise PlotInputError(f"expected a plotly go.Figure, got {type(fig).__name__}")
    return fig.to_html(full_html=False, include_plotlyjs=include_plotlyjs, config=_HTML_CONFIG, div_id=div_id)


def figures_to_html_fragment(figs: go.Figure | Sequence[go.Figure], *, include_plotlyjs: bool = True) -> list[str]:
    """HTML fragments for a report: plotly.js embedded once, in the first fragment.

    Args:
        figs: one figure or a sequence of figures.
        include_plotlyjs: embed plotly.js (offline) in the first fragment; ``False`` when the page
            already loaded it.

    Returns:
        One ``<div>`` fragment per figure, in order; put them in the page in that order (the
        first must come before the others, since it defines ``Plotly``).
    """
    seq = [figs] if isinstance(figs, go.Figure) else list(figs)
    return [figure_to_html_fragment(f, include_plotlyjs=include_plotlyjs and k == 0) for k, f in enumerate(seq)]


def save_html(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a stand-alone HTML file that works offline (plotly.js embedded).

    The file is written to a temporary name in the same folder and moved into place, so a reader
    never sees a half-written file. Missing parent folders are created.

    Returns:
        The path written.
    """
    if not isinstance(fig, go.Figure):
        raise PlotInputError(f"expected a plotly go.Figure, got {type(fig).__name__}")
    page = fig.to_html(full_html=True, include_plotlyjs=True, config=_HTML_CONFIG)
    target = Path(path)
    from .runs import atomic_write_text

    return atomic_write_text(target, page)


def study_gains(
    summary: pd.DataFrame | Sequence[Mapping[str, Any]],
    key: str,
    *,
    rules: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """A study's gain against one swept ``key``: two panels (over the generalist, over the compute-matched
    generalist), one line per rule (and per value of the other swept keys), the mean across seeds with
    its 95% interval as error bars, a dashed zero line.

    Args:
        summary: rows of ``metrics.study_summary`` (columns ``key``, ``rule``, ``baseline``, ``mean``,
            ``lo``, ``hi``, ``seeds`` and the other swept keys).
        key: the swept setting on the x axis.
        rules: the rules drawn (default every rule in ``summary``).
        title: the figure's title.
    """
    df = pd.DataFrame(list(summary) if not isinstance(summary, pd.DataFrame) else summary)
    if df.empty or key not in df.columns:
        raise PlotInputError(f"study summary has no column {key!r}; pass one of the swept keys")
    others = [
        c
        for c in df.columns
        if c
        not in (
            key,
            "rule",
            "baseline",
            "seeds",
            "mean",
            "lo",
            "hi",
            "verdict",
            "seeds_better",
            "seeds_worse",
            "rule_top1",
            "baseline_top1",
            "interval",
            "p_value",
            "p_holm",
            "tie_margin",
        )
    ]
    rules = list(rules) if rules is not None else list(dict.fromkeys(df["rule"]))
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        subplot_titles=("gain over the generalist", "gain over the compute-matched generalist"),
    )
    palette = pcolors.qualitative.Plotly
    x_text = df[key].map(lambda v: "none" if v is None else str(v))
    order = list(dict.fromkeys(x_text))
    for col, base in enumerate(("generalist", "compute_matched"), start=1):
        sub = df[(df["baseline"] == base) & df["rule"].isin(rules)]
        groups = (
            sub.groupby(others + ["rule"], dropna=False, sort=False) if others else sub.groupby(["rule"], sort=False)
        )
        for k, (label, g) in enumerate(groups):
            label = label if isinstance(label, tuple) else (label,)
            name = ", ".join([f"{o}={v}" for o, v in zip(others, label)] + [str(label[-1])])
            xs = x_text[g.index].tolist()
            mean, lo, hi = g["mean"].to_numpy() * 100, g["lo"].to_numpy() * 100, g["hi"].to_numpy() * 100
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=mean,
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": palette[k % len(palette)]},
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": np.nan_to_num(hi - mean),
                        "arrayminus": np.nan_to_num(mean - lo),
                    },
                    customdata=np.stack([lo, hi, g["seeds"].to_numpy()], axis=1),
                    hovertemplate="%{x}: %{y:+.2f} points [%{customdata[0]:+.2f}, %{customdata[1]:+.2f}], %{customdata[2]} seeds<extra>"
                    + name
                    + "</extra>",
                ),
                row=1,
                col=col,
            )
        fig.add_hline(y=0, line_dash="dash", line_color="#888", row=1, col=col)
        fig.update_xaxes(title_text=key, type="category", categoryorder="array", categoryarray=order, row=1, col=col)
    fig.update_yaxes(title_text="points (mean across seeds, 95% interval)", row=1, col=1)
    return _base_layout(fig, title=title or f"gain against {key}", height=420)
