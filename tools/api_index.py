"""Write docs/API.md: every public module of ``specialkit`` with its summary, and its public classes and functions
with theirs, from the docstrings (``--check``: exit 1 when docs/API.md differs; tests/test_readme.py runs it).

    python tools/api_index.py           # write docs/API.md
    python tools/api_index.py --check   # compare only
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's specialkit, whatever is installed
OUT = ROOT / "docs" / "API.md"


def _summary(obj: object) -> str:
    """The docstring's first paragraph on one line (empty when there is none)."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _public(module: object) -> list[tuple[str, object]]:
    """The module's public classes and functions defined in it (its ``__all__`` when it has one), in source order."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    out = []
    for name in names:
        obj = getattr(module, name, None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
            out.append((name, obj))
    return sorted(out, key=lambda item: inspect.getsourcelines(item[1])[1])


def api_markdown() -> str:
    """The whole page."""
    import specialkit

    lines = [
        "# API index",
        "",
        "Generated from the docstrings by `python tools/api_index.py` (a test fails when this page is stale). The",
        "layers these modules form: [LAYERS.md](LAYERS.md). Every function's arguments, returns and errors are in its",
        "docstring (`help(specialkit.<module>.<name>)`).",
    ]
    for info in sorted(pkgutil.iter_modules(specialkit.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"specialkit.{info.name}")
        lines += ["", f"## `specialkit.{info.name}`", "", _summary(module) or "(no module docstring)", ""]
        for name, obj in _public(module):
            kind = "class" if inspect.isclass(obj) else "def"
            lines.append(f"- {kind} `{name}` — {_summary(obj) or '(undocumented)'}")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    text = api_markdown()
    if argv == ["--check"]:
        if not OUT.is_file() or OUT.read_text() != text:
            print("docs/API.md is stale: run python tools/api_index.py", file=sys.stderr)
            return 1
        print("docs/API.md is current")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
