"""The pipeline's stages, declared once: every list of stages in the kit is derived from :data:`STAGES`.

A stage has a name, the stages it needs, the settings group that enters its cache key and a few facts the
drivers need (its command, whether torchrun trains it, which study phase makes it, whether a study may share it
between runs by hard links, the setting that turns it off). From these follow

* the order ``run_all`` runs them in (:data:`NAMES`),
* each stage's cache-key chain (:func:`key_chain`) and whether the cluster spec enters its key (:func:`uses_spec`),
* the settings groups of ``PipelineConfig`` (:data:`KEY_GROUPS`),
* the CLI's stage commands (:func:`command_of`, :data:`COMMANDS`) and the torchrun stages (:data:`TORCHRUN`),
* the study's phases (:func:`phase_stages`) and the stages it adopts from other runs (:data:`ADOPTABLE`).

How a stage is made and loaded is its recipe, in the module named for it (``pipeline.Run.get(name)`` calls it).
This module imports nothing of the kit.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Stage",
    "STAGES",
    "NAMES",
    "KEY_GROUPS",
    "COMMANDS",
    "TORCHRUN",
    "ADOPTABLE",
    "by_name",
    "needs_all",
    "through",
    "key_chain",
    "uses_spec",
    "command_of",
    "torchrun_prerequisite",
    "phase_stages",
    "PHASES",
    "FINE_TUNE_LR",
]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the stage's name and its folder in the run (``runs/<name>/<stage>/``).
        needs: the stages whose results it reads (their keys enter its key).
        settings: the settings group (``PipelineConfig`` fields whose ``stage`` is this) that enters its key;
            default its name. The student's control trains with the student's settings (``distill``).
        doc: one line: what it makes.
        switch: the boolean setting that turns it off (``None``: always runs unless the run skips it).
        model: it saves one whole-dataset model (``model.pt`` + logits), loaded as a ``ModelResult``.
        torchrun: ``torchrun`` may train it over several processes (one model trained as one job).
        phase: the study phase that makes it (0: generalists, 1: clusters, specialists, compute-matched; 2: the rest).
            The student-matched generalist is phase 2 and not trained by ``torchrun`` (it needs the student, which
            ``torchrun`` trains; a launcher would have to chain two jobs).
        adoptable: a study may hard-link it from another run whose finished stage has the same key.
        extra_files: files of the run folder (outside the stage's folder) that must exist for it to count as done.
        seed_offset: added to the run's ``seed`` for its training (so the stages draw different random numbers).
        version: ``(name, number)`` in its key, the number bumped when its results change meaning (``ensembles``:
            ``("rules_version", 2)``, since the rules read calibrated specialists, issue 20; ``compute_matched``:
            ``("budget_version", 2)``, since its budget counts training FLOPs as the loop spends them, issue 20);
            ``None``: none.
    """

    name: str
    needs: tuple[str, ...]
    doc: str
    settings: str = ""
    switch: str | None = None
    model: bool = False
    torchrun: bool = False
    phase: int = 2
    adoptable: bool = True
    extra_files: tuple[str, ...] = ()
    seed_offset: int = 0
    version: tuple[str, int] | None = None

    @property
    def group(self) -> str:
        """The settings group in its key (:attr:`settings`, else its name)."""
        return self.settings or self.name

    @property
    def command(self) -> str:
        """Its ``specialkit`` command (``compute-matched`` for ``compute_matched``)."""
        return self.name.replace("_", "-")


STAGES: tuple[Stage, ...] = (
    Stage(
        "generalist",
        (),
        "the generalist over all classes (trained, or brought with generalist_from)",
        model=True,
        torchrun=True,
        phase=0,
    ),
    Stage(
        "clusters",
        ("generalist",),
        "the class groups from the generalist's confusions (clusters.json)",
        phase=1,
        extra_files=("clusters.json",),
    ),
    Stage(
        "specialists", ("clusters",), "one specialist per group (its classes + a dustbin)", phase=1, seed_offset=1000
    ),
    Stage(
        "compute_matched",
        ("specialists",),
        "the generalist trained further for the specialists' training compute",
        switch="compute_matched",
        model=True,
        torchrun=True,
        phase=1,
        seed_offset=2000,
        version=("budget_version", 2),
    ),
    Stage(
        "ensembles",
        ("specialists",),
        "every combination rule's distribution on val and test",
        version=("rules_version", 2),
    ),
    Stage(
        "distill",
        ("ensembles",),
        "one student trained on the kl ensemble's soft targets",
        model=True,
        torchrun=True,
        seed_offset=3000,
    ),
    Stage(
        "hard_label_student",
        ("generalist",),
        "the student's control: the same recipe on hard labels alone",
        settings="distill",
        switch="hard_label_control",
        model=True,
        adoptable=False,
        seed_offset=3000,
    ),
    Stage(
        "student_matched",
        ("distill",),
        "the generalist trained further for the student's whole budget (specialists, teacher passes, student)",
        settings="compute_matched",
        switch="student_matched",
        model=True,
        seed_offset=4000,
    ),
)
"""Every stage, in the order the pipeline runs them (a stage comes after every stage it needs)."""

FINE_TUNE_LR = 0.3
"""A model that starts from the trained generalist's weights (the compute-matched generalist, a student initialised from
the generalist and its control) trains at this times the generalist's learning rate ``lr``."""

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
"""Stage names in pipeline order (what ``run_all`` runs)."""
_BY_NAME = {s.name: s for s in STAGES}


def by_name(name: str) -> Stage:
    """The stage called ``name``.

    Args:
        name: one of :data:`NAMES`.

    Returns:
        Its declaration.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in _BY_NAME:
        raise KeyError(f"unknown stage {name!r}; choose from {', '.join(NAMES)}")
    return _BY_NAME[name]


def needs_all(name: str) -> tuple[str, ...]:
    """Every stage ``name`` depends on, directly or not, in pipeline order (``name`` itself not included).

    Args:
        name: a stage name.

    Returns:
        The stages before it that its results depend on.
    """
    seen: set[str] = set()
    todo = list(by_name(name).needs)
    while todo:
        s = todo.pop()
        if s not in seen:
            seen.add(s)
            todo.extend(by_name(s).needs)
    return tuple(n for n in NAMES if n in seen)


def through(name: str) -> tuple[str, ...]:
    """``name`` and every stage it depends on, in pipeline order (what must be finished to read ``name``).

    Args:
        name: a stage name.

    Returns:
        Stage names, ``name`` last.
    """
    return (*needs_all(name), name)


def key_chain(name: str) -> tuple[str, ...]:
    """The settings groups in ``name``'s cache key, in order: those of every stage it depends on, then its own.

    Args:
        name: a stage name.

    Returns:
        Settings group names (``data`` is always in the key as well, first, and not listed here).
    """
    chain = [by_name(s).group for s in needs_all(name)] + [by_name(name).group]
    return tuple(dict.fromkeys(chain))


def uses_spec(name: str) -> bool:
    """Whether the cluster spec (``clusters.json``) enters ``name``'s key: every stage after the clusters it needs.

    Args:
        name: a stage name.

    Returns:
        True when ``clusters`` is among the stages ``name`` depends on.
    """
    return "clusters" in needs_all(name)


KEY_GROUPS: tuple[str, ...] = ("data", *dict.fromkeys(s.group for s in STAGES))
"""The settings groups that enter cache keys, in pipeline order (``PipelineConfig`` fields' ``stage``)."""
COMMANDS: tuple[str, ...] = tuple(s.command for s in STAGES)
"""The ``specialkit`` commands that run the stages up to one (``report`` is added by the CLI)."""
TORCHRUN: tuple[str, ...] = tuple(s.name for s in STAGES if s.torchrun)
"""Stages ``torchrun`` may train (one model as one job over several processes)."""
ADOPTABLE: tuple[str, ...] = tuple(s.name for s in STAGES if s.adoptable)
"""Stages a study hard-links from another run of the same key, in pipeline order."""
PHASES: tuple[int, ...] = tuple(sorted({s.phase for s in STAGES}))
"""The study's phases."""


def command_of(name: str) -> str:
    """The ``specialkit`` command that makes stage ``name`` (``name`` with dashes).

    Args:
        name: a stage name.

    Returns:
        The command name.
    """
    return by_name(name).command


def torchrun_prerequisite(name: str) -> str | None:
    """The stage that must be finished before ``torchrun`` trains ``name``: the last stage it depends on that trains
    models one per group (``specialists``), else ``None``; every process computes the cheap stages between them.

    Args:
        name: a stage of :data:`TORCHRUN`.

    Returns:
        ``"specialists"`` or ``None``.
    """
    return "specialists" if "specialists" in needs_all(name) else None


def phase_stages(phase: int) -> tuple[str, ...]:
    """The stages a study makes in ``phase`` (in pipeline order).

    Args:
        phase: one of :data:`PHASES`.

    Returns:
        Stage names.
    """
    return tuple(s.name for s in STAGES if s.phase == phase)
