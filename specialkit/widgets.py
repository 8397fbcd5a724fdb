"""Interactive cluster picker for JupyterLab: edit a :class:`~specialkit.clusters.ClusterSpec` by hand.

The picker only edits plain data (a cluster spec). Everything it shows is computed by pure,
separately tested functions: :func:`compute_spec` (controls → spec, via
:func:`specialkit.clusters.cluster` and :func:`~specialkit.clusters.grow_overlap`),
:func:`apply_edit` (one hand edit → new spec), :func:`specialkit.clusters.quality`,
:func:`specialkit.clusters.order_classes` and the figures of :mod:`specialkit.plots`.

>>> from specialkit import widgets
>>> picker = widgets.ClusterPicker(**widgets.demo_inputs(seed=0), k=3)
>>> picker.spec.num_groups
3
>>> picker            # in a notebook: the controls, heatmap, class map and quality table

From a pipeline run: ``picker = widgets.ClusterPicker.from_run(run)``; the "Save" button then calls
``run.save_clusters(spec)``.

DOM hooks (CSS classes, stable for browser tests): ``specialkit-picker`` (the whole widget),
``specialkit-method``, ``specialkit-k-slider``, ``specialkit-overlap``, ``specialkit-gamma``,
``specialkit-r``, ``specialkit-max-size``, ``specialkit-heatmap`` / ``specialkit-map`` (boxes holding
the plotly FigureWidgets), ``specialkit-class-select``, ``specialkit-group-select``,
``specialkit-move`` / ``-add`` / ``-remove`` / ``-new-group`` / ``-undo`` / ``-save`` (buttons),
``specialkit-status``, ``specialkit-groups``, ``specialkit-quality``. In the quality table each value
cell is ``<td class="specialkit-q" data-key="<quality key>" data-value="<float>">``.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import clusters, plots
from .config import choices_of, picker_settings
from .errors import SpecialkitError

__all__ = [
    "ACTIONS",
    "DEFAULT_METHODS",
    "OVERLAP_RULES",
    "ClusterPicker",
    "Controls",
    "PickerError",
    "apply_edit",
    "compute_spec",
    "demo_inputs",
    "groups_html",
    "next_group_name",
    "points_to_classes",
    "quality_html",
]

DEFAULT_METHODS: tuple[str, ...] = choices_of("method")
"""The methods the dropdown offers: the config's ``method`` choices."""
OVERLAP_RULES: tuple[str, ...] = choices_of("overlap")
"""The overlap rules the dropdown offers: the config's ``overlap`` choices."""
ACTIONS: tuple[str, ...] = ("move", "add", "remove", "new_group")

_QUALITY_LABELS: dict[str, str] = {
    "in_group_error_share": "errors inside a group",
    "errors": "validation errors",
    "groups": "groups",
    "size_min": "smallest group",
    "size_max": "largest group",
    "size_mean": "mean group size",
    "uncovered": "classes in no group",
    "coverage_mean": "groups per class",
    "ari": "ARI vs coarse labels",
    "nmi": "NMI vs coarse labels",
}
_SHARE_KEYS = ("in_group_error_share",)
_FIGURE_SIZE = {"heatmap": (620, 600), "map": (560, 600)}


class PickerError(SpecialkitError, ValueError):
    """Bad input to the cluster picker; the message names the problem and the fix."""


# --------------------------------------------------------------------------- pure functions


@dataclass(frozen=True)
class Controls:
    """The picker's clustering controls (what the dropdowns and sliders hold).

    Attributes:
        method: a name in :data:`specialkit.clusters.METHODS`.
        k: number of groups, ``2 <= k <= C``.
        overlap: ``"none"``, ``"hdcnn"`` or ``"top_r"`` (:func:`specialkit.clusters.grow_overlap`).
        gamma: HD-CNN's γ for ``overlap="hdcnn"``.
        r: classes added per group for ``overlap="top_r"``.
        max_group_size: cap on a group's size when growing overlap; ``None`` = no cap.
        seed: random seed of the clustering method.
    """

    method: str = "covariance_kmeans"
    k: int = 8
    overlap: str = "none"
    gamma: float = 5.0
    r: int = 1
    max_group_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in clusters.METHODS:
            raise PickerError(f"unknown method {self.method!r}; use one of {sorted(clusters.METHODS)}")
        if self.overlap not in OVERLAP_RULES:
            raise PickerError(f"unknown overlap rule {self.overlap!r}; use one of {list(OVERLAP_RULES)}")
        if self.max_group_size is not None and self.max_group_size < 1:
            raise PickerError(f"max_group_size must be >= 1 or None (no cap), got {self.max_group_size}")


def compute_spec(
    controls: Controls,
    *,
    class_names: Sequence[str],
    confusion: np.ndarray,
    covariance: np.ndarray,
    distance: np.ndarray,
) -> clusters.ClusterSpec:
    """The cluster spec the controls describe: a clustering, then (optionally) overlap growth.

    Args:
        controls: method, k, overlap rule and its parameters, seed.
        class_names: (C,) class names.
        confusion: (C, C) validation confusion counts (rows = true class); used by overlap growth.
        covariance: (C, C) prediction covariance (``covariance_kmeans``).
        distance: (C, C) class distance (``spectral``, ``agglomerative``, ``balanced``).

    Returns:
        A new :class:`~specialkit.clusters.ClusterSpec` (deterministic for ``controls.seed``).

    Raises:
        specialkit.clusters.ClusterError: the method cannot make ``k`` groups, bad matrices, ...
    """
    spec = clusters.cluster(
        controls.method,
        cov=covariance,
        distance=distance,
        class_names=class_names,
        k=int(controls.k),
        seed=controls.seed,
    )
    if controls.overlap != "none":
        spec = clusters.grow_overlap(
            spec,
            confusion,
            rule=controls.overlap,
            gamma=float(controls.gamma),
            r=int(controls.r),
            max_size=controls.max_group_size,
        )
    return spec


def next_group_name(spec: clusters.ClusterSpec) -> str:
    """The first free name ``group_NN`` (``NN`` = 00, 01, ...) not used by ``spec``."""
    used = set(spec.names)
    i = 0
    while f"group_{i:02d}" in used:
        i += 1
    return f"group_{i:02d}"


def _class_names_of(spec: clusters.ClusterSpec, classes: Iterable[int | str]) -> list[str]:
    out: list[str] = []
    for c in classes:
        if isinstance(c, str):
            if c not in spec.class_names:
                raise clusters.ClusterSpecError(f"unknown class {c!r}; pick one of the dataset's class names")
            name = c
        else:
            i = int(c)
            if not 0 <= i < spec.num_classes:
                raise clusters.ClusterSpecError(
                    f"class index {i} is outside [0, {spec.num_classes}); pick a listed class"
                )
            name = spec.class_names[i]
        if name not in out:
            out.append(name)
    return out


def apply_edit(
    spec: clusters.ClusterSpec,
    action: str,
    classes: Iterable[int | str],
    group: str | None = None,
) -> clusters.ClusterSpec:
    """One hand edit of a spec, applied to several classes at once (all or nothing).

    Actions:

    * ``"move"``: each class ends up in ``group`` only (taken out of every other group it is in).
    * ``"add"``: each class is also put in ``group`` (overlap); classes already there are skipped.
    * ``"remove"``: each class is taken out of ``group``; classes not in it are skipped.
    * ``"new_group"``: the classes leave their groups and form a new group (named ``group``, or
      :func:`next_group_name` when ``group`` is None).

    Args:
        spec: the spec to edit (not modified).
        action: one of :data:`ACTIONS`.
        classes: class indices or class names (duplicates ignored).
        group: the target group name (required except for ``"new_group"``).

    Returns:
        A new spec.

    Raises:
        specialkit.clusters.ClusterSpecError: no class given, unknown class or group, an edit that
            would leave a group empty (remove the group instead), an edit that changes nothing.
    """
    if action not in ACTIONS:
        raise clusters.ClusterSpecError(f"unknown edit {action!r}; use one of {list(ACTIONS)}")
    names = _class_names_of(spec, classes)
    if not names:
        raise clusters.ClusterSpecError("no class selected; select classes in the list or on the class map first")
    if action == "new_group":
        target = group if group is not None else next_group_name(spec)
        if target in spec.groups:
            raise clusters.ClusterSpecError(f"a group named {target!r} exists already; pick another name")
        out = _without_classes(spec, names, keep=None)
        return out.with_group(target, names)
    if group is None or group not in spec.groups:
        raise clusters.ClusterSpecError(f"no group named {group!r}; pick one of {list(spec.names)}")
    members = spec.groups[group]
    if action == "add":
        new = [c for c in names if c not in members]
        if not new:
            raise clusters.ClusterSpecError(f"{_fmt(names)} already in group {group!r}; nothing to add")
        return _with_groups(spec, {**dict(spec.groups), group: members + tuple(new)})
    if action == "remove":
        gone = [c for c in names if c in members]
        if not gone:
            raise clusters.ClusterSpecError(f"{_fmt(names)} not in group {group!r}; nothing to remove")
        if len(gone) == len(members):
            raise clusters.ClusterSpecError(
                f"removing {_fmt(gone)} would leave group {group!r} empty; a group needs at least one class — "
                "move a class into it first, or move its classes to other groups"
            )
        return _with_groups(spec, {**dict(spec.groups), group: tuple(c for c in members if c not in gone)})
    out = _without_classes(spec, names, keep=group)
    new = [c for c in names if c not in out.groups[group]]
    if not new and out == spec:
        raise clusters.ClusterSpecError(f"{_fmt(names)} already only in group {group!r}; nothing to move")
    return _with_groups(out, {**dict(out.groups), group: out.groups[group] + tuple(new)})


def _with_groups(spec: clusters.ClusterSpec, groups: dict[str, tuple[str, ...]]) -> clusters.ClusterSpec:
    return clusters.ClusterSpec(groups=groups, class_names=spec.class_names)


def _fmt(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return f"classes {shown}{', ...' if len(names) > 5 else ''} are" if len(names) > 1 else f"class {shown} is"


def _without_classes(spec: clusters.ClusterSpec, names: Sequence[str], *, keep: str | None) -> clusters.ClusterSpec:
    drop = set(names)
    groups: dict[str, tuple[str, ...]] = {}
    for g, members in spec.groups.items():
        rest = members if g == keep else tuple(c for c in members if c not in drop)
        if not rest:
            raise clusters.ClusterSpecError(
                f"moving {_fmt([c for c in members])} would leave group {g!r} empty; a group needs at least one "
                "class — add the class to the other group instead (overlap), or move another class into it first"
            )
        groups[g] = rest
    return _with_groups(spec, groups)


def points_to_classes(point_inds: Iterable[int], customdata: Sequence[Any] | None = None) -> list[int]:
    """Class indices of the points a click or selection on the class map reported.

    Args:
        point_inds: positions of the points in trace 0 (plotly ``Points.point_inds``).
        customdata: trace 0's ``customdata`` (class index of every point), or None when the points
            are in class-index order.

    Returns:
        Class indices, in the order given, duplicates dropped.
    """
    out: list[int] = []
    for i in point_inds:
        c = int(np.asarray(customdata[int(i)]).ravel()[0]) if customdata is not None else int(i)
        if c not in out:
            out.append(c)
    return out


def _format_value(key: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if key in _SHARE_KEYS:
        return f"{value:.1%}"
    if float(value).is_integer():
        return f"{int(value):,d}"
    return f"{value:.3f}"


def quality_html(quality: dict[str, float]) -> str:
    """An HTML table of :func:`specialkit.clusters.quality`; every value cell carries its raw number.

    Each value is ``<td class="specialkit-q" data-key="KEY" data-value="FLOAT">shown</td>`` so tests
    and scripts can read the numbers from the page (``data-value`` is ``repr(float)``, ``nan`` for
    a missing value).
    """
    rows = []
    for key, value in quality.items():
        label = _QUALITY_LABELS.get(key, key.replace("_", " "))
        raw = "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))
        rows.append(
            f'<tr><th style="text-align:left;padding-right:1em;font-weight:normal">{html.escape(label)}</th>'
            f'<td class="specialkit-q" data-key="{html.escape(key)}" data-value="{raw}" '
            f'style="text-align:right">{_format_value(key, value)}</td></tr>'
        )
    return f'<table class="specialkit-quality-table"><caption style="text-align:left"><b>Quality</b></caption>{"".join(rows)}</table>'


def groups_html(spec: clusters.ClusterSpec, *, max_classes: int = 40) -> str:
    """An HTML list of the groups: name, size and classes (classes in several groups in italics)."""
    cov = spec.coverage()
    index = {c: i for i, c in enumerate(spec.class_names)}
    items = []
    for g, members in spec.groups.items():
        shown = [f"<i>{html.escape(c)}</i>" if cov[index[c]] > 1 else html.escape(c) for c in members[:max_classes]]
        more = f" … (+{len(members) - max_classes})" if len(members) > max_classes else ""
        items.append(
            f'<li data-group="{html.escape(g)}"><b>{html.escape(g)}</b> ({len(members)}): {", ".join(shown)}{more}</li>'
        )
    uncovered = spec.uncovered()
    tail = f"<li><b>in no group</b> ({len(uncovered)}): {html.escape(', '.join(uncovered))}</li>" if uncovered else ""
    return f'<ul style="margin:0;padding-left:1.2em">{"".join(items)}{tail}</ul>'


def demo_inputs(seed: int = 0, *, num_classes: int = 12, blocks: int = 3, per_class: int = 40) -> dict[str, Any]:
    """Synthetic inputs for a :class:`ClusterPicker`: classes confused within hidden blocks.

    Class ``c`` belongs to block ``c % blocks`` (interleaved, so a block-reordered heatmap differs
    from class order). Each example's logits favour its own class and, less, the classes of its
    block; the confusion statistics come from :func:`specialkit.confusion.summarise` and the map
    is the PCA of the covariance (fast, no UMAP), each block's classes spread on a small ring.

    Returns:
        Keyword arguments ``class_names, confusion, covariance, distance, coords, coarse_of_class``
        (the hidden blocks).
    """
    from . import confusion as confusion_mod

    rng = np.random.default_rng(seed)
    c = int(num_classes)
    if blocks < 1 or c < 2 * blocks:
        raise PickerError(f"need num_classes >= 2 * blocks, got {num_classes} classes and {blocks} blocks")
    block = np.arange(c) % blocks
    y = np.repeat(np.arange(c), per_class)
    same_block = (block[y][:, None] == block[None, :]).astype(np.float64)
    logits = rng.normal(0.0, 0.6, size=(len(y), c)) + 1.6 * same_block * rng.uniform(0.5, 1.5, size=(len(y), 1))
    logits[np.arange(len(y)), y] += 1.2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    names = tuple(f"c{i:02d}" for i in range(c))
    cs = confusion_mod.summarise(y, probs, names)
    coords = confusion_mod.class_map(cs.covariance, method="pca", seed=seed)
    span = float(np.ptp(coords, axis=0).max()) or 1.0
    for b in range(blocks):  # spread each block on a small ring so the labels stay readable
        members = np.flatnonzero(block == b)
        angle = 2 * np.pi * np.arange(len(members)) / len(members)
        coords[members] += 0.08 * span * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return dict(
        class_names=names,
        confusion=cs.cm,
        covariance=cs.covariance,
        distance=cs.distance,
        coords=coords,
        coarse_of_class=block.astype(np.int64),
    )


# --------------------------------------------------------------------------- the widget


def _matrix(x: Any, c: int, name: str) -> np.ndarray:
    m = np.asarray(x, dtype=np.float64)
    if m.shape != (c, c):
        raise PickerError(
            f"{name} must be ({c}, {c}) for {c} class names, got shape {m.shape}; "
            "pass the matrices of confusion.summarise(...)"
        )
    return m


def _sync_figure(widget: Any, fig: Any) -> None:
    """Make FigureWidget ``widget`` show ``fig`` while keeping its trace-0 object (and callbacks)."""
    if len(widget.data) > 1:
        widget.data = widget.data[:1]
    first = fig.data[0].to_plotly_json()
    first.pop("type", None)
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    with widget.batch_update():
        widget.data[0].update(first, overwrite=True)
        widget.layout.update(layout, overwrite=True)
    if len(fig.data) > 1:
        widget.add_traces(list(fig.data[1:]))


class ClusterPicker:
    """Choose the specialists' class groups by clustering, then edit them by hand.

    Controls: clustering method, k, overlap rule (none / HD-CNN γ / top-r, with a cap on group
    size). Views: the confusion heatmap reordered by groups (group blocks outlined), the class map
    coloured by group (click a point or lasso several to select classes), the quality table
    (:func:`specialkit.clusters.quality`) and the list of groups. Edits: move / add (overlap) /
    remove / new group for the selected classes, undo, save.

    Args:
        class_names: (C,) class names.
        confusion: (C, C) validation confusion counts, rows = true class.
        covariance: (C, C) prediction covariance.
        distance: (C, C) class distance (HD-CNN's).
        coords: (C, 2) class map coordinates (e.g. UMAP).
        initial: the spec to start from; default: the clustering the controls describe.
        methods: the method names offered in the dropdown.
        method: the initially selected method (default ``methods[0]``).
        k: the initial number of groups (default ``initial.num_groups``, else ``max(2, C // 8)``).
        overlap, gamma, r, max_group_size: the initial overlap controls (``max_group_size`` None =
            no cap; the widget shows 0 for no cap).
        seed: random seed of the clustering methods.
        coarse_of_class: (C,) int reference grouping for the ARI/NMI quality measures, optional.
        save_path: where "Save" writes the spec as JSON (atomically).
        on_save: called with the spec when "Save" is pressed (e.g. ``run.save_clusters``).

    Attributes:
        spec: the current :class:`~specialkit.clusters.ClusterSpec` (read-only property).
        widget: the ipywidgets box to display (displaying the picker shows it too).
        heatmap, class_map: the plotly ``FigureWidget`` views.
    """

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        confusion: np.ndarray,
        covariance: np.ndarray,
        distance: np.ndarray,
        coords: np.ndarray,
        initial: clusters.ClusterSpec | None = None,
        methods: Sequence[str] = DEFAULT_METHODS,
        method: str | None = None,
        k: int | None = None,
        overlap: str = "none",
        gamma: float = 5.0,
        r: int = 1,
        max_group_size: int | None = None,
        seed: int = 0,
        coarse_of_class: np.ndarray | None = None,
        save_path: str | os.PathLike | None = None,
        on_save: Callable[[clusters.ClusterSpec], Any] | None = None,
    ) -> None:
        self.class_names = tuple(str(c) for c in class_names)
        c = len(self.class_names)
        if c < 2:
            raise PickerError(f"need at least 2 classes, got {c}; pass the dataset's class_names")
        self.confusion = _matrix(confusion, c, "confusion")
        self.covariance = _matrix(covariance, c, "covariance")
        self.distance = _matrix(distance, c, "distance")
        self.coords = np.asarray(coords, dtype=np.float64)
        if self.coords.shape != (c, 2):
            raise PickerError(
                f"coords must be ({c}, 2), one point per class, got shape {self.coords.shape}; use run.class_map()"
            )
        self.coarse_of_class = None if coarse_of_class is None else np.asarray(coarse_of_class)
        methods = tuple(methods)
        method = method or methods[0]
        methods = methods if method in methods else (method, *methods)
        unknown = [m for m in methods if m not in clusters.METHODS]
        if unknown:
            raise PickerError(f"unknown methods {unknown}; use names from {sorted(clusters.METHODS)}")
        if initial is not None:
            initial = initial.for_dataset(self.class_names)
        if k is None:
            k = initial.num_groups if initial is not None else max(2, c // 8)
        controls = Controls(
            method=method,
            k=int(min(max(2, k), c)),
            overlap=overlap,
            gamma=float(gamma),
            r=int(r),
            max_group_size=max_group_size,
            seed=int(seed),
        )
        k_max = min(c, max(c // 2, controls.k, initial.num_groups if initial is not None else 2))
        self.save_path = None if save_path is None else Path(save_path)
        self.on_save = on_save
        self._updating = False
        self._history: list[tuple[clusters.ClusterSpec, Controls]] = []
        self._build_controls(methods, controls, k_max)
        self._build_editor()
        self._controls = controls
        self._spec = initial if initial is not None else compute_spec(controls, **self._inputs())
        self._build_figures()
        self.widget = self._layout()
        self._sync_enabled()
        self._refresh()

    def _build_controls(self, methods: tuple[str, ...], controls: Controls, k_max: int) -> None:
        import ipywidgets as w

        c, style = len(self.class_names), {"description_width": "initial"}
        self.method_dropdown = w.Dropdown(
            options=list(methods), value=controls.method, description="method", style=style
        )
        self.k_slider = w.IntSlider(
            value=controls.k, min=2, max=k_max, step=1, description="k (groups)", continuous_update=False, style=style
        )
        self.overlap_dropdown = w.Dropdown(
            options=list(OVERLAP_RULES), value=controls.overlap, description="overlap", style=style
        )
        self.gamma_slider = w.FloatSlider(
            value=controls.gamma,
            min=0.5,
            max=max(20.0, controls.gamma),
            step=0.5,
            description="γ (hdcnn)",
            continuous_update=False,
            style=style,
        )
        self.r_slider = w.IntSlider(
            value=controls.r,
            min=0,
            max=max(1, min(c - 1, 20), controls.r),
            description="r (top_r)",
            continuous_update=False,
            style=style,
        )
        self.max_size = w.BoundedIntText(
            value=controls.max_group_size or 0,
            min=0,
            max=c,
            description="max group size (0 = any)",
            style=style,
            layout=w.Layout(width="230px"),
        )
        for widget, css in [
            (self.method_dropdown, "method"),
            (self.k_slider, "k-slider"),
            (self.overlap_dropdown, "overlap"),
            (self.gamma_slider, "gamma"),
            (self.r_slider, "r"),
            (self.max_size, "max-size"),
        ]:
            widget.add_class(f"specialkit-{css}")
            widget.observe(self._on_controls, names="value")

    def _build_editor(self) -> None:
        import ipywidgets as w

        style = {"description_width": "initial"}
        self.class_select = w.SelectMultiple(
            options=[], rows=8, description="classes", style=style, layout=w.Layout(width="330px")
        )
        self.class_select.add_class("specialkit-class-select")
        self.class_select.observe(self._highlight, names="value")
        self.group_select = w.Dropdown(options=[], description="group", style=style, layout=w.Layout(width="330px"))
        self.group_select.add_class("specialkit-group-select")
        self.buttons: dict[str, Any] = {}
        for key, label, tip in [
            ("move", "Move to group", "the selected classes end up in this group only"),
            ("add", "Add to group", "also put the selected classes in this group (overlap)"),
            ("remove", "Remove from group", "take the selected classes out of this group"),
            ("new_group", "New group", "the selected classes leave their groups and form a new one"),
            ("undo", "Undo", "go back one step"),
            ("save", "Save", "write the spec as JSON"),
        ]:
            button = w.Button(description=label, tooltip=tip, layout=w.Layout(width="160px"))
            button.add_class(f"specialkit-{key.replace('_', '-')}")
            self.buttons[key] = button
        for key in ("move", "add", "remove", "new_group"):
            self.buttons[key].on_click(lambda _b, action=key: self.edit(action))
        self.buttons["undo"].on_click(lambda _b: self.undo())
        self.buttons["save"].on_click(lambda _b: self._save_clicked())
        self.buttons["save"].disabled = self.save_path is None and self.on_save is None
        self.status, self.quality_view, self.groups_view = w.HTML(), w.HTML(), w.HTML()
        self.status.add_class("specialkit-status")
        self.quality_view.add_class("specialkit-quality")
        self.groups_view.add_class("specialkit-groups")

    def _build_figures(self) -> None:
        import plotly.graph_objects as go

        self.heatmap = go.FigureWidget(self._heatmap_figure())
        self.class_map = go.FigureWidget(self._map_figure())
        self.class_map.layout.dragmode = "lasso"
        self.class_map.data[0].on_click(self._on_map_click)
        self.class_map.data[0].on_selection(self._on_map_selection)

    def _layout(self) -> Any:
        import ipywidgets as w

        b = self.buttons
        heat_box, map_box = w.Box([self.heatmap]), w.Box([self.class_map])
        heat_box.add_class("specialkit-heatmap")
        map_box.add_class("specialkit-map")
        controls = w.HBox(
            [
                self.method_dropdown,
                self.k_slider,
                self.overlap_dropdown,
                self.gamma_slider,
                self.r_slider,
                self.max_size,
            ],
            layout=w.Layout(flex_flow="row wrap"),
        )
        editor = w.VBox(
            [
                self.class_select,
                self.group_select,
                w.HBox([b["move"], b["add"]]),
                w.HBox([b["remove"], b["new_group"]]),
                w.HBox([b["undo"], b["save"]]),
                self.status,
                self.quality_view,
            ],
            layout=w.Layout(min_width="340px"),
        )
        views = w.HBox([heat_box, map_box, editor], layout=w.Layout(flex_flow="row wrap"))
        box = w.VBox([controls, views, self.groups_view])
        box.add_class("specialkit-picker")
        return box

    # -- construction from a pipeline run

    @classmethod
    def from_run(cls, run: Any, **kwargs: Any) -> ClusterPicker:
        """A picker on a :class:`specialkit.pipeline.Run`: its confusion, class map and clusters.

        The picker starts from ``run.clusters()`` (the saved spec, e.g. an earlier hand edit) with
        the k slider at its number of groups, and the other controls from the ``run.config`` settings
        whose metadata names a picker control (:func:`specialkit.config.picker_settings`: method,
        overlap, gamma, top_r, max_group_size) and its seed; "Save" calls ``run.save_clusters``.
        ``kwargs`` override any constructor argument.
        """
        ds, cs, cfg = run.dataset(), run.confusion(), run.config
        args = dict(
            class_names=ds.class_names,
            confusion=cs.cm,
            covariance=cs.covariance,
            distance=run.distance(),
            coords=run.class_map(),
            initial=run.clusters(),
            coarse_of_class=getattr(ds, "coarse_of_class", None),
            seed=cfg.seed,
            on_save=run.save_clusters,
        )
        args.update(
            {arg: getattr(cfg, name) for name, arg in picker_settings().items() if arg != "k"}
        )  # k: the spec's groups
        return cls(**{**args, **kwargs})

    # -- state

    @property
    def spec(self) -> clusters.ClusterSpec:
        """The current cluster spec."""
        return self._spec

    @property
    def controls(self) -> Controls:
        """The clustering controls as they stand."""
        return self._controls

    @property
    def history(self) -> tuple[clusters.ClusterSpec, ...]:
        """Earlier specs, oldest first (what :meth:`undo` goes back through)."""
        return tuple(s for s, _ in self._history)

    @property
    def selected(self) -> tuple[int, ...]:
        """Indices of the classes selected in the class list."""
        return tuple(self.class_select.value)

    def _inputs(self) -> dict[str, Any]:
        return dict(
            class_names=self.class_names, confusion=self.confusion, covariance=self.covariance, distance=self.distance
        )

    def _read_controls(self) -> Controls:
        return Controls(
            method=self.method_dropdown.value,
            k=int(self.k_slider.value),
            overlap=self.overlap_dropdown.value,
            gamma=float(self.gamma_slider.value),
            r=int(self.r_slider.value),
            max_group_size=int(self.max_size.value) or None,
            seed=self._controls.seed,
        )

    def _write_controls(self, controls: Controls) -> None:
        self._updating = True
        try:
            self.method_dropdown.value = controls.method
            self.k_slider.value = controls.k
            self.overlap_dropdown.value = controls.overlap
            self.gamma_slider.value = controls.gamma
            self.r_slider.value = controls.r
            self.max_size.value = controls.max_group_size or 0
        finally:
            self._updating = False
        self._controls = controls

    def _set_spec(self, spec: clusters.ClusterSpec, controls: Controls, message: str) -> None:
        self._history.append((self._spec, self._controls))
        self._spec, self._controls = spec, controls
        self._show(message)
        self._refresh()

    def _show(self, message: str, *, error: bool = False) -> None:
        color = "#b00020" if error else "#1b5e20"
        kind = "error" if error else "ok"
        self.status.value = f'<span class="specialkit-{kind}" style="color:{color}">{html.escape(message)}</span>'

    # -- actions (also callable from code)

    def recompute(self) -> clusters.ClusterSpec:
        """Re-run the clustering the controls describe (replacing hand edits; undo goes back)."""
        try:
            controls = self._read_controls()
            spec = compute_spec(controls, **self._inputs())
        except Exception as err:  # noqa: BLE001 -- a UI action: report any failure in the status line, keep the spec
            self._show(f"could not cluster: {type(err).__name__}: {err}", error=True)
            return self._spec
        self._set_spec(
            spec, controls, f"{controls.method}, k={controls.k}, overlap={controls.overlap}: {spec.num_groups} groups"
        )
        return spec

    def edit(self, action: str, classes: Iterable[int | str] | None = None, group: str | None = None) -> bool:
        """Apply :func:`apply_edit` to the selected classes (or ``classes``) and the chosen group.

        Returns:
            True when the spec changed; False when the edit was refused (the reason is shown in the
            status line, the spec is unchanged).
        """
        classes = self.selected if classes is None else tuple(classes)
        target = group if group is not None else (None if action == "new_group" else self.group_select.value)
        try:
            spec = apply_edit(self._spec, action, classes, target)
        except ValueError as err:
            self._show(str(err), error=True)
            return False
        names = _class_names_of(self._spec, classes)
        where = target if target is not None else list(spec.names)[-1]
        verb = {"move": "moved to", "add": "added to", "remove": "removed from", "new_group": "formed new group"}[
            action
        ]
        self._set_spec(spec, self._controls, f"{', '.join(names)} {verb} {where}")
        if action == "new_group":
            self.group_select.value = where
        return True

    def undo(self) -> bool:
        """Go back one step (an edit or a re-clustering). Returns False when there is nothing to undo."""
        if not self._history:
            self._show("nothing to undo", error=True)
            return False
        spec, controls = self._history.pop()
        self._spec = spec
        self._write_controls(controls)
        self._show(f"undone: back to {spec.num_groups} groups")
        self._refresh()
        return True

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the spec as JSON (atomically) to ``path`` or ``save_path``, then call ``on_save``.

        Returns:
            The path written, or None when only ``on_save`` was called.
        """
        target = Path(path) if path is not None else self.save_path
        if target is None and self.on_save is None:
            raise PickerError("no save_path: pass save_path= to ClusterPicker (or on_save=), or call save(path)")
        written = self._spec.save(target) if target is not None else None
        if self.on_save is not None:
            self.on_save(self._spec)
        return written

    def _save_clicked(self) -> None:
        try:
            written = self.save()
        except (OSError, ValueError) as err:
            self._show(f"could not save: {err}", error=True)
            return
        self._show(f"saved {self._spec.num_groups} groups" + (f" to {written}" if written else ""))

    def select_classes(self, classes: Iterable[int | str], *, extend: bool = False) -> tuple[int, ...]:
        """Select classes (indices or names) in the class list; ``extend`` adds to the selection."""
        idx = [self.class_names.index(c) if isinstance(c, str) else int(c) for c in classes]
        chosen = list(self.class_select.value) + idx if extend else idx
        self.class_select.value = tuple(dict.fromkeys(i for i in chosen if 0 <= i < len(self.class_names)))
        self._show(f"selected {', '.join(self.class_names[i] for i in self.class_select.value) or 'nothing'}")
        return self.selected

    # -- events

    def _sync_enabled(self) -> None:
        self.gamma_slider.disabled = self.overlap_dropdown.value != "hdcnn"
        self.r_slider.disabled = self.overlap_dropdown.value != "top_r"
        self.max_size.disabled = self.overlap_dropdown.value == "none"

    def _on_controls(self, change: dict) -> None:
        self._sync_enabled()
        if not self._updating:
            self.recompute()

    def _on_map_click(self, trace: Any, points: Any, state: Any = None) -> None:
        classes = points_to_classes(points.point_inds, getattr(trace, "customdata", None))
        if classes:
            self.select_classes(classes, extend=bool(getattr(state, "shift", False) or getattr(state, "ctrl", False)))

    def _on_map_selection(self, trace: Any, points: Any, selector: Any = None) -> None:
        classes = points_to_classes(points.point_inds, getattr(trace, "customdata", None))
        self.select_classes(classes)

    # -- views

    def _heatmap_figure(self) -> Any:
        spec = self._spec
        fig = plots.confusion_heatmap(
            self.confusion,
            self.class_names,
            order=clusters.order_classes(spec),
            groups=[i.tolist() for i in spec.indices()],
            group_names=list(spec.names),
            title=f"Confusion (val), ordered by {spec.num_groups} groups",
        )
        width, height = _FIGURE_SIZE["heatmap"]
        fig.update_layout(width=width, height=height, uirevision="specialkit-picker")
        return fig

    def _map_figure(self) -> Any:
        spec = self._spec
        fig = plots.class_map(
            self.coords,
            self.class_names,
            group_labels=clusters.group_labels(spec),
            group_names=list(spec.names),
            title="Class map (click or lasso to select)",
        )
        fig.data[0].marker.symbol = ["diamond" if n > 1 else "circle" for n in spec.coverage()]
        fig.data[0].marker.line = self._marker_line()
        width, height = _FIGURE_SIZE["map"]
        fig.update_layout(
            width=width, height=height, margin=dict(l=20, r=20, t=50, b=20), uirevision="specialkit-picker"
        )
        return fig

    def _marker_line(self) -> dict[str, list]:
        chosen = set(self.class_select.value)
        c = len(self.class_names)
        return dict(
            width=[3.0 if i in chosen else 0.5 for i in range(c)],
            color=["black" if i in chosen else "white" for i in range(c)],
        )

    def _highlight(self, change: dict | None = None) -> None:
        if self._updating:
            return
        trace = self.class_map.data[0]
        with self.class_map.batch_update():
            trace.marker.line = self._marker_line()
            trace.selectedpoints = None  # the outline marks the selection; no plotly.js dimming

    def _refresh(self) -> None:
        spec = self._spec
        _sync_figure(self.heatmap, self._heatmap_figure())
        q = clusters.quality(spec, self.confusion, coarse_of_class=self.coarse_of_class)
        self.quality_view.value = quality_html(q)
        self.groups_view.value = f"<b>Groups</b> (<i>italic</i> = in several groups){groups_html(spec)}"
        member = spec.membership()
        labels = []
        for i, name in enumerate(self.class_names):
            where = ", ".join(g for g, m in zip(spec.names, member[:, i]) if m) or "no group"
            labels.append((f"{name}  [{where}]", i))
        selected = tuple(self.class_select.value)
        self._updating = True
        try:
            self.class_select.options = labels
            self.class_select.value = selected
            current = self.group_select.value
            self.group_select.options = list(spec.names)
            self.group_select.value = current if current in spec.groups else spec.names[0]
        finally:
            self._updating = False
        _sync_figure(self.class_map, self._map_figure())
        self._highlight()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"ClusterPicker({len(self.class_names)} classes, {self._spec!r})"
