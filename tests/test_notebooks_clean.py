"""The notebooks are the source people edit: committed as `make scrub` (nbstripout) leaves them, with the
kit's structure — imports, one parameters cell, ..., a final `# Checks` cell of asserts. Structure, not bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "01_generalist",
    "02_confusion_structure",
    "03_choose_clusters",
    "04_train_specialists",
    "05_compare_ensembles",
    "06_distill_ensemble",
    "07_when_do_specialists_pay_off",
]


def test_the_seven_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs: run `make scrub`"
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state: run `make scrub`"
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [1], (
        f"{path.name}: the code cell after the imports must be the one cell tagged `parameters`, got {tagged}"
    )
    assert code[0].source.lstrip().startswith(("import", "from")), f"{path.name}: the first code cell holds the imports"
    assert code[-1].source.startswith("# Checks") and "assert" in code[-1].source, (
        f"{path.name}: end in a `# Checks` cell"
    )
    params = code[1].source
    if path.stem.startswith("01"):
        assert "pipeline.Run(" in params, "notebook 01 creates the run"
    elif path.stem.startswith("07"):
        assert "study.open_study(" in params and "pipeline.Run(" not in params, (
            "notebook 07 opens the study `make study` made"
        )
    else:
        assert "pipeline.open_run(" in params and "pipeline.Run(" not in params, (
            f"{path.name} opens the run notebook 01 made"
        )


def test_notebooks_are_scrubbed_as_make_scrub_leaves_them():
    exe = shutil.which("nbstripout", path=str(Path(sys.executable).parent)) or shutil.which("nbstripout")
    assert exe, "nbstripout is missing: `pip install -e '.[test]'` (make test does it)"
    out = subprocess.run([exe, "--verify", *map(str, NOTEBOOKS)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"run `make scrub`: {out.stdout}{out.stderr}"
