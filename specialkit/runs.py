"""Run folders on disk: atomic writes, ``.npy`` arrays and JSON files with clear errors.

Every write goes to a temporary file in the destination folder, is flushed to disk, then moved over
the destination with ``os.replace``; a reader never sees a half-written file and an interrupted
write leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from .errors import SpecialkitError

__all__ = [
    "RunFileError",
    "RunLockedError",
    "RunLock",
    "LOCK_NAME",
    "describe_os_error",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "read_json",
    "save_array",
    "load_array",
]


class RunFileError(SpecialkitError, ValueError):
    """A run file is missing, corrupt or cannot be written; the message names the path and the fix."""


class RunLockedError(RunFileError):
    """Another process holds the run folder's lock; the message names the holder."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free some space (or pass --out on another disk) and rerun the same command",
    errno.EDQUOT: "the disk quota is used up; free some space and rerun the same command",
    errno.EROFS: "the file system is read-only; copy the run folder to writable storage (or pass --out elsewhere)",
    errno.EACCES: "permission denied; make the folder writable for this user (or pass --out elsewhere)",
    errno.EPERM: "operation not permitted; make the folder writable for this user (or pass --out elsewhere)",
    errno.ENAMETOOLONG: "the file name is too long for this file system; use shorter names (e.g. group names)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; pass a folder",
    errno.EEXIST: "a file is in the way; pass a folder that does not clash with an existing file",
    errno.EISDIR: "a folder is in the way; remove it or choose another path",
}


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line for a failed file operation: ``"<path>: <reason> (<fix>)"``."""
    where = path if path is not None else (err.filename or "a file")
    reason = err.strerror or str(err)
    fix = _OS_FIXES.get(err.errno or -1, "check the path and rerun the same command")
    return f"{where}: {reason} ({fix})"


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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise RunFileError("cannot write " + describe_os_error(err, path)) from err
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise RunFileError("cannot write " + describe_os_error(err, path)) from err
        if isinstance(err, RuntimeError) and _disk_error(path):  # torch.save wraps a failed write in RuntimeError
            raise RunFileError("cannot write " + describe_os_error(_disk_error(path), path)) from err  # type: ignore[arg-type]
        raise


def _disk_error(path: Path) -> OSError | None:
    """An ``OSError`` explaining why writing next to ``path`` fails (full or read-only), or ``None``."""
    try:
        st = os.statvfs(path.parent)
    except OSError as err:
        return err
    if st.f_bavail * st.f_frsize < 1 << 20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    if not os.access(path.parent, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return None


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
        raise RunFileError(
            f"{path} is not a readable .npy file ({err}): delete it and re-run the stage that writes it"
        ) from err


# ---------------------------------------------------------------------------------------------- locks
LOCK_NAME = ".lock"


class RunLock:
    """An exclusive (or shared) ``fcntl.flock`` on ``<run folder>/.lock``, for every process that writes.

    The holder writes its pid and host into the file and empties it on release, so a second writer
    gets one line naming the holder. A lock file that still names a holder although nobody holds the
    lock was left by a process that died (the kernel frees a dead process's flock); it is taken over
    with a message. On read-only storage nobody can write, so the lock is skipped (``self.held`` is
    ``False``) and the first write fails with its own one-line error.

    >>> with RunLock("runs/demo"):
    ...     run.run_all()

    Args:
        folder: the run folder (created if missing).
        shared: a shared lock (parallel ``train-specialist`` jobs) instead of an exclusive one.
        log: where the stale-lock message goes.
        name: the lock file's name (one per specialist for parallel jobs).
    """

    def __init__(
        self, folder: str | Path, *, shared: bool = False, log: Callable[[str], None] = print, name: str = LOCK_NAME
    ):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.shared = shared
        self.log = log
        self.held = False
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds (or last held) the lock, from the lock file: ``"pid 123 on host"`` or ``""``."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {int(info['pid'])} on {info['host']}" + (
                f" ({info['command']})" if info.get("command") else ""
            )
        except (OSError, ValueError, KeyError, TypeError):
            return ""

    def acquire(self) -> "RunLock":
        """Take the lock (waiting is not done: a held lock raises :class:`RunLockedError` naming its holder)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and self.folder.is_dir():
                return self  # read-only storage: nobody can write here, so there is nothing to guard
            raise RunFileError("cannot lock " + describe_os_error(err, self.path)) from err
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFileError("cannot lock " + describe_os_error(err, self.path)) from err
            who = self.holder() or "parallel train-specialist jobs"
            raise RunLockedError(
                f"run folder {self.folder} is in use by {who}; wait for it to finish (or stop it), then rerun the same command"
            ) from None
        self._fd, self.held = fd, True
        if not self.shared:
            stale = self.holder()
            if stale:
                self.log(f"[lock] took over a stale lock on {self.folder}: {stale} is no longer running")
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(_argv())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        return self

    def release(self) -> None:
        """Let go of the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if not self.shared:
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd, self.held = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _argv() -> list[str]:
    import sys

    return [os.path.basename(sys.argv[0] or "python")] + sys.argv[1:4] if sys.argv else []
