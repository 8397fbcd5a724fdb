"""The install files agree with each other, and the README shows the two set-up commands."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_deps() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["dependencies"]) | set(project["optional-dependencies"]["test"])


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pinned = {d for d in pip_section if not d.startswith("-e")}
    assert pinned == _pyproject_deps()
    assert "-e ." in pip_section


def test_torch_pins():
    deps = _pyproject_deps()
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    readme = (ROOT / "README.md").read_text()
    assert ci[-1].strip() == "make test"
    assert re.search(r"^make test$", readme, re.M) and re.search(r"^make demo$", readme, re.M)


def test_every_submodule_is_reachable_as_an_attribute_in_a_fresh_interpreter():
    import subprocess
    import sys

    modules = sorted(p.stem for p in (ROOT / "specialkit").glob("*.py") if p.stem != "__init__")
    code = (
        "import specialkit\n"
        f"for name in {modules!r}:\n"
        "    assert getattr(specialkit, name).__name__ == 'specialkit.' + name, name\n"
        "assert sorted(specialkit._SUBMODULES) == " + repr(modules) + ", sorted(specialkit._SUBMODULES)\n"
        "print(specialkit.config.PipelineConfig.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "PipelineConfig"
