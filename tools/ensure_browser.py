"""Make sure the real-browser test has a Chromium; print its path, or one line saying what to install.

Called by ``make test`` before pytest. In order: a ``chromium`` already on PATH (Debian's package, what
CI uses); as root with apt, ``apt-get install chromium``; otherwise Playwright's own Chromium
(``python -m playwright install chromium``, a download from Playwright's servers). When none of these
works it exits with status 1 and one line naming what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import browser_helpers as bh  # noqa: E402


def _quiet(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    print(f"ensure_browser: {' '.join(cmd)}", flush=True)
    try:
        return (
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=1800).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def main() -> int:
    found = bh.chromium_executable()
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if _quiet(["apt-get", "update", "-qq"], env):
            _quiet(["apt-get", "install", "-y", "-qq", "chromium"], env)
        found = bh.chromium_executable()
    if found is None:
        _quiet([sys.executable, "-m", "playwright", "install", "chromium"])
        found = bh.chromium_executable()
    if found is None:
        print(f"ensure_browser: {bh.NO_CHROMIUM}", file=sys.stderr)
        return 1
    print(f"ensure_browser: using {found}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
