"""The cluster picker without a browser: pure edit functions, and the widget driven from code."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

from specialkit import clusters, widgets
from specialkit.clusters import ClusterSpec, ClusterSpecError


@pytest.fixture(scope="module")
def inputs() -> dict:
    """12 classes in 3 hidden blocks (class c in block c % 3)."""
    return widgets.demo_inputs(seed=0, num_classes=12, blocks=3)


@pytest.fixture
def picker(inputs, tmp_path) -> widgets.ClusterPicker:
    # agglomerative: deterministic and the cheapest method (k-means restarts cost ~0.5 s a click)
    return widgets.ClusterPicker(**inputs, method="agglomerative", k=3, save_path=tmp_path / "clusters.json")


@pytest.fixture
def spec() -> ClusterSpec:
    return ClusterSpec(
        groups={"a": ("x", "y"), "b": ("z",), "c": ("u", "v")}, class_names=("x", "y", "z", "u", "v", "w")
    )


def _quality(picker: widgets.ClusterPicker) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', picker.quality_view.value)}


def _heatmap_state(picker: widgets.ClusterPicker) -> tuple:
    trace = picker.heatmap.data[0]
    return (
        tuple(trace.meta["order"]),
        tuple(trace.x),
        tuple(s.name for s in picker.heatmap.layout.shapes),
        np.asarray(trace.z).tobytes(),
    )


def _dom_classes(widget) -> set[str]:
    found = set(getattr(widget, "_dom_classes", ()))
    for child in getattr(widget, "children", ()):
        found |= _dom_classes(child)
    return found


# --------------------------------------------------------------------------- pure functions


def test_demo_inputs_have_block_structure(inputs):
    c = len(inputs["class_names"])
    assert c == 12 and inputs["confusion"].shape == (c, c) and inputs["coords"].shape == (c, 2)
    cm = inputs["confusion"]
    block = inputs["coarse_of_class"]
    off = ~np.eye(c, dtype=bool)
    same = block[:, None] == block[None, :]
    assert cm[off & same].sum() > 5 * cm[off & ~same].sum()


def test_compute_spec_recovers_blocks_and_grows_overlap(inputs):
    kw = {k: inputs[k] for k in ("class_names", "confusion", "covariance", "distance")}
    spec = widgets.compute_spec(widgets.Controls(method="spectral", k=3), **kw)
    q = clusters.quality(spec, inputs["confusion"], coarse_of_class=inputs["coarse_of_class"])
    assert spec.num_groups == 3 and spec.is_partition() and q["ari"] == pytest.approx(1.0)
    grown = widgets.compute_spec(widgets.Controls(method="spectral", k=3, overlap="top_r", r=2), **kw)
    growth = grown.sizes() - spec.sizes()
    assert growth.max() == 2 and growth.min() >= 0 and not grown.is_partition()
    capped = widgets.compute_spec(
        widgets.Controls(method="spectral", k=3, overlap="top_r", r=2, max_group_size=5), **kw
    )
    assert capped.sizes().max() == 5
    with pytest.raises(clusters.ClusterError, match="k must be"):
        widgets.compute_spec(widgets.Controls(method="spectral", k=13), **kw)


def test_controls_reject_unknown_options():
    with pytest.raises(widgets.PickerError, match="unknown method"):
        widgets.Controls(method="kmedoids")
    with pytest.raises(widgets.PickerError, match="overlap"):
        widgets.Controls(overlap="soft")
    with pytest.raises(widgets.PickerError, match="max_group_size"):
        widgets.Controls(max_group_size=0)


def test_apply_edit_move_add_remove_new_group(spec):
    moved = widgets.apply_edit(spec, "move", ["y"], "c")
    assert dict(moved.groups) == {"a": ("x",), "b": ("z",), "c": ("u", "v", "y")}
    added = widgets.apply_edit(spec, "add", [0, "z"], "c")  # indices and names both work
    assert added.groups["c"] == ("u", "v", "x", "z") and added.coverage()[0] == 2
    removed = widgets.apply_edit(added, "remove", ["x", "z", "y"], "c")  # "y" is not in "c": skipped
    assert removed == spec
    new = widgets.apply_edit(spec, "new_group", [1, 3])
    assert dict(new.groups) == {"a": ("x",), "b": ("z",), "c": ("v",), "group_00": ("y", "u")}
    # moving an overlapping class leaves it in the target group only
    both = widgets.apply_edit(spec, "add", ["x"], "c")
    assert dict(widgets.apply_edit(both, "move", ["x"], "c").groups) == {"a": ("y",), "b": ("z",), "c": ("u", "v", "x")}
    assert spec.groups["a"] == ("x", "y")  # inputs never change


@pytest.mark.parametrize(
    "action, classes, group, message",
    [
        ("remove", ["z"], "b", "empty"),  # the last class of a group
        ("move", ["z"], "a", "empty"),
        ("remove", ["x", "y"], "a", "empty"),
        ("add", ["x"], "a", "already in group"),
        ("remove", ["z"], "a", "not in group"),
        ("move", ["x"], "nope", "no group named"),
        ("move", [], "a", "no class selected"),
        ("move", [17], "a", "outside"),
        ("shuffle", ["x"], "a", "unknown edit"),
        ("new_group", ["x"], "a", "exists already"),
    ],
)
def test_apply_edit_refuses_invalid_edits(spec, action, classes, group, message):
    with pytest.raises(ClusterSpecError, match=message):
        widgets.apply_edit(spec, action, classes, group)


def test_points_to_classes_uses_customdata():
    assert widgets.points_to_classes([2, 0, 2]) == [2, 0]
    assert widgets.points_to_classes([0, 1], customdata=[[5], [3]]) == [5, 3]
    assert widgets.points_to_classes([]) == []


def test_quality_html_carries_raw_numbers():
    out = widgets.quality_html({"in_group_error_share": 0.8125, "errors": 32.0, "ari": float("nan")})
    cells = dict(re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', out))
    assert float(cells["in_group_error_share"]) == 0.8125 and cells["ari"] == "nan"
    assert "81.2%" in out and "n/a" in out


def test_next_group_name(spec):
    assert widgets.next_group_name(spec) == "group_00"
    assert widgets.next_group_name(spec.with_group("group_00", ["w"])) == "group_01"


# --------------------------------------------------------------------------- the widget


def test_picker_starts_from_controls_and_exposes_dom_hooks(picker, inputs):
    kw = {k: inputs[k] for k in ("class_names", "confusion", "covariance", "distance")}
    assert picker.spec == widgets.compute_spec(widgets.Controls(method="agglomerative", k=3), **kw)
    assert picker.method_dropdown.options == widgets.DEFAULT_METHODS and picker.method_dropdown.value == "agglomerative"
    assert picker.k_slider.value == 3 and picker.history == ()
    assert picker.group_select.value == picker.spec.names[0] and picker.group_select.options == picker.spec.names
    assert _quality(picker)["groups"] == 3.0
    assert list(picker.heatmap.data[0].meta["order"]) == clusters.order_classes(picker.spec).tolist()
    assert len(picker.class_map.data[0].x) == 12 and list(picker.class_map.data[0].customdata) == list(range(12))
    hooks = {
        "specialkit-picker",
        "specialkit-k-slider",
        "specialkit-method",
        "specialkit-overlap",
        "specialkit-heatmap",
        "specialkit-map",
        "specialkit-quality",
        "specialkit-status",
        "specialkit-class-select",
        "specialkit-group-select",
        "specialkit-move",
        "specialkit-add",
        "specialkit-remove",
        "specialkit-undo",
        "specialkit-save",
    }
    assert hooks <= _dom_classes(picker.widget)
    bundle = picker._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == picker.widget.model_id


def test_k_slider_updates_spec_heatmap_map_and_quality(picker):
    heat0, q0 = _heatmap_state(picker), picker.quality_view.value
    picker.k_slider.value = 4
    assert picker.spec.num_groups == 4 and picker.controls.k == 4
    heat1 = _heatmap_state(picker)
    assert heat1 != heat0
    assert len(picker.heatmap.layout.shapes) >= 4
    assert picker.quality_view.value != q0 and _quality(picker)["groups"] == 4.0
    assert len(picker.class_map.data) == 1 + 4  # the points, then one legend entry per group
    assert len(set(picker.class_map.data[0].marker.color)) == 4
    assert "k=4" in picker.status.value and len(picker.history) == 1


def test_method_and_overlap_controls(picker, inputs):
    assert picker.gamma_slider.disabled and picker.r_slider.disabled and picker.max_size.disabled
    picker.method_dropdown.value = "balanced"
    assert list(picker.spec.sizes()) == [4, 4, 4]
    picker.overlap_dropdown.value = "top_r"
    assert not picker.spec.is_partition() and picker.spec.coverage().max() >= 2
    assert not picker.r_slider.disabled and picker.gamma_slider.disabled
    assert _quality(picker)["coverage_mean"] > 1.0
    picker.max_size.value = 4
    assert picker.spec.is_partition()  # groups already at the cap gain nothing
    assert len(picker.history) == 3


def test_move_add_remove_and_undo(picker):
    start = picker.spec
    first = start.names[0]
    other = start.names[1]
    cls = start.groups[first][0]
    picker.select_classes([cls])
    picker.group_select.value = other
    heat0 = _heatmap_state(picker)
    assert picker.edit("move")
    assert cls in picker.spec.groups[other] and cls not in picker.spec.groups[first]
    assert _heatmap_state(picker) != heat0
    picker.group_select.value = start.names[2]
    assert picker.buttons["add"].click() is None and picker.spec.coverage()[start.class_names.index(cls)] == 2
    assert picker.edit("remove", group=other)
    assert picker.spec.groups[start.names[2]][-1] == cls and cls not in picker.spec.groups[other]
    assert len(picker.history) == 3
    assert picker.undo() and picker.undo() and picker.undo()
    assert picker.spec == start
    assert not picker.undo() and "nothing to undo" in picker.status.value


def test_new_group_from_selection(picker):
    picker.select_classes([0, 1])
    assert picker.edit("new_group")
    assert picker.spec.num_groups == 4 and picker.spec.groups["group_03"] == ("c00", "c01")
    assert picker.group_select.value == "group_03"


def test_undo_restores_the_controls(picker):
    before = picker.spec
    picker.k_slider.value = 5
    picker.buttons["undo"].click()
    assert picker.k_slider.value == 3 and picker.spec == before and picker.history == ()


def test_invalid_edit_shows_error_instead_of_raising(picker):
    picker.k_slider.value = 6
    lonely = next((g for g, m in picker.spec.groups.items() if len(m) == 1), None)
    if lonely is None:  # make a one-class group first
        picker.select_classes([0])
        picker.edit("new_group")
        lonely = picker.spec.names[-1]
    spec, n = picker.spec, len(picker.history)
    picker.select_classes([picker.spec.groups[lonely][0]])
    picker.group_select.value = lonely
    picker.buttons["remove"].click()
    assert picker.spec == spec and len(picker.history) == n
    assert "specialkit-error" in picker.status.value and "empty" in picker.status.value
    picker.class_select.value = ()
    assert not picker.edit("move")
    assert "no class selected" in picker.status.value


def test_clustering_failure_shows_error(inputs):
    initial = ClusterSpec.from_labels(inputs["coarse_of_class"], inputs["class_names"])
    zero = np.zeros_like(inputs["covariance"])
    p = widgets.ClusterPicker(**{**inputs, "covariance": zero}, initial=initial)
    assert p.spec == initial and p.k_slider.value == 3
    p.k_slider.value = 4  # k-means on all-zero columns cannot make 4 groups
    assert p.spec == initial and "could not cluster" in p.status.value


def test_map_click_and_lasso_select_classes(picker):
    """The messages the browser sends when a point is clicked or a lasso drawn (plotly's own handler)."""
    fig = picker.class_map
    n_traces = len(fig.data)
    fig._js2py_pointsCallback = {
        "event_type": "plotly_click",
        "points": {"trace_indexes": [0], "point_indexes": [5], "xs": [0.0], "ys": [0.0]},
        "device_state": {"shift": False, "ctrl": False, "alt": False, "meta": False, "button": 0, "buttons": 1},
        "selector": None,
    }
    assert picker.selected == (5,)
    assert fig.data[0].marker.line.width[5] == 3.0 and fig.data[0].marker.line.width[4] == 0.5
    fig._js2py_pointsCallback = {
        "event_type": "plotly_click",
        "points": {"trace_indexes": [0], "point_indexes": [7], "xs": [0.0], "ys": [0.0]},
        "device_state": {"shift": True, "ctrl": False, "alt": False, "meta": False, "button": 0, "buttons": 1},
        "selector": None,
    }
    assert picker.selected == (5, 7)  # shift-click extends
    fig._js2py_pointsCallback = {
        "event_type": "plotly_selected",
        "points": {"trace_indexes": [0, 0, 0], "point_indexes": [1, 4, 10], "xs": [0.0] * 3, "ys": [0.0] * 3},
        "device_state": None,
        "selector": {"type": "lasso", "selector_state": {"xs": [0, 1, 1], "ys": [0, 0, 1]}},
    }
    assert picker.selected == (1, 4, 10)
    assert "c01, c04, c10" in picker.status.value
    picker.group_select.value = picker.spec.names[0]
    assert picker.edit("add")
    assert {"c01", "c04", "c10"} <= set(picker.spec.groups[picker.spec.names[0]])
    assert len(fig.data) == n_traces


def test_selection_survives_a_recompute(picker):
    picker.select_classes(["c02", "c03"])
    picker.k_slider.value = 4
    assert picker.selected == (2, 3)
    # the map's trace 0 is the same object, so the click/lasso callbacks still fire
    picker.class_map.data[0]._dispatch_on_click(SimpleNamespace(point_inds=[9]), None)
    assert picker.selected == (9,)


def test_save_writes_json_that_loads_back(picker, tmp_path):
    picker.select_classes([0])
    picker.group_select.value = picker.spec.names[1]
    picker.edit("add")
    picker.buttons["save"].click()
    path = tmp_path / "clusters.json"
    assert path.is_file() and "saved" in picker.status.value
    data = json.loads(path.read_text())
    assert data["classes"] == list(picker.class_names)
    assert ClusterSpec.load(path, class_names=picker.class_names) == picker.spec
    other = picker.save(tmp_path / "sub" / "copy.json")
    assert ClusterSpec.load(other) == picker.spec
    assert not any(p.name.endswith(".tmp") for p in tmp_path.rglob("*"))


def test_save_without_a_target(inputs):
    p = widgets.ClusterPicker(**inputs, method="agglomerative", k=3)
    assert p.buttons["save"].disabled
    with pytest.raises(widgets.PickerError, match="save_path"):
        p.save()


def test_from_run_uses_the_run(inputs):
    saved = []
    initial = ClusterSpec.from_labels(inputs["coarse_of_class"], inputs["class_names"])
    cs = SimpleNamespace(cm=inputs["confusion"], covariance=inputs["covariance"], distance=inputs["distance"])
    ds = SimpleNamespace(class_names=inputs["class_names"], coarse_of_class=inputs["coarse_of_class"])
    config = SimpleNamespace(method="kmeans", k=5, overlap="none", gamma=5.0, top_r=1, max_group_size=None, seed=0)
    run = SimpleNamespace(
        dataset=lambda: ds,
        confusion=lambda: cs,
        distance=lambda: inputs["distance"],
        class_map=lambda: inputs["coords"],
        clusters=lambda: initial,
        save_clusters=saved.append,
        config=config,
    )
    p = widgets.ClusterPicker.from_run(run)
    assert p.spec == initial and p.method_dropdown.value == "kmeans" and p.k_slider.value == initial.num_groups == 3
    assert _quality(p)["ari"] == pytest.approx(1.0)
    p.buttons["save"].click()
    assert saved == [initial]


def test_picker_controls_follow_the_config_metadata(inputs):
    import inspect
    from dataclasses import fields

    from specialkit.config import PipelineConfig, picker_settings, stage_keys

    routed = picker_settings()
    # every clustering setting in the clusters key is a picker control, except the distance (the picker is given its matrix)
    assert set(stage_keys()["clusters"]) - set(routed) == {"distance"}
    assert all(f.metadata["stage"] == "clusters" for f in fields(PipelineConfig) if f.name in routed)
    params = inspect.signature(widgets.ClusterPicker.__init__).parameters
    assert set(routed.values()) <= set(params) and routed["top_r"] == "r"
    assert widgets.DEFAULT_METHODS == PipelineConfig.__dataclass_fields__["method"].metadata["choices"]
    assert widgets.OVERLAP_RULES == PipelineConfig.__dataclass_fields__["overlap"].metadata["choices"]
    cfg = PipelineConfig(method="agglomerative", k=4, overlap="top_r", gamma=7.5, top_r=3, max_group_size=6, seed=2)
    run = SimpleNamespace(
        dataset=lambda: SimpleNamespace(class_names=inputs["class_names"], coarse_of_class=inputs["coarse_of_class"]),
        confusion=lambda: SimpleNamespace(cm=inputs["confusion"], covariance=inputs["covariance"]),
        distance=lambda: inputs["distance"],
        class_map=lambda: inputs["coords"],
        clusters=lambda: ClusterSpec.from_labels(inputs["coarse_of_class"], inputs["class_names"]),
        save_clusters=lambda spec: None,
        config=cfg,
    )
    p = widgets.ClusterPicker.from_run(run)
    got = (p.method_dropdown.value, p.overlap_dropdown.value, p.gamma_slider.value, p.r_slider.value, p.max_size.value)
    assert got == ("agglomerative", "top_r", 7.5, 3, 6)
    assert p.k_slider.value == 3 and p.controls.seed == 2  # k: the saved spec's groups, not cfg.k


def test_bad_inputs_name_the_fix(inputs):
    with pytest.raises(widgets.PickerError, match=r"confusion must be \(12, 12\)"):
        widgets.ClusterPicker(**{**inputs, "confusion": np.zeros((3, 3))})
    with pytest.raises(widgets.PickerError, match="coords"):
        widgets.ClusterPicker(**{**inputs, "coords": np.zeros((12, 3))})
    with pytest.raises(widgets.PickerError, match="unknown methods"):
        widgets.ClusterPicker(**inputs, methods=("spectral", "dbscan"))
    with pytest.raises(ClusterSpecError, match="another dataset"):
        widgets.ClusterPicker(**inputs, initial=ClusterSpec(groups={"g": ("a",)}, class_names=("a", "b")))
    assert math.isfinite(_quality(widgets.ClusterPicker(**inputs, method="agglomerative", k=2))["in_group_error_share"])
