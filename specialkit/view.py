"""A read-only view of a run: what the numbers (:mod:`specialkit.metrics`), the report, the frontier measurement and
:mod:`specialkit.transfer` take, so they can read every finished stage and never train one.

``RunView(run)`` answers the same calls as the run (``view.generalist()``, ``view.combine("kl", "test")``,
``view.config`` ...) but a call whose stage is not finished raises :class:`~specialkit.errors.MissingStageError`
naming the stage and the command that makes it, where the run itself would train it. What a view cannot do at
all (train one specialist, change settings, save a cluster spec) is not there: an ``AttributeError``.

This module imports no stage code: the layers that compute numbers depend on it, not on :mod:`specialkit.pipeline`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from . import stages
from .errors import MissingStageError

__all__ = ["RunView", "ReadableRun", "require", "view_of"]


class ReadableRun(Protocol):
    """What a view needs of the run it wraps (``pipeline.Run`` has it)."""

    folder: Path
    config: Any
    log: Callable[[str], None]

    def is_done(self, stage: str, key: str | None = None, folder: Path | None = None) -> bool:
        """Whether ``stage`` is finished (for ``key`` in ``folder``, default the run's own)."""
        ...

    def skip_reason(self, stage: str) -> str | None:
        """Why the run skips ``stage`` (its setting turns it off), or ``None`` when it runs."""
        ...


def require(run: ReadableRun, *names: str) -> None:
    """Raise :class:`MissingStageError` unless every stage in ``names`` is finished in ``run``.

    Args:
        run: a run or a view of one.
        *names: stage names (:data:`specialkit.stages.NAMES`).

    Raises:
        MissingStageError: the first unfinished stage, with the command that makes it.
    """
    for name in names:
        if not run.is_done(name):
            raise MissingStageError(
                f"run {run.folder} has no finished '{name}' stage (never run, stopped, or a file of it deleted): run "
                f"`specialkit {stages.command_of(name)} --run {run.folder}` (or `Run.open(...).{name}()` in a notebook) first"
            )


_PASS = frozenset(
    {
        "folder",
        "config",
        "log",
        "timings",
        "is_done",
        "key",
        "specialist_key",
        "skip_reason",
        "scratch_reason",
        "stage_dir",
        "specialist_dir",
        "generalist_source",
        "dataset",
        "device",
        "model_config",
        "lock",
        "memo",
    }
)
"""Attributes that read settings, keys or files and train nothing: handed through as they are (``memo`` remembers what a
function of the view makes; that function calls the view, so it is guarded too)."""
_NEEDS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in stages.NAMES},
    "confusion": ("generalist",),
    "distance": ("generalist",),
    "class_map": ("generalist",),
    "shared_trunk": ("generalist",),
    "groups": ("clusters",),
    "activation": stages.through("clusters"),
    "specialist_probs": ("specialists",),
    "combine": stages.through("specialists"),
}
"""Reading methods -> the stages that must be finished before they are called (else they would train them)."""


class RunView:
    """A run that can be read and cannot train (see the module's docstring).

    Args:
        run: the run to read (``pipeline.Run``); a view of a view is the same view.
    """

    def __init__(self, run: ReadableRun):
        object.__setattr__(self, "_run", run._run if isinstance(run, RunView) else run)

    def __getattr__(self, name: str) -> Any:
        run = object.__getattribute__(self, "_run")
        if name in _PASS:
            return getattr(run, name)
        if name in _NEEDS:
            needs = _NEEDS[name]
            method = getattr(run, name)

            def guarded(*args: Any, **kwargs: Any) -> Any:
                require(run, *needs)
                return method(*args, **kwargs)

            guarded.__name__ = guarded.__qualname__ = name
            guarded.__doc__ = method.__doc__
            return guarded
        raise AttributeError(
            f"a read-only view of run {run.folder} has no {name!r}: it reads finished stages and trains "
            f"nothing; call it on the run itself (pipeline.Run.open({str(run.folder)!r}))"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a read-only view cannot set {name!r}")

    def __repr__(self) -> str:
        return f"RunView({object.__getattribute__(self, '_run').folder})"

    def require(self, *names: str) -> None:
        """:func:`require` on this view's run."""
        require(self, *names)


def view_of(run: ReadableRun) -> RunView:
    """``run`` as a :class:`RunView` (a view is returned as it is).

    Args:
        run: a run or a view.

    Returns:
        The read-only view.
    """
    return run if isinstance(run, RunView) else RunView(run)
