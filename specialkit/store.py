"""The run store: the folder protocol every run, multi-seed run and study shares, in one place.

``runs/<name>/`` holds ``config.json`` and one folder per stage. A stage is finished when its ``done.json``
marker records the same *key* — a hash of the settings the stage depends on and of the stages before it
(:func:`stage_key`) — and every file it lists is still there with its size (:func:`is_done`). Work starts with
:func:`begin` (``key.txt`` names the key the folder is being made for; finished work for other settings is moved
aside to ``<stage>.old-<its key>`` until the new work is done) and ends with :func:`finish` (``done.json``,
written last and atomically). A study shares a finished stage between runs of the same key by hard links
(:func:`install`). The manifests of multi-seed runs (``seeds.json``) and studies (``study.json``,
``adopted.json``) are named here too; :func:`load_study` reads a finished study's.

Nothing here trains or knows what a stage computes; it imports only the file helpers of :mod:`specialkit.runs`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from . import runs
from .errors import ConfigError, StudyError

__all__ = [
    "RESULTS_FORMAT",
    "NOT_RESULTS",
    "SEEDS_FILE",
    "STUDY_FILE",
    "ADOPTED_FILE",
    "hash_key",
    "stage_key",
    "is_done",
    "begin",
    "finish",
    "read_key",
    "config_diff",
    "record_config",
    "link_tree",
    "install",
    "load_study",
    "study_of",
    "sha256_text",
]

RESULTS_FORMAT = 1
"""Bumped when a stage's saved results change meaning; every stage key includes it (the package version not, so
upgrading specialkit keeps trained stages)."""
NOT_RESULTS = ("done.json", "key.txt", "state.pt")
"""Files of a stage folder that are not its results (``done.json`` does not list them)."""
SEEDS_FILE = "seeds.json"
"""The manifest of a multi-seed run's parent folder: the settings every seed shares and the seeds."""
STUDY_FILE = "study.json"
"""The manifest of a study folder: definition, then rows and summary when finished."""
ADOPTED_FILE = "adopted.json"
"""What a study's run took from other runs by hard links: stage -> the donor run folder."""


def hash_key(parts: Mapping[str, Any]) -> str:
    """The 16-hex-digit key of ``parts`` (a JSON-able mapping, keys sorted; non-JSON values by ``str``).

    Args:
        parts: what the key depends on.

    Returns:
        The key.
    """
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_text(text: str) -> str:
    """The sha256 hex digest of ``text`` (UTF-8).

    Args:
        text: any text.

    Returns:
        64 hex digits.
    """
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(
    stage: str,
    settings: Mapping[str, Mapping[str, Any]],
    chain: tuple[str, ...],
    *,
    spec_json: str | None = None,
    version: tuple[str, int] | None = None,
    clusters_file_text: str | None = None,
) -> str:
    """The key a finished ``stage`` must record to count as up to date.

    Args:
        stage: the stage's name.
        settings: settings group -> its hashed settings (``data`` and every group of ``chain``).
        chain: the settings groups in the key (:func:`specialkit.stages.key_chain`).
        spec_json: the cluster spec, for a stage after the clusters (:func:`specialkit.stages.uses_spec`).
        version: ``(name, number)`` of the stage's results (:attr:`specialkit.stages.Stage.version`).
        clusters_file_text: the contents of a given ``clusters_file`` (the clusters stage's key only).

    Returns:
        The key (:func:`hash_key` of all of it and :data:`RESULTS_FORMAT`).
    """
    parts: dict[str, Any] = {"stage": stage, "format": RESULTS_FORMAT, "settings": settings["data"]}
    for group in chain:
        parts[group] = settings[group]
    if spec_json is not None:
        parts["spec"] = spec_json
    if version is not None:
        parts[version[0]] = version[1]
    if clusters_file_text is not None:
        parts["clusters_file"] = clusters_file_text
    return hash_key(parts)


def is_done(folder: Path, key: str, *, extra_files: tuple[Path, ...] = ()) -> bool:
    """Whether the stage folder ``folder`` finished with ``key``: its ``done.json`` records the key and every file it
    lists is still there with its size (with ``extra_files``: those must exist instead, and the listed ones are not
    checked — the clusters stage, whose result is the run's ``clusters.json``).

    Args:
        folder: a stage folder (or one specialist's).
        key: the key it must record.
        extra_files: files outside the folder that stand for its results.

    Returns:
        True when finished and intact.
    """
    marker = folder / "done.json"
    if not marker.is_file():
        return False
    try:
        done = runs.read_json(marker)
    except (ValueError, OSError):
        return False
    if not isinstance(done, dict) or done.get("key") != key:
        return False
    files = done.get("files", {})
    if extra_files:
        files = {}
        if not all(p.is_file() for p in extra_files):
            return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def begin(folder: Path, key: str, *, log: Callable[[str], None] = print) -> None:
    """Start work on a stage folder. Resuming the same key keeps it; finished work for other settings is moved
    aside to ``<folder>.old-<its key>`` (removed once the replacement is done), unfinished work for other settings
    is cleared.

    Args:
        folder: the stage folder.
        key: the key the work is for.
        log: where the move-aside message goes.
    """
    owner = folder / "key.txt"
    if folder.exists() and (not owner.is_file() or owner.read_text().strip() != key):
        if (folder / "done.json").is_file():
            aside = _move_aside(folder)
            log(f"[{folder.name}] settings changed: previous results kept in {aside} until the new ones are done")
        else:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs.atomic_write_text(owner, key)


def _move_aside(folder: Path) -> Path:
    """Rename the finished stage folder ``folder`` to ``<name>.old-<its key>`` (replacing an older one there)."""
    aside = folder.with_name(f"{folder.name}.old-{read_key(folder)}")
    if aside.exists():
        shutil.rmtree(aside)
    folder.rename(aside)
    return aside


def finish(folder: Path, key: str, **info: Any) -> None:
    """Mark ``folder`` done with ``key`` (written last, atomically), listing its files and sizes so a deleted or
    truncated file makes the stage count as not done; then drop superseded copies (``<name>.old-*``).

    Args:
        folder: the stage folder.
        key: its key.
        **info: more fields of ``done.json`` (seconds, examples_seen, ``torch_threads`` ...).
    """
    files = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in NOT_RESULTS and not p.name.startswith(".")
    }
    runs.atomic_write_json(folder / "done.json", {"key": key, **info, "files": files})
    for aside in folder.parent.glob(f"{folder.name}.old-*"):
        shutil.rmtree(aside, ignore_errors=True)


def read_key(folder: Path) -> str:
    """The key a stage folder was made for (``done.json``, else ``key.txt``), or ``unknown``.

    Args:
        folder: a stage folder.

    Returns:
        Its key (alphanumeric, at most 32 characters) or ``"unknown"``.
    """
    for name in ("done.json", "key.txt"):
        try:
            text = (folder / name).read_text().strip()
            key = json.loads(text).get("key") if name == "done.json" else text
            if key and all(ch.isalnum() for ch in key):
                return str(key)[:32]
        except (OSError, ValueError, AttributeError):
            continue
    return "unknown"


_MISSING = object()


def config_diff(on_disk: Mapping[str, Any], config: Any) -> list[str]:
    """Keys whose values differ between a ``config.json`` as read and ``config`` as JSON would store it. A setting
    added after the file was written is missing there; at its default it is no difference (the run was made with the
    behaviour that default keeps), so an upgrade of the kit does not turn old runs into errors.

    Args:
        on_disk: the file's settings.
        config: a ``PipelineConfig`` (its type's defaults are the defaults).

    Returns:
        The differing keys, sorted.
    """
    mine, default = _as_json(config.to_dict()), _as_json(type(config)().to_dict())
    return sorted(
        k for k in set(on_disk) | set(mine) if on_disk.get(k, default.get(k, _MISSING)) != mine.get(k, _MISSING)
    )


def record_config(path: Path, config: Any, *, overwrite: bool) -> None:
    """Write ``config`` to ``path`` when missing; the same settings: write nothing; others: raise unless ``overwrite``.

    Args:
        path: the run's ``config.json``.
        config: a ``PipelineConfig``.
        overwrite: replace a file that records other settings.

    Raises:
        ConfigError: the file records other settings (naming them) or is not JSON, and ``overwrite`` is false.
    """
    if path.is_file():
        try:
            on_disk = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            if not overwrite:
                raise ConfigError(
                    f"{path} is not valid JSON ({err}); fix it, or pass overwrite=True "
                    "(`specialkit run --overwrite`) to replace it"
                ) from err
            on_disk = {}
        if not isinstance(on_disk, dict):
            on_disk = {}
        diff = config_diff(on_disk, config)
        if not diff:
            return
        if not overwrite:
            shown = ", ".join(
                f"{k}: {on_disk.get(k, '(missing)')!r} there, {config.to_dict().get(k, '(missing)')!r} here"
                for k in diff[:6]
            ) + (" ..." if len(diff) > 6 else "")
            raise ConfigError(
                f"{path} records other settings ({shown}); open the run as it is with Run.open({str(path.parent)!r}), "
                "or pass overwrite=True (`specialkit run --overwrite`, `run.with_settings(...)`) to change them"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path)


def _as_json(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def link_tree(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` file by file as hard links (a copy where links are refused); ``state.pt``
    (unfinished training) is left out.

    Args:
        src: the folder to copy.
        dst: where (must not exist).
    """
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_dir():
            link_tree(p, dst / p.name)
        elif p.is_file() and p.name != "state.pt":
            try:
                os.link(p, dst / p.name)
            except OSError:
                shutil.copy2(p, dst / p.name)


def install(run_folder: Path, stage: str, donor: Path, *, extra_files: tuple[str, ...] = ()) -> None:
    """Put ``donor``'s finished ``stage`` folder in place of the run's (hard links; unfinished work is dropped,
    finished work of other settings moved aside as :func:`begin` does).

    Args:
        run_folder: the run taking the stage.
        stage: the stage's name (its folder).
        donor: the run folder it comes from.
        extra_files: files of the run folder that belong to the stage (``clusters.json``), copied too.
    """
    dst = run_folder / stage
    tmp = dst.with_name(f".{stage}.adopting")
    if tmp.exists():
        shutil.rmtree(tmp)
    link_tree(donor / stage, tmp)
    for name in extra_files:
        runs.atomic_write_text(run_folder / name, (donor / name).read_text())
    if dst.exists():
        if (dst / "done.json").is_file():
            _move_aside(dst)
        else:
            shutil.rmtree(dst)
    tmp.rename(dst)


def load_study(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished study (``study.json``: definition, rows, summary, keys).

    Args:
        folder: the study folder (``runs/<study>``).

    Returns:
        The manifest.

    Raises:
        StudyError: no manifest there, or the study has not finished.
    """
    path = Path(folder) / STUDY_FILE
    if not path.is_file():
        raise StudyError(f"{folder} holds no {STUDY_FILE}; run `specialkit study ... --name {Path(folder).name}` first")
    manifest = runs.read_json(path)
    if "rows" not in manifest:
        raise StudyError(f"{path}: the study has not finished; rerun the same `specialkit study` command to resume it")
    return manifest


def study_of(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of the finished study the run folder belongs to (``runs/<study>/<point>/seed-<s>/``), or ``None``
    (not part of a study, or the study has not finished: its summary is written last).

    Args:
        folder: a run folder.

    Returns:
        The manifest or ``None``.
    """
    for parent in (Path(folder).parent, Path(folder).parent.parent):
        if (parent / STUDY_FILE).is_file():
            try:
                return load_study(parent)
            except StudyError:
                return None
    return None
