"""The committed notebooks are exactly what tools/build_notebooks.py writes: no outputs, clean metadata."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_notebooks", ROOT / "tools" / "build_notebooks.py")
builder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)


@pytest.mark.parametrize("name", sorted(builder.NOTEBOOKS))
def test_notebook_is_built_and_clean(name):
    path = ROOT / "notebooks" / name
    assert path.read_text() == builder.build(name), f"run `python tools/build_notebooks.py` to rebuild {name}"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    assert code[-1].source.startswith("# Checks") and "assert" in code[-1].source
