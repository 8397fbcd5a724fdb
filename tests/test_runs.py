"""Run-folder bookkeeping (issue 11): the write lock with real processes, stage keys that survive a
version bump, superseded stages moved aside, done = marker + files, per-specialist keys and a
hand-edited clusters.json that is never overwritten silently."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import specialkit
from specialkit import checkpoints, cli, clusters, pipeline, runs, specialists, training
from specialkit.config import PipelineConfig

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}


def _holder(folder: Path, *, seconds: float = 60) -> subprocess.Popen:
    """A real second process that takes the run folder's lock and holds it."""
    code = (
        f"import sys, time\nfrom specialkit.runs import RunLock\nwith RunLock({str(folder)!r}):\n"
        f"    print('held', flush=True)\n    time.sleep({seconds})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ------------------------------------------------------------------------------------------- locks
def test_second_writer_gets_one_line_naming_the_holder(tmp_path):
    folder = tmp_path / "runs" / "quick"
    holder = _holder(folder)
    try:
        with pytest.raises(
            runs.RunLockedError, match=rf"in use by pid {holder.pid} on {re.escape(socket.gethostname())}"
        ):
            runs.RunLock(folder).acquire()
        # a second `specialkit run` on the same name with other settings: refused before touching the folder
        cmd = [
            sys.executable,
            "-m",
            "specialkit.cli",
            "run",
            "--quick",
            "--no-progress",
            "--out",
            str(tmp_path / "runs"),
            "--k",
            "6",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and "Traceback" not in out.stderr
        assert not (folder / "config.json").exists() and not (folder / "generalist").exists()
    finally:
        holder.kill()
        holder.wait()
    with runs.RunLock(folder) as lock:  # the kernel frees a dead holder's lock
        assert lock.held and json.loads((folder / runs.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (folder / runs.LOCK_NAME).read_text() == ""  # released: the file no longer names a holder


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (tmp_path / runs.LOCK_NAME).read_text()
    said: list[str] = []
    with runs.RunLock(tmp_path, log=said.append) as lock:
        assert lock.held
    assert (
        len(said) == 1 and "stale lock" in said[0] and f"pid {holder.pid}" in said[0] and "no longer running" in said[0]
    )


def test_shared_locks_coexist_and_keep_an_exclusive_writer_out(tmp_path):
    with runs.RunLock(tmp_path, shared=True), runs.RunLock(tmp_path, shared=True):
        with pytest.raises(runs.RunLockedError, match="in use by"):
            runs.RunLock(tmp_path).acquire()
    with runs.RunLock(tmp_path):
        pass


# ------------------------------------------------------------------------------------------- stages
def _copy(run: pipeline.Run, dest: Path, *, log=None, config: PipelineConfig | None = None) -> pipeline.Run:
    """A copy of ``run``'s folder, opened (with other settings when ``config`` is given)."""
    shutil.copytree(run.folder, dest)
    if config is None:
        return pipeline.Run.open(dest, log=log or (lambda s: None))
    (dest / "config.json").unlink()  # a Run writes config.json only when it is missing
    return pipeline.Run(dest, config, log=log or (lambda s: None))


def test_version_bump_keeps_trained_stages(tiny, monkeypatch):
    before = {s: tiny.key(s) for s in ("generalist", "clusters", "specialists")}
    monkeypatch.setattr(specialkit, "__version__", "99.0.0")
    again = pipeline.Run.open(tiny.folder, log=lambda s: None)
    assert {s: again.key(s) for s in before} == before
    assert all(again.is_done(s) for s in before)
    assert all(again.is_done("specialists", again.specialist_key(i), again.specialist_dir(i)) for i in range(2))


def test_superseded_stage_is_moved_aside_until_its_replacement_is_done(tiny, tmp_path, monkeypatch):
    old_key = tiny.key("generalist")
    run = _copy(tiny, tmp_path / "r", config=tiny.config.replace(epochs=2))
    assert run.key("generalist") != old_key and not run.is_done("generalist")

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run.generalist()
    aside = run.folder / f"generalist.old-{old_key}"
    assert (aside / "model.pt").is_file() and (aside / "done.json").is_file()  # kept while nothing replaces it
    monkeypatch.undo()
    run = pipeline.Run.open(run.folder, log=lambda s: None)
    run.generalist()
    assert run.is_done("generalist") and not aside.exists()  # dropped once the replacement is done


def test_corrupt_checkpoint_advice_followed_end_to_end(tiny, tmp_path, capsys):
    run = _copy(tiny, tmp_path / "r")
    model = run.folder / "generalist" / "model.pt"
    model.write_bytes(b"\0" * model.stat().st_size)  # same size: the marker alone cannot tell
    assert cli.main(["generalist", "--run", str(run.folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err
    target = Path(re.search(r"delete (\S+) and run `specialkit generalist --run ", err).group(1))
    assert target == model
    target.unlink()  # follow the advice
    assert cli.main(["generalist", "--run", str(run.folder)]) == 0
    assert "[generalist] training" in capsys.readouterr().out
    assert checkpoints.read_info(model).extra["stage"] == "generalist"
    assert pipeline.Run.open(run.folder, log=lambda s: None).is_done("generalist")


def test_a_truncated_result_file_makes_the_stage_count_as_not_done(tiny, tmp_path):
    run = _copy(tiny, tmp_path / "r")
    logits = run.folder / "generalist" / "logits_test.npy"
    logits.write_bytes(logits.read_bytes()[:100])
    assert not run.is_done("generalist")
    assert run.generalist().logits["test"].shape[1] == 62 and run.is_done("generalist")


def test_wrong_stage_checkpoint_is_refused(tiny, tmp_path):
    run = _copy(tiny, tmp_path / "r")
    gen = run.folder / "generalist" / "model.pt"
    shutil.copy(run.specialist_dir(0) / "model.pt", gen)
    with pytest.raises(checkpoints.CheckpointError, match=r"not by the generalist stage.*delete \S*model\.pt"):
        checkpoints.load_checkpoint(gen, stage="generalist")
    # in a run the copied file is never accepted: it is retrained (other size) or refused
    result = run.generalist()
    assert result.model.config.num_classes == 62 and checkpoints.read_info(gen).extra["stage"] == "generalist"
    spec_model = run.specialist_dir(1) / "model.pt"
    shutil.copy(gen, spec_model)
    with pytest.raises(checkpoints.CheckpointError, match="incomplete metadata"):
        checkpoints.load_checkpoint(spec_model, required_extra=specialists.SPECIALIST_EXTRA)


def test_editing_one_group_retrains_only_that_specialist(tiny, tmp_path):
    run = _copy(tiny, tmp_path / "r")
    spec = run.clusters()
    g1 = list(spec.groups)[1]
    keys = [run.specialist_key(i) for i in range(2)]
    run.save_clusters(spec.with_class_removed(spec.groups[g1][0], g1))
    run = pipeline.Run.open(run.folder, log=lambda s: None)
    assert run.specialist_key(0) == keys[0] and run.specialist_key(1) != keys[1]
    assert run.is_done("specialists", run.specialist_key(0), run.specialist_dir(0))
    assert not run.is_done("specialists", run.specialist_key(1), run.specialist_dir(1))


def test_hand_edited_clusters_json_is_backed_up_not_overwritten_silently(tiny, tmp_path):
    said: list[str] = []
    run = _copy(tiny, tmp_path / "r", log=said.append, config=tiny.config.replace(k=3))
    path = run.folder / "clusters.json"
    spec = clusters.ClusterSpec.load(path)
    g0 = list(spec.groups)[0]
    edited = spec.with_class_removed(spec.groups[g0][0], g0).to_json()
    path.write_text(edited)  # a person edits the file, then changes the clustering setting
    new = run.clusters()
    backups = list(run.folder.glob("clusters.edited-*.json"))
    assert len(new.groups) == 3 and len(backups) == 1 and backups[0].read_text() == edited
    assert any("edited by hand" in s and str(backups[0]) in s for s in said)


def test_group_names_too_long_for_a_file_name_get_a_short_folder(tiny, tmp_path):
    run = _copy(tiny, tmp_path / "r")
    spec = run.clusters()
    long = {("g" * 300 if i == 0 else n): m for i, (n, m) in enumerate(spec.groups.items())}
    run.save_clusters(clusters.ClusterSpec(long, spec.class_names))
    name = run.specialist_dir(0).name
    assert len(name) <= 60 and name.startswith("00-ggg")
    assert run.specialist_dir(1).name == f"01-{list(spec.groups)[1]}"


def test_a_variant_run_copies_the_stages_before_the_one_it_changes(tiny, tmp_path):
    """``runner.variant_run`` (the benches' extra runs): the finished stages its first changed stage depends on are
    copied from the base run, so only that stage and what follows are made; ``from_stage="distill"`` keeps the
    specialists (and with them the student's teacher) and changes only the student."""
    import filecmp

    from specialkit import runner

    student = runner.variant_run(tiny, tmp_path / "st", from_stage="distill", student_epochs=2)
    assert student.config.student_epochs == 2 and student.config.name == "st"
    assert student.is_done("specialists") and student.key("specialists") == tiny.key("specialists")
    for i in range(len(tiny.groups())):
        a, b = tiny.specialist_dir(i) / "model.pt", student.specialist_dir(i) / "model.pt"
        assert filecmp.cmp(a, b, shallow=False)  # copied, not trained again
    assert student.key("distill") != tiny.key("distill") and not student.is_done("distill")
    shared = runner.variant_run(tiny, tmp_path / "sh", specialist_shared_stages=1)  # from the specialists on
    assert shared.is_done("generalist") and shared.key("specialists") != tiny.key("specialists")
    assert (shared.folder / "clusters.json").is_file()
