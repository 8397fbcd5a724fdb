"""``specialkit study``: a tiny grid (2 points x 2 seeds) killed with SIGKILL and resumed, shared stages, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from specialkit import cli, metrics, report, study
from specialkit.config import PipelineConfig

TINY = dict(
    per_class=4,
    epochs=1,
    specialist_epochs=1,
    student_epochs=1,
    k=2,
    width=4,
    depth=1,
    progress=False,
    bootstrap_resamples=1000,
    latency=False,
    html_report=False,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The base settings of :func:`study.quick_spec`, the quick study notebook 07 runs."""
    path = tmp_path_factory.mktemp("study-base") / "tiny.json"
    PipelineConfig.from_dict(study.quick_spec().base).save(path)
    return path


def _wait_for(pattern_root, pattern, proc, timeout=180.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if list(pattern_root.glob(pattern)):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory):
    """The study run as a real process, SIGKILLed once a specialist is done, then rerun to the end (in-process)."""
    out = tmp_path_factory.mktemp("studies")  # its own folder: notebook 07 may run the quick study at the same time
    args = [
        "study",
        "--base",
        str(base),
        "--grid",
        "k=2,3",
        "--seeds",
        "0",
        "1",
        "--name",
        study.QUICK_STUDY,
        "--out",
        str(out),
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "specialkit.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        reached = _wait_for(out / study.QUICK_STUDY, "*/seed-*/specialists/*/done.json", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1].decode()
    assert reached, f"the study ended or stalled before any specialist was done: {stderr[-2000:]}"
    folder = out / study.QUICK_STUDY
    assert not (folder / "study.csv").exists(), "killed too late: the study had already finished"
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/seed-*/generalist/done.json")}
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return folder, before


def test_study_rows_shared_generalist_and_resume(finished):
    folder, before = finished
    rows = pd.read_csv(folder / "study.csv")
    assert len(rows) == 4 and sorted(zip(rows["k"], rows["seed"])) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    for col in (
        "generalist_top1",
        "compute_matched_top1",
        "kl_top1_lo",
        "kl_gain_vs_generalist_hi",
        "kl_p_vs_compute_matched",
        "kl_gain_vs_compute_matched",
        "flops_conditional_ratio",
        "generalist_still_improving",
        "specialist_gap",
    ):
        assert col in rows.columns, col
        assert rows[col].notna().all(), col
    assert (
        (rows["kl_gain_vs_generalist_lo"] <= rows["kl_gain_vs_generalist"])
        & (rows["kl_gain_vs_generalist"] <= rows["kl_gain_vs_generalist_hi"])
    ).all()
    # one generalist per seed serves both k: the same file (hard link), trained once, kept across the kill
    for seed in (0, 1):
        models = list(folder.glob(f"k-*/seed-{seed}/generalist/model.pt"))
        assert len(models) == 2 and len({p.stat().st_ino for p in models}) == 1
        assert "generalist" in json.loads((folder / f"k-3/seed-{seed}/adopted.json").read_text())
    assert len({p.stat().st_ino for p in folder.glob("*/seed-*/generalist/model.pt")}) == 2
    assert before, "no generalist was finished before the kill"
    for path, mtime in before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was trained again after the kill"
    manifest = study.load_study(folder)
    assert manifest["definition"]["grid"] == {"k": [2, 3]} and len(manifest["rows"]) == 4
    kinds = {(r["k"], r["rule"], r["baseline"]) for r in manifest["summary"]}
    assert (2, "kl", "compute_matched") in kinds and (3, "moe", "generalist") in kinds
    assert all(r["seeds"] == 2 and r["lo"] <= r["mean"] <= r["hi"] for r in manifest["summary"])
    # two seeds: the interval holds the test-set noise (two-level bootstrap), and no across-seed verdict is given
    assert all(r["interval"] == "two-level bootstrap" and r["verdict"] == "too few seeds" for r in manifest["summary"])
    assert "too few seeds (2 < 5)" in report.study_reading(manifest)
    assert {"kl_gain_vs_generalist_across_seeds_lo", "kl_gain_vs_compute_matched_across_seeds_verdict"} <= set(
        rows.columns
    )
    page = (folder / "report.html").read_text()
    assert "gain against k" in page and "Plotly" in page
    # every stage records the thread count it ran with (--threads 1), and the rows carry it
    markers = list(folder.glob("*/seed-*/**/done.json"))
    assert markers and all(json.loads(m.read_text())["torch_threads"] == 1 for m in markers)
    assert (rows["torch_threads"].astype(str) == "1").all() and manifest["warnings"] == []


def test_a_study_that_mixes_thread_counts_says_so(tmp_path):
    for run, threads in (("k-2/seed-0", (1, 1)), ("k-2/seed-1", (1, 2))):
        for stage, n in zip(("generalist", "specialists/00-a"), threads):
            (tmp_path / run / stage).mkdir(parents=True)
            (tmp_path / run / stage / "done.json").write_text(json.dumps({"key": "x", "torch_threads": n}))
    assert study.stage_thread_counts(tmp_path / "k-2/seed-0") == [1]
    assert study.stage_thread_counts(tmp_path / "k-2/seed-1") == [1, 2]
    rows = [
        {"run": r, "torch_threads": " ".join(map(str, study.stage_thread_counts(tmp_path / r)))}
        for r in ("k-2/seed-0", "k-2/seed-1")
    ]
    warning = study.mixed_threads_warning(rows)
    assert warning and "1 thread(s): k-2/seed-0, k-2/seed-1" in warning and "2 thread(s): k-2/seed-1" in warning
    assert study.mixed_threads_warning(rows[:1]) is None


def test_a_points_run_report_shows_its_study(finished, tmp_path):
    from specialkit import pipeline, report

    folder, _ = finished
    point = folder / "k-2" / "seed-0"
    run = pipeline.Run.open(point, log=lambda s: None)
    page = report.render_report(run, json.loads((point / "metrics.json").read_text()))
    assert "10 · The study this run belongs to" in page and f"study {study.QUICK_STUDY}: gain against k" in page
    assert report.study_of(tmp_path / "alone" / "seed-0") is None


def test_rerun_of_a_finished_study_trains_nothing(finished):
    folder, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/seed-*/*/done.json")}
    spec = study.quick_spec()
    threads = torch.get_num_threads()
    try:
        study.run_study(spec, out=folder.parent, log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_a_half_reported_point_is_finished_on_rerun(finished, base):
    """A point killed after metrics.json but before report.html and study_seconds.json is not done: the rerun
    writes what is missing and trains nothing."""
    folder, _ = finished
    point = folder / "k-2" / "seed-0"
    html = json.loads((point / "config.json").read_text())["html_report"]
    (point / "report.html").unlink(missing_ok=not html)
    (point / "study_seconds.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/seed-*/*/done.json")}
    args = [
        "study",
        "--base",
        str(base),
        "--grid",
        "k=2,3",
        "--seeds",
        "0",
        "1",
        "--name",
        study.QUICK_STUDY,
        "--out",
        str(folder.parent),
        "--threads",
        "1",
    ]
    threads = torch.get_num_threads()
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    assert (point / "report.html").is_file() == html and json.loads((point / "study_seconds.json").read_text())[
        "resumed"
    ] is True
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_seed_interval_is_students_t():
    lo, hi = metrics.seed_interval([0.01, 0.03])
    assert lo < 0.02 < hi and hi - lo == pytest.approx(2 * 12.7062 * 0.01, rel=1e-3)
    assert metrics.seed_interval([0.02], fallback=(0.0, 0.05)) == (0.0, 0.05)


@pytest.mark.parametrize(
    "grid, words",
    [
        (["widht=8,16"], ["widht", "width"]),
        (["width=0,8"], ["width", "width=0"]),
        (["width=8.5"], ["width", "whole number"]),
        (["seed=1,2"], ["--seeds"]),
        (["name=a,b"], ["name", "changes no number"]),
        (["width="], ["width", "no values"]),
        (["width"], ["key=value1,value2"]),
    ],
)
def test_bad_grid_is_one_clear_error_before_training(grid, words, tmp_path, capsys):
    assert cli.main(["study", "--quick", "--grid", *grid, "--name", "bad", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specialkit: error:") and all(w in err for w in words), err
    assert not any(tmp_path.glob("bad/*/seed-*")), "a run folder was made for a bad grid"


def test_empty_grid_and_k_too_large_and_another_study(tmp_path, capsys):
    with pytest.raises(study.StudyError, match="grid is empty"):
        study.make_spec(name="s", base={}, grid={}, seeds=[0])
    with pytest.raises(study.StudyError, match="more than once"):
        study.make_spec(name="s", base={}, grid={"k": [2, 2]}, seeds=[0])
    spec = study.make_spec(name="s", base=PipelineConfig.quick(**TINY).to_dict(), grid={"k": [2, 40]}, seeds=[0])
    with pytest.raises(study.StudyError, match=r"k=40 .*k <= 31"):
        study.run_study(spec, out=tmp_path, log=lambda s: None)
    assert not list(tmp_path.glob("s/*/seed-*")) and not (tmp_path / "s" / study.STUDY_FILE).exists()
    study.Study(
        tmp_path / "s",
        study.make_spec(name="s", base=PipelineConfig.quick(**TINY).to_dict(), grid={"k": [2]}, seeds=[0]),
    ).record()
    other = study.make_spec(
        name="s", base=PipelineConfig.quick(**{**TINY, "width": 8}).to_dict(), grid={"k": [2, 3]}, seeds=[0]
    )
    with pytest.raises(study.StudyError, match=r"different study .*width: 4 there, 8 here.*another --name"):
        study.run_study(other, out=tmp_path, log=lambda s: None)


def test_a_study_recorded_before_a_setting_was_added_is_the_same_study(tmp_path):
    """A setting added to the kit after a study was recorded is missing from its ``study.json``; at its default it is no
    difference (an upgrade must not turn a finished study into "a different study"); at another value it is one."""
    spec = study.make_spec(name="s", base=PipelineConfig.quick(**TINY).to_dict(), grid={"k": [2]}, seeds=[0])
    s = study.Study(tmp_path / "s", spec)
    s.record()
    path = tmp_path / "s" / study.STUDY_FILE
    manifest = json.loads(path.read_text())
    del manifest["definition"]["base"]["student_matched"]  # as written before the setting existed
    path.write_text(json.dumps(manifest))
    s.record()  # the same study
    assert "student_matched" in json.loads(path.read_text())["definition"]["base"]
    path.write_text(json.dumps(manifest))  # without it again
    off = study.make_spec(
        name="s", base=PipelineConfig.quick(**TINY, student_matched=False).to_dict(), grid={"k": [2]}, seeds=[0]
    )
    with pytest.raises(study.StudyError, match=r"different study .*student_matched: True there, False here"):
        study.Study(tmp_path / "s", off).record()


def test_study_file_json(tmp_path, base):
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps({"name": "f", "base": str(base), "grid": {"specialist_soft_weight": [0.0, 0.5]}, "seeds": [3]})
    )
    d = study.load_study_file(path)
    spec = study.make_spec(name=d["name"], base=d["base"], grid=d["grid"], seeds=d["seeds"])
    assert [p["specialist_soft_weight"] for p in spec.points()] == [0.0, 0.5] and spec.seeds == (3,)
    assert spec.config(spec.points()[1], 3).specialist_soft_weight == 0.5
    path.write_text(json.dumps({"name": "f", "grid": {"k": [2]}, "sedes": [1]}))
    with pytest.raises(study.StudyError, match="sedes"):
        study.load_study_file(path)


def test_convergence_reads_the_last_epoch_and_the_compute_matched_gain():
    flat = [{"val_acc": v} for v in (0.90, 0.952, 0.978, 0.977)]  # a one-cycle warm-down, then flat
    cm_same = [
        {
            "name": "compute_matched",
            "delta_top1": 0.001,
            "gain_vs_generalist_ci": [-0.002, 0.004],
            "p_vs_generalist": 0.7,
            "vs_generalist": "indistinguishable",
        },
        {
            "name": "kl",
            "delta_top1": 0.002,
            "gain_vs_generalist_ci": [-0.001, 0.005],
            "vs_compute_matched": "indistinguishable",
        },
    ]
    c = metrics.convergence(flat, cm_same, n_val=3000)
    assert c["val_rise"] == pytest.approx(-0.001) and not c["still_improving"] and c["best_rule"] == "kl"
    assert c["verdict"] == "no sign of improvement" and c["last_epochs"] == [2, 3, 4]
    rising = [{"val_acc": v} for v in (0.60, 0.66, 0.70)]
    assert metrics.convergence(rising, cm_same, n_val=3000)["still_improving"]
    cm_better = [{**cm_same[0], "delta_top1": 0.02, "vs_generalist": "better"}]
    c = metrics.convergence(flat, cm_better, n_val=3000)
    assert c["still_improving"] and not c["val_still_rising"]
    from specialkit.report import convergence_reading

    assert "still improving" in convergence_reading(c) and "No sign" in convergence_reading(
        metrics.convergence(flat, cm_same, n_val=3000)
    )


def test_a_point_is_done_only_when_everything_it_writes_exists(tmp_path):
    from types import SimpleNamespace

    from specialkit import stages

    done = set(stages.NAMES)
    run = SimpleNamespace(
        folder=tmp_path,
        config=SimpleNamespace(html_report=True, compute_matched=True, hard_label_control=True, student_matched=True),
        skip_reason=lambda s: None,
        is_done=lambda s: s in done,
    )
    for name in ("metrics.json", "study_seconds.json"):
        (tmp_path / name).write_text("{}")
    assert not study.point_is_done(run)  # report.html missing
    (tmp_path / "report.html").write_text("<html>")
    assert study.point_is_done(run)
    done.discard("student_matched")  # a stage added to the kit after the point was made: the point is not done
    assert not study.point_is_done(run)
    run.config.student_matched = False  # ... unless it is switched off
    assert study.point_is_done(run)
    run.skip_reason = lambda s: "no model" if s == "student_matched" else None  # ... or skipped
    run.config.student_matched = True
    assert study.point_is_done(run)
    done.add("student_matched")
    run.config.html_report = False
    (tmp_path / "report.html").unlink()
    assert study.point_is_done(run)
    (tmp_path / "study_seconds.json").unlink()
    assert not study.point_is_done(run)


def test_two_level_interval_keeps_its_level_where_a_t_interval_over_seeds_does_not():
    """Simulated studies with no true gain: each test image has its own fixed tendency (fixed by the rule, broken,
    or neither) that every seed shares, and each seed flips a few images at random. The t-test over the 5 per-seed
    gains ignores the shared test-set noise and calls a difference in about half the studies; the two-level
    bootstrap in about 5%."""
    from scipy import stats as st

    from specialkit import stats

    rng = np.random.default_rng(0)
    calls_two, calls_t, studies = 0, 0, 200
    for k in range(studies):
        kind = rng.choice([-1.0, 0.0, 1.0], size=400, p=[0.1, 0.8, 0.1])
        d = np.tile(kind, (5, 1))
        flip = rng.random(d.shape) < 0.05
        d[flip] = rng.choice([-1.0, 0.0, 1.0], size=int(flip.sum()))
        two = stats.two_level_bootstrap(d, resamples=400, seed=k)
        calls_two += two.lo > 0 or two.hi < 0
        calls_t += st.ttest_1samp(d.mean(axis=1), 0.0).pvalue < 0.05
    assert calls_two / studies <= 0.10 and calls_t / studies >= 0.3, (calls_two, calls_t)


def test_holm_and_the_across_seed_verdict():
    from specialkit import stats

    adjusted = stats.holm([0.01, 0.04, 0.03, float("nan")])
    np.testing.assert_allclose(adjusted[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adjusted[3])
    assert stats.across_seed_verdict(0.01, 0.03, 0.001, 4) == "too few seeds"
    assert stats.across_seed_verdict(0.01, 0.03, 0.001, 5) == "better"
    assert stats.across_seed_verdict(0.01, 0.03, 0.2, 5) == "indistinguishable"  # Holm took the significance away
    assert stats.across_seed_verdict(-0.002, 0.003, 0.5, 6, margin=0.005) == "equivalent"
    assert stats.across_seed_verdict(-0.002, 0.008, 0.5, 6, margin=0.005) == "indistinguishable"
