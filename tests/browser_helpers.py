"""Drive a real JupyterLab in headless Chromium (Debian's ``chromium`` + Python ``playwright``).

Used by ``tests/test_browser.py``. Nothing here downloads a browser: Playwright is pointed at the
system binary (``shutil.which("chromium")``, Debian's ``apt-get install chromium``) or, failing that,
at Playwright's own Chromium when ``python -m playwright install chromium`` has fetched it
(``make test`` provides one of the two: ``tools/ensure_browser.py``).

* :func:`jupyter_lab` starts ``python -m jupyterlab`` on a free local port with a random token,
  quiet settings (no news, no update check, no notebook windowing) and private config/runtime dirs,
  and stops it (kernels first) on exit.
* :func:`open_and_run_all` opens a notebook, accepts the kernel dialog if one appears, runs
  Run → Run All Cells from the menu and waits until every code cell has run.
* :func:`read_quality`, :func:`read_heatmap`, :func:`k_slider_value` read the cluster picker
  from the page through its CSS hooks (see :mod:`specialkit.widgets`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]

NO_CHROMIUM = (
    "no Chromium for the real-browser test: install Debian's chromium (`sudo apt-get install -y chromium`) "
    "or Playwright's (`.venv/bin/python -m playwright install --with-deps chromium`), then run `make test` again"
)

_USER_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
        "doNotDisturbMode": True,
    },
    # every cell stays in the DOM, so the test can read all prompts and outputs
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def chromium_executable() -> str | None:
    """Path of the system Chromium, else of Playwright's own Chromium when it is installed, else None."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # noqa: BLE001 -- playwright missing or its driver failing: no browser from it
        return None
    return path if path and os.path.isfile(path) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LabServer:
    """A running JupyterLab: ``url`` (no trailing slash), ``token``, the process and its log."""

    url: str
    token: str
    proc: subprocess.Popen
    log_path: Path
    root_dir: Path

    def api(self, method: str, path: str, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def notebook_url(self, relpath: str) -> str:
        return f"{self.url}/lab/tree/{relpath}?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"


def _write_config(folder: Path, *, root_dir: Path, port: int, token: str) -> Path:
    settings = folder / "user-settings"
    for rel, value in _USER_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    workspaces = folder / "workspaces"
    workspaces.mkdir(exist_ok=True)
    config = folder / "jupyter_lab_test_config.py"
    config.write_text(
        "\n".join(
            [
                "c.ServerApp.ip = '127.0.0.1'",
                f"c.ServerApp.port = {port}",
                "c.ServerApp.port_retries = 0",
                "c.ServerApp.open_browser = False",
                f"c.ServerApp.root_dir = {str(root_dir)!r}",
                f"c.IdentityProvider.token = {token!r}",
                "c.LabApp.news_url = None",
                "c.LabApp.check_for_updates_class = 'jupyterlab.NeverCheckForUpdate'",
                f"c.LabApp.user_settings_dir = {str(settings)!r}",
                f"c.LabApp.workspaces_dir = {str(workspaces)!r}",
                "",
            ]
        )
    )
    return config


@contextlib.contextmanager
def jupyter_lab(
    root_dir: Path, *, env: dict[str, str], log_path: Path, startup_timeout: float = 120.0
) -> Iterator[LabServer]:
    """Start JupyterLab serving ``root_dir``; stop it (and its kernels) when the block ends.

    Args:
        root_dir: the folder the server shows (notebooks are opened relative to it).
        env: the server's environment; kernels inherit it (e.g. ``SPECIALKIT_SMOKE=1``).
        log_path: the server's stdout/stderr go here.
        startup_timeout: seconds to wait for ``/api/status``.
    """
    port, token = free_port(), secrets.token_hex(16)
    private = Path(tempfile.mkdtemp(prefix="specialkit-lab-"))
    config = _write_config(private, root_dir=root_dir, port=port, token=token)
    env = dict(env)
    env.update(
        JUPYTER_CONFIG_DIR=str(private / "config"),
        JUPYTER_RUNTIME_DIR=str(private / "runtime"),
        IPYTHONDIR=str(private / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--config={config}",
        "--no-browser",
        f"--port={port}",
        f"--ServerApp.root_dir={root_dir}",
        "--LabApp.news_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root_dir, start_new_session=True)
    server = LabServer(url=f"http://127.0.0.1:{port}", token=token, proc=proc, log_path=log_path, root_dir=root_dir)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {proc.returncode} while starting:\n{server.log_tail()}"
                )
            try:
                server.api("GET", "/api/status", timeout=2.0)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"JupyterLab did not answer within {startup_timeout:.0f} s:\n{server.log_tail()}"
                    ) from None
                time.sleep(0.5)
        yield server
    finally:
        _stop(server)
        log.close()
        shutil.rmtree(private, ignore_errors=True)


def _stop(server: LabServer) -> None:
    proc = server.proc
    if proc.poll() is None:
        with contextlib.suppress(Exception):
            for kernel in server.api("GET", "/api/kernels"):
                server.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=20.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --------------------------------------------------------------------------- the page

_PROMPTS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'))
                    .map(e => e.textContent.trim())"""

_ERRORS_JS = """() => Array.from(document.querySelectorAll('.jp-Notebook .jp-OutputArea-output'))
                    .map(e => e.innerText)
                    .filter(t => /Traceback \\(most recent call last\\)/.test(t))"""


def open_and_run_all(page: Any, server: LabServer, relpath: str, *, timeout_s: float) -> list[str]:
    """Open a notebook in JupyterLab, run all cells from the Run menu, wait until all have run.

    Returns:
        The code cells' input prompts after the run (``"[1]:"``, ...).

    Raises:
        AssertionError: the notebook did not open, a cell raised, or the run did not finish in time
            (with the prompts and error outputs seen).
    """
    page.goto(server.notebook_url(relpath), wait_until="domcontentloaded", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    _accept_kernel_dialog(page, wait_ms=3_000)
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    menu = page.locator(".lm-MenuBar-item", has_text="Run").first
    menu.click()
    item = page.locator(".lm-Menu-item", has=page.locator(".lm-Menu-itemLabel", has_text="Run All Cells")).filter(
        has_not_text="Restart"
    )
    item.wait_for(state="visible", timeout=10_000)
    item.click()
    deadline = time.monotonic() + timeout_s
    prompts: list[str] = []
    while time.monotonic() < deadline:
        _accept_kernel_dialog(page, wait_ms=0)
        prompts = page.evaluate(_PROMPTS_JS)
        errors = page.evaluate(_ERRORS_JS)
        if errors:
            raise AssertionError(f"a cell of {relpath} raised:\n" + "\n---\n".join(e[-3000:] for e in errors))
        if prompts and all(p.startswith("[") and p.strip("[]: ").isdigit() for p in prompts):
            return prompts
        page.wait_for_timeout(1_000)
    raise AssertionError(
        f"{relpath}: not every cell ran within {timeout_s:.0f} s; prompts {prompts}\n{server.log_tail()}"
    )


def _accept_kernel_dialog(page: Any, *, wait_ms: int) -> bool:
    dialog = page.locator(".jp-Dialog")
    try:
        if wait_ms:
            dialog.first.wait_for(state="visible", timeout=wait_ms)
        if dialog.count() == 0:
            return False
        accept = dialog.locator("button.jp-mod-accept")
        if accept.count():
            accept.first.click()
            return True
    except Exception:  # noqa: BLE001 -- no dialog appeared: nothing to accept
        return False
    return False


def read_quality(page: Any) -> dict[str, float]:
    """The cluster picker's quality numbers, ``{key: float}`` from the ``data-value`` attributes."""
    cells = page.evaluate(
        """() => Array.from(document.querySelectorAll('.specialkit-quality td.specialkit-q'))
                 .map(td => [td.dataset.key, td.dataset.value])"""
    )
    return {k: float(v) for k, v in cells}


def read_heatmap(page: Any) -> dict[str, Any]:
    """The heatmap as plotly.js holds it: class order, axis labels, group outlines, a digest of z."""
    return page.evaluate(
        """() => {
            const gd = document.querySelector('.specialkit-heatmap .js-plotly-plot');
            if (!gd || !gd.data || !gd.data.length) return null;
            const t = gd.data[0];
            const rows = Array.from(t.z || [], r => Array.from(r, v => (v === null ? -1 : Number(v))));
            return {
                order: t.meta && t.meta.order ? Array.from(t.meta.order) : null,
                x: Array.from(t.x || []),
                shapes: (gd.layout.shapes || []).map(s => s.name),
                z: rows.map(r => r.map(v => v.toFixed(4)).join(',')).join(';'),
                cells: rows.length * (rows.length ? rows[0].length : 0),
                svg_cells: gd.querySelectorAll('.heatmaplayer image, .hm image').length,
            };
        }"""
    )


def k_slider_value(page: Any) -> int:
    text = page.locator(".specialkit-k-slider .widget-readout").first.inner_text()
    return int(text.strip())


def selected_classes(page: Any) -> list[str]:
    """Labels of the options selected in the picker's class list."""
    return page.evaluate(
        """() => { const sel = document.querySelector('.specialkit-class-select select');
                   return sel ? Array.from(sel.selectedOptions, o => o.textContent.trim()) : []; }"""
    )


def click_map_point(page: Any, index: int) -> None:
    """Click point ``index`` of the class map's trace 0 (plotly's own hit test picks the point)."""
    point = page.locator(".specialkit-map .scatterlayer .trace").first.locator(".points .point").nth(index)
    point.scroll_into_view_if_needed()
    box = point.bounding_box()
    assert box is not None, f"class map point {index} is not rendered"
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def collapse_left_sidebar(page: Any) -> None:
    """Close the file browser so the notebook gets the page's width (no-op when already closed)."""
    tab = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if tab.count():
        tab.first.click()
        page.wait_for_timeout(300)
