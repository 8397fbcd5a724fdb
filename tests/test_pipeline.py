"""End to end: the whole pipeline in quick mode, killed in the specialist stage, resumed; the same numbers."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from specialkit import cli, pipeline
from specialkit.clusters import ClusterSpec
from specialkit.config import ConfigError, PipelineConfig

pytestmark = pytest.mark.slow
# Tiny settings (seconds, not minutes): what is tested is caching, resume and the artifacts, not accuracy.
SETTINGS = {
    "k": 4,
    "per_class": 16,
    "epochs": 2,
    "specialist_epochs": 2,
    "student_epochs": 1,
    "rules": ("generalist", "kl", "kl_calibrated", "top_confident", "moe"),
}
FLAGS = ["--k", "4", "--per-class", "16", "--epochs", "2", "--specialist-epochs", "2", "--student-epochs", "1"]


def _numbers(metrics: dict) -> dict:
    """Every number that must not depend on an interruption (latency is a measurement, left out)."""
    m = json.loads(json.dumps(metrics))
    m["cost"].pop("latency", None)
    m["cost"].pop("latency_key", None)
    for row in m["cost"].get("summary", []):
        row.pop("ms_per_image_b1", None), row.pop("ms_per_image_b256", None)
    m.pop("timings", None)
    m.pop("config", None)
    return m


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pipeline.Run:
    run = pipeline.Run(tmp_path_factory.mktemp("a") / "quick", PipelineConfig.quick(**SETTINGS), log=lambda s: None)
    run.run_all()
    return run


def test_uninterrupted_run_writes_every_artifact(finished):
    f = finished.folder
    for rel in (
        "config.json",
        "clusters.json",
        "metrics.json",
        "report.html",
        "generalist/model.pt",
        "generalist/logits_test.npy",
        "compute_matched/model.pt",
        "distill/model.pt",
    ):
        assert (f / rel).is_file(), rel
    assert len(list((f / "specialists").glob("*/model.pt"))) == 4
    assert not list(f.rglob("*.tmp")) and not list(f.rglob("state.pt"))
    metrics = json.loads((f / "metrics.json").read_text())
    names = [r["name"] for r in metrics["comparison"]]
    assert names == [
        "generalist",
        "compute_matched",
        "kl",
        "kl_calibrated",
        "top_confident",
        "moe",
        "student",
        "hard_label_student",
        "student_matched",
    ]
    assert all(0.0 <= r["top1"] <= 1.0 for r in metrics["comparison"])
    assert all(r["nll"] >= 0 and math.isfinite(r["nll"]) and 0.0 <= r["ece"] <= 1.0 for r in metrics["comparison"])
    rows = {r["name"]: r for r in metrics["comparison"]}
    for r in rows.values():  # the keys tools read (trust issue): every row carries its uncertainty
        assert r["top1_ci"][0] <= r["top1"] <= r["top1_ci"][1]
        lo, hi = r["gain_vs_generalist_ci"]
        assert lo <= r["delta_top1"] + 1e-12 and r["delta_top1"] <= hi + 1e-12
        assert {"p_vs_generalist", "p_vs_compute_matched", "fixed", "broken"} <= set(r)
    assert rows["generalist"]["p_vs_generalist"] is None and rows["compute_matched"]["p_vs_compute_matched"] is None
    assert 0.0 < rows["kl"]["p_vs_generalist"] <= 1.0 and 0.0 < rows["kl"]["p_vs_compute_matched"] <= 1.0
    assert rows["kl"]["n_correct"] - rows["generalist"]["n_correct"] == rows["kl"]["fixed"] - rows["kl"]["broken"]
    assert all(
        r["too_small"] == (r["n_examples"] < 30) and len(r["relative_gain_ci"]) == 2 for r in metrics["table4"]["kl"]
    )
    assert max(c["dustbin_gap"] for c in metrics["init_check"]) < 1e-3  # specialists start as the generalist
    assert set(metrics["dustbin_corrections"]["kl_top1"]) == {"odds", "paper_literal", "prior_match", "none"}
    assert metrics["compute_matched"]["budget"]["match"] == "flops"
    t4 = [r for r in metrics["table4"]["kl"] if r["covered_by"] != "total"]
    assert sum(r["n_examples"] for r in t4) == metrics["dataset"]["test"]
    page = (f / "report.html").read_text()
    for heading in (
        "The generalist",
        "The confusion structure",
        "The specialists",
        "Table 4",
        "Distilling",
        "95% CI",
        "McNemar",
        "compute-matched generalist",
        "not each side at its fastest",  # the latencies say how they were measured
        "the median of a few passes, with no interval",
    ):
        assert heading in page
    assert page.count("Plotly.newPlot") >= 10 and '<script src="http' not in page  # plotly.js embedded: works offline


def test_the_student_is_read_against_its_hard_label_control(finished):
    """Issue 20: the student's gain is split into what the extra training gives (the hard-label control, same start,
    epochs and lr, no teacher, against the generalist) and what distillation adds (the student against the control)."""
    from specialkit import metrics, report

    run = finished
    control, student = run.hard_label_student(), run.distill()
    assert control.examples_seen == student.examples_seen and len(control.history) == len(student.history)
    assert not np.array_equal(control.logits["test"], student.logits["test"])  # the teacher changed the student
    m = json.loads((run.folder / "metrics.json").read_text())
    vs, ctl = m["student"]["vs_hard_label"], m["student"]["hard_label_vs_generalist"]
    rows = {r["name"]: r for r in m["comparison"]}
    assert vs["gain"] == pytest.approx(rows["student"]["top1"] - rows["hard_label_student"]["top1"])
    assert ctl["gain"] == pytest.approx(rows["hard_label_student"]["delta_top1"])
    assert vs["ci"][0] <= vs["gain"] <= vs["ci"][1] and vs["verdict"] in ("better", "worse", "indistinguishable")
    assert (
        "hard-label control" in report.reading(m) and "hard-label control" in (run.folder / "report.html").read_text()
    )
    # cached like every stage, and it depends on neither the groups nor the specialists
    stamp = (run.stage_dir("hard_label_student") / "done.json").stat().st_mtime_ns
    run.ensure("hard_label_student")
    assert (run.stage_dir("hard_label_student") / "done.json").stat().st_mtime_ns == stamp
    other_k = pipeline.Run(run.folder.parent / "other-k", run.config.replace(k=3), log=lambda s: None)
    assert other_k.key("hard_label_student") == run.key("hard_label_student") != run.key("distill")
    assert "hard_label_student" in metrics.NOT_RULES  # a control, never read as a combination rule in studies
    off = pipeline.Run(run.folder.parent / "off", run.config.replace(hard_label_control=False), log=lambda s: None)
    assert off.skip_reason("hard_label_student") == "hard_label_control=false"


def test_the_student_is_read_against_the_generalist_matched_to_its_whole_budget(finished):
    """Issue 20: the student-matched generalist is the generalist trained further for the student's whole budget (the
    specialists' training, the teacher's forward passes, the student's own passes); the student is compared with it."""
    from specialkit import cost, metrics, report

    run = finished
    m = json.loads((run.folder / "metrics.json").read_text())
    rows = {r["name"]: r for r in m["comparison"]}
    sm = m["student_matched"]
    assert sm["examples_seen"] == run.student_matched().examples_seen
    assert sm["budget"] == json.loads(json.dumps(cost.student_budget(run.view())))
    # more compute than the specialists alone bought, and more passes than the student made
    assert sm["examples_seen"] > m["compute_matched"]["examples_seen"]
    assert sm["examples_seen"] > run.distill().examples_seen
    vs = m["student"]["vs_student_matched"]
    assert vs["gain"] == pytest.approx(rows["student"]["top1"] - rows["student_matched"]["top1"])
    assert vs["ci"][0] <= vs["gain"] <= vs["ci"][1] and vs["verdict"] in ("better", "worse", "indistinguishable")
    assert "student's whole budget" in report.reading(m)
    assert "student_matched" in metrics.NOT_RULES
    assert run.key("student_matched") not in (run.key("compute_matched"), run.key("distill"))
    # it depends on the student: another student recipe trains it again
    other = pipeline.Run(run.folder.parent / "other-st", run.config.replace(student_epochs=2), log=lambda s: None)
    assert other.key("student_matched") != run.key("student_matched")
    off = pipeline.Run(run.folder.parent / "off-sm", run.config.replace(student_matched=False), log=lambda s: None)
    assert off.key("student_matched") == run.key("student_matched")  # a switch, not a setting of the result


def test_the_ensembles_stage_saves_kl_as_the_paper_rule_and_kl_calibrated_on_the_runs_calibrations(finished):
    """Issue 20: ``kl_calibrated`` is the paper's objective on each specialist's calibrated evidence (fitted on the
    validation images), ``kl`` the paper's rule unchanged; both saved by the stage for both splits."""
    from specialkit import cost, ensemble, ensembles, frontier, specialists

    run = finished
    for split in ("val", "test"):
        p_gen, active = run.generalist().probs(split), ensembles.activation_of(run, split)
        outs = [ensemble.SpecialistOutputs(g, p) for g, p in zip(run.groups(), specialists.probs_of(run, split))]
        saved = {r: np.load(run.stage_dir("ensembles") / f"q_{split}_{r}.npy") for r in ("kl", "kl_calibrated")}
        np.testing.assert_array_equal(saved["kl"], ensemble.combine_kl(p_gen, outs, active))
        cal = ensembles.calibrations_of(run)
        assert len(cal) == len(outs) and all(c.temperature > 0 for c in cal)
        np.testing.assert_array_equal(saved["kl_calibrated"], ensemble.combine_kl(p_gen, outs, active, calibration=cal))
        assert not np.array_equal(saved["kl"], saved["kl_calibrated"])
    m = json.loads((run.folder / "metrics.json").read_text())  # the cost figure and the frontier show it, like kl
    points = cost.cost_points(m).set_index("name")
    assert points.loc["kl_calibrated (conditional)", "cost"] == points.loc["kl (conditional)", "cost"]
    frontier_points = frontier.run_points(m).set_index("name")
    assert frontier_points.loc["kl_calibrated (conditional)", "kind"] == "ensemble"


def test_killed_in_specialist_stage_resumes_to_the_same_numbers(finished, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "specialkit.cli", "run", "--quick", "--no-progress", "--out", str(out), *FLAGS]
    cmd[5:5] = ["--set", "latency=false"]  # a measurement _numbers leaves out anyway: 7 s of the suite saved
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    first = out / "quick" / "specialists"
    deadline = time.monotonic() + 600
    try:
        while not list(first.glob("*/done.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the specialist stage never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(list(first.glob("*/done.json")))
    assert done_before < 4, "killed too late: every specialist had finished"
    assert not (out / "quick" / "metrics.json").exists()

    resumed = pipeline.Run.open(out / "quick", log=lambda s: None)
    resumed.run_all()
    assert _numbers(json.loads((out / "quick" / "metrics.json").read_text())) == _numbers(
        json.loads((finished.folder / "metrics.json").read_text())
    )
    assert (out / "quick" / "report.html").stat().st_size > 100_000


def test_new_cluster_spec_invalidates_only_later_stages(finished, tmp_path):
    run = pipeline.Run.open(finished.folder, log=lambda s: None)
    assert all(run.is_done(s) for s in ("generalist", "clusters", "specialists", "ensembles", "distill"))
    spec = run.clusters()
    first, second = list(spec.groups)[:2]
    cls = next(c for c in spec.groups[first] if c not in spec.groups[second])  # groups may overlap
    moved = spec.with_class_moved(cls, first, second)
    run.save_clusters(moved)
    assert run.is_done("generalist") and run.is_done("clusters")
    assert not run.is_done("specialists") and not run.is_done("ensembles") and not run.is_done("distill")
    assert ClusterSpec.load(run.folder / "clusters.json") == moved
    run.save_clusters(spec)
    assert run.is_done("specialists") and run.is_done("distill")


def test_train_specialist_command_and_its_errors(finished, capsys):
    assert cli.main(["train-specialist", "--run", str(finished.folder), "--index", "1"]) == 0
    assert "specialist 1" in capsys.readouterr().out
    assert cli.main(["train-specialist", "--run", str(finished.folder), "--index", "9"]) == 2
    assert "out of range: this run has 4 groups" in capsys.readouterr().err


def test_metrics_and_report_train_nothing_and_name_the_missing_stage(tmp_path):
    from specialkit import metrics, report

    run = pipeline.Run(
        tmp_path / "partial", PipelineConfig.quick(per_class=6, epochs=1, k=2, batch_size=64), log=lambda s: None
    )
    run.generalist()
    with pytest.raises(metrics.MissingStageError, match="no finished '(clusters|specialists)' stage"):
        metrics.compute_metrics(run)
    with pytest.raises(metrics.MissingStageError, match=r"`specialkit \w[\w-]* --run "):
        report.render_report(run, {})
    assert not run.stage_dir("specialists").exists() and not run.stage_dir("distill").exists()


def test_seeds_run_one_folder_each_and_aggregate(tmp_path, capsys):
    tiny = [
        "--quick",
        "--set",
        "latency=false",  # not what is tested here, and 13 s of the suite
        "--no-progress",
        "--per-class",
        "8",
        "--epochs",
        "1",
        "--specialist-epochs",
        "1",
        "--student-epochs",
        "1",
        "--k",
        "3",
        "--out",
        str(tmp_path),
        "--name",
        "s",
    ]
    assert cli.main(["run", *tiny, "--seeds", "0", "1"]) == 0
    summary = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert summary["seeds"]["seeds"] == [0, 1]
    kl = next(r for r in summary["seeds"]["rows"] if r["name"] == "kl" and r["metric"] == "top1")
    per = [json.loads((tmp_path / "s" / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    vals = [next(r["top1"] for r in m["comparison"] if r["name"] == "kl") for m in per]
    assert kl["values"] == {"0": vals[0], "1": vals[1]} and abs(kl["mean"] - sum(vals) / 2) < 1e-12
    assert per[0]["dataset"]["fingerprint"] == per[1]["dataset"]["fingerprint"]  # same data, same test images
    assert per[0]["config"]["seed"] == 0 and per[1]["config"]["seed"] == 1
    assert "Between seeds" in (tmp_path / "s" / "report.html").read_text()
    capsys.readouterr()
    assert cli.main(["run", *tiny, "--seeds", "0", "0"]) == 2
    assert "more than once" in capsys.readouterr().err
    assert cli.main(["run", *tiny[:-2], "--name", "s", "--seeds", "0", "--k", "4"]) == 2
    assert "other settings (differing: k)" in capsys.readouterr().err


def test_bad_settings_fail_before_any_training(tmp_path):
    with pytest.raises(ConfigError, match="k=40 groups is too many for 62 classes"):
        pipeline.Run(tmp_path / "k", PipelineConfig.quick(k=40), log=lambda s: None).run_all()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"classes": ["cat", "dog", "car"], "groups": {"pets": ["cat", "dog"]}}))
    run = pipeline.Run(tmp_path / "spec", PipelineConfig.quick(clusters_file=str(other)), log=lambda s: None)
    with pytest.raises(ValueError, match="spec is for another dataset"):
        run.run_all()
    assert not (tmp_path / "spec" / "generalist").exists()
