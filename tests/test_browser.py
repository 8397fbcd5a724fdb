"""The cluster picker in a real JupyterLab, driven by headless Chromium through Playwright.

Opens ``notebooks/03_choose_clusters.ipynb`` (or the notebook named by ``SPECIALKIT_BROWSER_NOTEBOOK``,
a path relative to the repository root, e.g. ``tests/fixtures_browser_demo.ipynb``), runs all cells
from the Run menu, reads the picker's quality numbers and heatmap from the page, moves the k slider
with the keyboard, and checks that the heatmap and the quality numbers changed. Screenshots go to
``test-artifacts/browser/`` (``notebook03.png``, ``notebook03_before.png``, ``notebook03_after.png``).

Needs a Chromium: Debian's ``chromium`` on PATH, or Playwright's own (``make test`` provides one through
``tools/ensure_browser.py``); without one it fails with one line saying what to install.
``SPECIALKIT_BROWSER_TIMEOUT`` (seconds, default 600) bounds the notebook run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browser_helpers as bh  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_NOTEBOOK = "notebooks/03_choose_clusters.ipynb"
ARTIFACTS = REPO / "test-artifacts" / "browser"

TIMEOUT_S = float(os.environ.get("SPECIALKIT_BROWSER_TIMEOUT", "600"))

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 300)]


def _notebook() -> Path:
    rel = os.environ.get("SPECIALKIT_BROWSER_NOTEBOOK", DEFAULT_NOTEBOOK)
    path = (REPO / rel).resolve()
    if not path.is_file():
        pytest.fail(
            f"{rel} does not exist. The browser test drives the cluster picker in {DEFAULT_NOTEBOOK}; until that "
            "notebook is written, point the test at the demo notebook: "
            "SPECIALKIT_BROWSER_NOTEBOOK=tests/fixtures_browser_demo.ipynb (or deselect with -m 'not browser')"
        )
    return path


def _artifact_name(notebook: Path) -> str:
    return "notebook03" if notebook.name.startswith("03") else notebook.stem


@pytest.fixture(scope="module")
def chromium() -> str:
    path = bh.chromium_executable()
    if path is None:
        pytest.fail(bh.NO_CHROMIUM)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a scratch copy of the notebook's folder (runs write there, not in the repo)."""
    notebook = _notebook()
    root = tmp_path_factory.mktemp("lab-root")
    folder = root / notebook.parent.name
    shutil.copytree(
        notebook.parent,
        folder,
        ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints", "__pycache__", "test-artifacts", "*.pyc"),
    )
    env = dict(os.environ)
    env["SPECIALKIT_SMOKE"] = os.environ.get("SPECIALKIT_SMOKE", "1")  # the root conftest sets it; kernels inherit it
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("MPLBACKEND", "Agg")
    env["SPECIALKIT_RUNS"] = str(root / "runs")  # its own run folders, apart from the notebooks' (run beside it)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with bh.jupyter_lab(root, env=env, log_path=ARTIFACTS / "jupyter-server.log") as server:
        yield server, f"{folder.name}/{notebook.name}", _artifact_name(notebook)


def test_cluster_picker_in_jupyterlab(chromium, lab, record_property):
    from playwright.sync_api import sync_playwright

    server, relpath, name = lab
    timeout_s = TIMEOUT_S
    shots = {
        key: ARTIFACTS / f"{name}{suffix}.png"
        for key, suffix in [("before", "_before"), ("after", "_after"), ("final", "")]
    }
    for key, path in shots.items():
        path.unlink(missing_ok=True)
        record_property(f"screenshot_{key}", str(path))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=bh.CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1920, "height": 1400})
            console: list[str] = []
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}") if msg.type == "error" else None)
            try:
                _exercise_picker(page, server, relpath, timeout_s, shots)
            except BaseException:
                page.screenshot(path=str(ARTIFACTS / f"{name}_failure.png"), full_page=True)
                print("browser console errors:\n" + "\n".join(console[-30:]))
                print("server log:\n" + server.log_tail())
                raise
        finally:
            browser.close()
    for path in shots.values():
        assert path.is_file() and path.stat().st_size > 10_000, f"screenshot {path} missing or blank"


def _exercise_picker(page, server, relpath, timeout_s, shots) -> None:
    bh.open_and_run_all(page, server, relpath, timeout_s=timeout_s)
    picker = page.locator(".specialkit-picker").first
    picker.wait_for(state="visible", timeout=60_000)
    page.wait_for_function(
        """() => { const gd = document.querySelector('.specialkit-heatmap .js-plotly-plot');
                   return gd && gd.data && gd.data.length > 0 && gd.querySelector('.heatmaplayer, .hm'); }""",
        timeout=60_000,
    )
    page.wait_for_selector(".specialkit-map .js-plotly-plot .scatterlayer .point", timeout=60_000)
    page.wait_for_selector(".specialkit-quality td.specialkit-q", timeout=60_000)

    bh.collapse_left_sidebar(page)
    q0, heat0, k0 = bh.read_quality(page), bh.read_heatmap(page), bh.k_slider_value(page)
    assert q0["groups"] >= 1 and k0 >= 2, f"quality table {q0}, k slider {k0}"
    assert 0.0 <= q0["in_group_error_share"] <= 1.0
    assert heat0 is not None and heat0["cells"] > 0 and heat0["order"] is not None, f"heatmap not rendered: {heat0}"
    assert len(heat0["shapes"]) >= k0, f"expected an outline per group, got {heat0['shapes']}"
    picker.scroll_into_view_if_needed()
    page.screenshot(path=str(shots["before"]))

    handle = page.locator(".specialkit-k-slider .noUi-handle").first
    slider_max = int(float(handle.get_attribute("aria-valuemax") or k0 + 1))
    key = "ArrowRight" if k0 < slider_max else "ArrowLeft"
    handle.focus()
    page.keyboard.press(key)
    k1 = k0 + (1 if key == "ArrowRight" else -1)
    page.wait_for_function(
        """(k) => { const cell = document.querySelector('.specialkit-quality td.specialkit-q[data-key="groups"]');
                    return cell && Number(cell.dataset.value) === k; }""",
        arg=k1,
        timeout=120_000,
    )
    heat1 = _wait_for_change(page, heat0, timeout_s=60)
    q1 = bh.read_quality(page)
    assert bh.k_slider_value(page) == k1
    assert q1["groups"] == k1 and q1 != q0, f"quality did not follow the slider: {q0} -> {q1}"
    assert _signature(heat1) != _signature(heat0), f"heatmap unchanged after moving k to {k1}: {heat1['shapes']}"
    assert len(heat1["shapes"]) >= k1
    page.locator(".specialkit-status").first.filter(has_text=f"k={k1}").wait_for(timeout=30_000)
    picker.scroll_into_view_if_needed()
    page.screenshot(path=str(shots["after"]))
    _click_add_undo(page, q1)
    page.wait_for_timeout(1_000)  # let plotly.js redraw before the last screenshot
    picker.scroll_into_view_if_needed()
    page.screenshot(path=str(shots["final"]))


def _click_add_undo(page, q1: dict) -> None:
    """Click a class on the map, add it to a second group with the button, then undo."""
    bh.click_map_point(page, 0)
    page.wait_for_function(
        "() => { const s = document.querySelector('.specialkit-class-select select'); return s && s.selectedOptions.length > 0; }",
        timeout=30_000,
    )
    chosen = bh.selected_classes(page)
    assert len(chosen) == 1, f"a click should select one class, got {chosen}"
    label = chosen[0]  # "name  [group_00, ...]"
    in_groups = {g.strip() for g in label[label.rindex("[") + 1 : -1].split(",")}
    options = page.locator(".specialkit-group-select select option").all_inner_texts()
    target = next(g for g in options if g not in in_groups)
    page.locator(".specialkit-group-select select").select_option(label=target)
    page.locator(".specialkit-add button, button.specialkit-add").first.click()
    page.wait_for_function(
        """(before) => { const c = document.querySelector('.specialkit-q[data-key="coverage_mean"]');
                         return c && Number(c.dataset.value) > before; }""",
        arg=q1["coverage_mean"],
        timeout=60_000,
    )
    status = page.locator(".specialkit-status").first
    status.filter(has_text=f"added to {target}").wait_for(timeout=30_000)
    page.locator(".specialkit-undo button, button.specialkit-undo").first.click()
    page.wait_for_function(
        """(before) => { const c = document.querySelector('.specialkit-q[data-key="coverage_mean"]');
                         return c && Number(c.dataset.value) === before; }""",
        arg=q1["coverage_mean"],
        timeout=60_000,
    )
    assert bh.read_quality(page) == q1, "undo did not restore the quality numbers"
    page.locator(".specialkit-status").first.filter(has_text="undone").wait_for(timeout=30_000)


def _signature(heat: dict) -> tuple:
    return (heat["order"], heat["shapes"], heat["z"])


def _wait_for_change(page, heat0: dict, *, timeout_s: float) -> dict:
    """The heatmap once plotly.js shows something other than ``heat0`` (or as it is at the timeout)."""
    heat = bh.read_heatmap(page)
    for _ in range(int(timeout_s * 2)):
        if heat is not None and _signature(heat) != _signature(heat0):
            break
        page.wait_for_timeout(500)
        heat = bh.read_heatmap(page)
    page.wait_for_timeout(500)  # let plotly.js finish drawing before the screenshot
    return bh.read_heatmap(page)
