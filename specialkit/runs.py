"""Run folders on disk: atomic writes, ``.npy`` arrays and JSON files with clear errors.

Every write goes to a temporary file in the destination folder, is flushed to disk, then moved over
the destination with ``os.replace``; a reader never sees a half-written file and an interrupted
write leaves the previous version in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

__all__ = [
    "RunFileError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "save_array",
    "load_array",
]


class RunFileError(ValueError):
    """A run file is missing, corrupt or cannot be written; the message names the path and the fix."""


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on success it replaces ``path``.

    Parent folders are created. If the ``with`` block raises, the temporary file is removed and
    ``path`` is left as it was.

    Args:
        path: destination file.
        mode: ``"wb"`` or ``"w"``.
        encoding: text encoding for ``mode="w"`` (default UTF-8).
    """
    if mode not in ("wb", "w"):
        raise RunFileError(f"atomic_open supports mode 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (no NaN/Infinity) to ``path`` atomically; returns the path.

    numpy scalars and arrays are converted to Python numbers and lists.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise RunFileError(
            f"cannot write {path} as JSON: {err}; pass plain dicts/lists/str/int/float/bool/None "
            f"(replace NaN/inf with None)"
        ) from err
    return atomic_write_text(path, text + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or corrupt file raises :class:`RunFileError` naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path} not found: run the stage that writes it first, or check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFileError(f"{path} is not valid JSON ({err}): delete it and re-run the stage that writes it") from err


def save_array(path: str | Path, arr: np.ndarray) -> Path:
    """Save ``arr`` as ``.npy`` (no pickle) atomically; ``path`` must end in ``.npy``."""
    path = Path(path)
    if path.suffix != ".npy":
        raise RunFileError(f"save_array writes .npy files; name the file '{path.stem}.npy' instead of '{path.name}'")
    arr = np.asarray(arr)
    if arr.dtype.hasobject:
        raise RunFileError(
            f"cannot save an object array to {path}: convert it to a numeric or fixed-width string dtype"
        )
    with atomic_open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    return path


def load_array(path: str | Path, *, mmap_mode: str | None = None) -> np.ndarray:
    """Load a ``.npy`` file written by :func:`save_array` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"{path} not found: run the stage that writes it first, or check the path")
    try:
        return np.load(path, allow_pickle=False, mmap_mode=mmap_mode)
    except (ValueError, OSError, EOFError) as err:
        raise RunFileError(f"{path} is not a readable .npy file ({err}): delete it and re-run the stage that writes it") from err
