"""The README is a front door (at most 150 lines), every number on it and in docs/RESULTS.md is the kit's own output
for the files in docs/results/, docs/API.md is current, and every relative link of the docs resolves."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move detail to docs/USAGE.md"
    text = "\n".join(lines)
    for must in ("make demo", "make test", "<!-- answer:start -->", "docs/USAGE.md", "docs/RESULTS.md", "docs/API.md"):
        assert must in text, must


def test_every_generated_block_is_what_docs_results_gives():
    tool = _tool("update_readme")
    expected = tool.expected_files()
    pages = {ROOT / "README.md", ROOT / "docs" / "RESULTS.md", ROOT / "docs" / "USAGE.md"}
    if (ROOT / "docs" / "results" / tool.CIFAR_FILE).is_file():
        pages.add(ROOT / "docs" / "RESULTS_CIFAR10.md")
    assert set(expected) == pages
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.name} is stale: run python tools/update_readme.py"
    box = (ROOT / "README.md").read_text().split("<!-- answer:start -->\n")[1].split("\n<!-- answer:end -->")[0]
    # the box holds every model of the demo with an interval, and nothing typed by hand can survive regeneration
    metrics = tool.json.loads((ROOT / "docs" / "results" / tool.DEMO_FILE).read_text())
    for row in metrics["comparison"]:
        assert f"| {row['name']} | {row['top1'] * 100:.2f}% [" in box, row["name"]


def test_a_hand_edited_number_is_caught(tmp_path, monkeypatch):
    tool = _tool("update_readme")
    for name in (
        "README.md",
        "docs/RESULTS.md",
        "docs/USAGE.md",
        "configs/study.json",
        f"docs/results/{tool.DEMO_FILE}",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    study = ROOT / "docs" / "results" / tool.STUDY_FILE
    if study.is_file():
        (tmp_path / "docs" / "results" / tool.STUDY_FILE).write_text(study.read_text())
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "RESULTS", tmp_path / "docs" / "results")
    readme = tmp_path / "README.md"
    first = re.search(r"\| generalist \| (\d+\.\d\d)%", readme.read_text())
    assert first, "the answer box names the generalist's accuracy"
    readme.write_text(readme.read_text().replace(f"| generalist | {first.group(1)}%", "| generalist | 99.99%", 1))
    assert tool.main(["--check"]) == 1
    assert tool.main([]) == 0 and tool.main(["--check"]) == 0
    assert f"| generalist | {first.group(1)}%" in readme.read_text()


def test_the_api_index_is_current():
    out = subprocess.run([sys.executable, "tools/api_index.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_relative_link_of_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
