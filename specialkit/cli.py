"""The ``specialkit`` command: the whole pipeline headless, or one stage at a time.

    specialkit run --config configs/demo.json          # every stage, metrics.json and report.html
    specialkit run --dataset cifar100 --root ~/data --k 10 --epochs 30 --device cuda --name c100
    specialkit train-specialist --run runs/demo --index 3   # one specialist, e.g. from a scheduler
    specialkit report --run runs/demo
    specialkit transfer --run runs/demo --target glyphs_hard   # linear probes on frozen features
    specialkit study --base configs/demo.json --grid width=8,16 k=4,8 --seeds 0 1 2 --name widths

Every stage skips what is already on disk and valid, so an interrupted command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import stages
from .config import PRESETS, ConfigError, PipelineConfig, cli_settings, parse_overrides
from .errors import SpecialkitError, exit_code_of

__all__ = ["main", "build_parser", "config_from_args"]

_KNOBS: dict[str, tuple[type, str]] = cli_settings()
"""Setting -> (type, help) of its ``--flag``: every ``PipelineConfig`` field with a ``cli`` help in its metadata."""
_STAGES = (*stages.COMMANDS, "report")


def build_parser() -> argparse.ArgumentParser:
    """The ``specialkit`` command's argument parser: ``run``, the stage commands, ``study``, ``report`` and the rest."""
    p = argparse.ArgumentParser(
        prog="specialkit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run every stage into runs/<name>/ and write report.html",
        description="Run data → generalist → clusters → specialists → ensembles → distillation → report.",
    )
    run.add_argument("--config", type=Path, help="JSON settings (a run's config.json reproduces it)")
    run.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders (default runs/)")
    run.add_argument(
        "--quick", action="store_true", help="the quick settings used by the tests (seconds); --preset quick"
    )
    run.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default=None,
        help="start from named settings: tiny (seconds), quick (the tests' and notebooks' smoke runs), demo (the defaults)",
    )
    run.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="any setting, e.g. --set width=8 rules=generalist,kl (after --config, before the flags)",
    )
    run.add_argument("--print-config", action="store_true", help="only print the resulting settings (JSON) and exit")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the settings of an existing run folder whose config.json differs (its stages that "
        "depend on the changed settings re-run); without it such a run is an error naming the keys",
    )
    run.add_argument(
        "--write-config", type=Path, metavar="PATH", help="only write the resulting settings to PATH and exit"
    )
    run.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="several seeds: one run folder each under runs/<name>/, plus a between-seed table",
    )
    for flag, (typ, text) in _KNOBS.items():
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None, help=text)
    for stage in _STAGES:
        s = sub.add_parser(stage, help=f"run the stages up to {stage} of an existing run")
        s.add_argument(
            "--run",
            "--run-folder",
            dest="run",
            type=Path,
            required=True,
            help="the run folder (runs/<name>); under torchrun write --run-folder (torchrun takes --run for its --run-path)",
        )
    ts = sub.add_parser("train-specialist", help="train one specialist of a run (for parallel jobs)")
    ts.add_argument("--run", type=Path, required=True, help="the run folder (runs/<name>)")
    ts.add_argument("--index", type=int, required=True, help="which group (0-based, order of clusters.json)")
    tr = sub.add_parser(
        "transfer", help="linear probes on a run's frozen features, on another dataset (specialkit.transfer)"
    )
    tr.add_argument("--run", type=Path, required=True, help="the run folder (runs/<name>); its stages must be finished")
    tr.add_argument("--target", required=True, help="the dataset to probe on (`specialkit datasets`), e.g. glyphs_hard")
    tr.add_argument("--target-root", default=None, help="folder with the target dataset's files")
    tr.add_argument(
        "--per-class", type=int, default=None, help="training images per target class (default: the run's per_class)"
    )
    sub.add_parser("datasets", help="list the dataset names")
    _add_study_parser(sub)
    _add_parallel_arguments(sub)
    return p


def _add_study_parser(sub: Any) -> None:
    st = sub.add_parser(
        "study",
        help="a grid of runs over any settings, several seeds each: study.csv, study.json, report.html",
        description="Run every point of a grid (x seeds) as a run folder under runs/<name>/<point>/seed-<s>/; "
        "points that share upstream settings share those stages; rerun to resume.",
    )
    st.add_argument(
        "study_file", nargs="?", type=Path, help="a JSON (or YAML) study file: name, base, grid, seeds, jobs"
    )
    st.add_argument("--base", type=Path, help="base settings of every point (a config JSON); default the demo settings")
    st.add_argument(
        "--grid", nargs="+", default=None, metavar="KEY=V1,V2", help="a setting and its values, e.g. width=8,16 k=4,8"
    )
    st.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="SEED", help="training seeds of every point (default 0)"
    )
    st.add_argument(
        "--name", default=None, help="the study folder runs/<name> (default: the study file's name, else 'study')"
    )
    st.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of the study folder (default runs/)")
    st.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="J",
        help="runs at once, each a process with cores // J threads (default 1)",
    )
    st.add_argument("--quick", action="store_true", help="start from the quick settings used by the tests")
    st.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="settings of every point's base, e.g. --set epochs=3"
    )
    st.add_argument(
        "--tie-margin",
        type=float,
        default=None,
        metavar="POINTS",
        help="an across-seed interval inside ±POINTS of top-1 reads 'equivalent' (default 0.5)",
    )


def _study(args: argparse.Namespace) -> int:
    """``specialkit study``: the definition from the study file, then the flags; checked before any training."""
    from . import runs
    from .study import StudyError, load_study_file, make_spec, parse_grid, run_study

    d = load_study_file(args.study_file) if args.study_file else {}
    base = dict(d.get("base") or {})
    if args.base is not None:
        base = PipelineConfig.load(args.base).to_dict()
    if args.quick:
        base = PipelineConfig.quick(**{k: v for k, v in base.items() if k != "name"}).to_dict()
    base.update(parse_overrides(args.set, source="--set"))
    grid = parse_grid(args.grid) if args.grid else d.get("grid")
    if grid is None:
        raise StudyError('no grid: give --grid key=v1,v2 (e.g. --grid width=8,16) or a study file with a "grid"')
    name = args.name or d.get("name") or "study"
    margin = args.tie_margin if args.tie_margin is not None else d.get("tie_margin", 0.5)
    spec = make_spec(
        name=name,
        base=base,
        grid=grid,
        seeds=args.seeds or d.get("seeds"),
        jobs=args.jobs or d.get("jobs", 1),
        source=str(args.study_file or "--grid"),
        tie_margin_points=margin,
    )
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(
            f"--out {args.out} is a file, not a folder; pass the folder that holds run folders (default runs/)"
        )
    t0 = time.perf_counter()
    with runs.RunLock(args.out / name):
        manifest = run_study(spec, out=args.out)
    from .report import study_reading

    print("\n" + study_reading(manifest))
    folder = args.out / name
    print(
        f"\ntable: {folder / 'study.csv'}\nreport: {folder / 'report.html'}\nwall time: {time.perf_counter() - t0:.1f} s"
    )
    return 0


# ---------------------------------------------------------------------------------------------- parallel work
def _add_parallel_arguments(sub: Any) -> None:
    """``--threads`` on every command that trains or computes (see :mod:`specialkit.launch`)."""
    for name, parser in sub.choices.items():
        if name != "datasets":
            parser.add_argument(
                "--threads",
                type=int,
                default=None,
                metavar="N",
                help="torch threads of this process (default: the cores of its affinity / the "
                "processes running at once, e.g. torchrun's LOCAL_WORLD_SIZE)",
            )
    sp = sub.choices["specialists"]
    sp.add_argument(
        "--launcher",
        choices=("local", "submitit"),
        default="local",
        help="local: one specialist after another in this process; submitit: one job per unfinished "
        "specialist (Slurm where available, else submitit's local executor), logs in <run>/jobs/",
    )
    sp.add_argument(
        "--submitit-cluster",
        dest="submitit_cluster",
        choices=("local", "slurm", "debug"),
        default=None,
        help="force submitit's executor (default: Slurm if srun exists, else local)",
    )
    sp.add_argument("--slurm-partition", default=None, metavar="P", help="Slurm partition of the jobs")
    sp.add_argument("--gpus-per-job", type=int, default=None, metavar="G", help="GPUs per job (default 0)")
    sp.add_argument(
        "--cpus-per-job",
        type=int,
        default=None,
        metavar="C",
        help="cores (= torch threads) per job (default: this machine's cores // --jobs-at-once, at least 1)",
    )
    sp.add_argument(
        "--timeout-min", type=int, default=None, metavar="T", help="minutes before a job is stopped (default 240)"
    )
    sp.add_argument(
        "--jobs-at-once",
        type=int,
        default=None,
        metavar="J",
        help="jobs running side by side (default: all on Slurm, min(jobs, cores) locally)",
    )


_TORCHRUN_STAGES = {stages.command_of(s): stages.torchrun_prerequisite(s) for s in stages.TORCHRUN}
"""Command -> the stage that must be finished before torchrun runs it (:func:`specialkit.stages.torchrun_prerequisite`)."""


def _under_torchrun() -> bool:
    from . import distributed

    return distributed.requested()


def _torchrun_check(args: argparse.Namespace) -> bool:
    """Under torchrun (WORLD_SIZE > 1): only the models trained as one job, with the stages before them done."""
    if not _under_torchrun():
        return False
    if args.command not in _TORCHRUN_STAGES:
        raise ConfigError(
            f"`{args.command}` does not run under torchrun; torchrun trains one model over several processes: "
            f"use it for {', '.join(_TORCHRUN_STAGES)} (specialists: --launcher submitit)"
        )
    before = _TORCHRUN_STAGES[args.command]
    if before and not _open_run(args.run).is_done(before):
        raise ConfigError(
            f"{args.run}: the {before} stage is not done; run `specialkit {before} --run {args.run}` first, "
            f"then torchrun {args.command}"
        )
    return True


_JOB_FLAGS = ("submitit_cluster", "slurm_partition", "gpus_per_job", "cpus_per_job", "timeout_min", "jobs_at_once")


def _launch_specialists(args: argparse.Namespace, run: Any) -> int:
    """``specialkit specialists --launcher submitit``: the unfinished specialists as submitit jobs."""
    from .launch import JobSettings, launch_specialists

    given = {k: getattr(args, k) for k in _JOB_FLAGS if getattr(args, k) is not None}
    settings = JobSettings(**{("cluster" if k == "submitit_cluster" else k): v for k, v in given.items()})
    launch_specialists(run, settings)
    return 0


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """Settings: the defaults (or a preset's: ``--preset``, ``--quick``), then ``--config``, then ``--set key=value``, then
    explicit flags."""
    settings: dict[str, Any] = {}
    if args.config is not None:
        settings.update(PipelineConfig.load(args.config).to_dict())
    settings.update(parse_overrides(getattr(args, "set", None) or [], source="--set"))
    settings.update({k: getattr(args, k) for k in _KNOBS if getattr(args, k) is not None})
    if getattr(args, "seeds", None) is not None:
        settings["seeds"] = list(args.seeds)
    if args.no_progress:
        settings["progress"] = False
    preset = "quick" if args.quick else getattr(args, "preset", None)
    if preset is not None:
        return PipelineConfig.preset(preset, **settings)
    return PipelineConfig.from_dict(settings, source=str(args.config or "flags"))


def _headline(metrics: dict[str, Any]) -> str:
    rows = metrics.get("comparison", [])
    lines = ["", "test top-1 accuracy [95% paired-bootstrap interval]; gain over the generalist (McNemar p):"]
    for r in rows:
        lo, hi = r["top1_ci"]
        gain = (
            ""
            if r["name"] == "generalist"
            else (
                f"  {r['delta_top1'] * 100:+.2f} points [{r['gain_vs_generalist_ci'][0] * 100:+.2f}, "
                f"{r['gain_vs_generalist_ci'][1] * 100:+.2f}] (p={r['p_vs_generalist']:.2g}): {r.get('vs_generalist')}"
            )
        )
        lines.append(f"  {r['name']:<18} {r['top1'] * 100:6.2f}% [{lo * 100:.2f}, {hi * 100:.2f}]{gain}")
    return "\n".join(lines)


def _open_run(folder: Path) -> Any:
    from . import pipeline

    if not folder.is_dir():
        raise ConfigError(f"--run {folder}: no such run folder; start one with `specialkit run --name <name>`")
    return pipeline.Run.open(folder)


@contextlib.contextmanager
def _run_lock(args: argparse.Namespace, run: Any) -> Iterator[None]:
    """The locks a stage command holds: exclusive on the run folder, except ``train-specialist`` once the
    generalist and clusters are done (shared on the run, exclusive on its own specialist), so parallel
    jobs can train different specialists while any other writer is kept out."""
    from . import distributed, runs

    if not distributed.is_main():  # torchrun: rank 0 holds the run's lock and alone writes
        yield
        return
    parallel = args.command == "train-specialist" and run.is_done("generalist") and run.is_done("clusters")
    with contextlib.ExitStack() as stack:
        stack.enter_context(runs.RunLock(run.folder, shared=parallel))
        if parallel:
            stack.enter_context(runs.RunLock(run.folder, name=f".lock-specialist-{args.index}"))
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``specialkit`` command.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 when it worked; a kit error prints one line and returns its ``exit_code()``.
    """
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("\nspecialkit: interrupted — rerun the same command to resume", file=sys.stderr)
        if argv is None:  # run as the command: every file and lock is already closed (the stack has unwound);
            sys.stdout.flush()  # leave now, so an interrupt that lands in interpreter shutdown (import-lock
            sys.stderr.flush()  # callbacks, thread joins) cannot turn exit 130 into a crash by SIGINT
            os._exit(130)
        return 130
    except (SpecialkitError, ValueError, IndexError) as err:  # one line; 1: the file system refused, 2: bad input
        print(f"specialkit: error: {err}", file=sys.stderr)
        return exit_code_of(err)
    except RuntimeError as err:
        if not _under_torchrun():
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        print(
            f"specialkit: error: rank {os.environ.get('RANK', '?')}: another process of this torchrun job stopped or "
            f"timed out ({first}); see the first error above, fix it and rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    except OSError as err:  # file system: full, read-only, permission denied, name too long ...
        from .runs import describe_os_error

        print(f"specialkit: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    from . import data

    if args.command == "datasets":
        print("\n".join(data.available()))
        return 0
    if args.command == "run" and args.print_config:  # only the settings on stdout, before any log line
        print(json.dumps(config_from_args(args).to_dict(), indent=2))
        return 0
    from .launch import set_thread_budget

    set_thread_budget(args.threads)
    if _torchrun_check(args):
        from . import distributed

        distributed.init_from_env()
        try:
            return _main_stages(args)
        finally:
            distributed.close()
    return _main_stages(args)


def _main_stages(args: argparse.Namespace) -> int:
    from . import pipeline, runs

    if args.command == "study":
        return _study(args)
    if args.command == "run":
        cfg = config_from_args(args)
        if args.write_config:
            cfg.save(args.write_config)
            print(f"wrote {args.write_config}")
            return 0
        pipeline.check_before_training(cfg)
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(
                f"--out {args.out} is a file, not a folder; pass the folder that holds run folders (default runs/)"
            )
        t0 = time.perf_counter()
        if cfg.seeds:
            from .runner import run_seeds

            with runs.RunLock(args.out / cfg.name):
                summary = run_seeds(args.out / cfg.name, cfg)
            from .report import seeds_reading

            print("\n" + seeds_reading(summary["seeds"]))
            print(f"\nreport: {args.out / cfg.name / 'report.html'}\nwall time: {time.perf_counter() - t0:.1f} s")
            return 0
        with runs.RunLock(args.out / cfg.name):
            run = pipeline.Run(args.out / cfg.name, cfg, overwrite=args.overwrite)
            metrics = run.run_all()
        print(_headline(metrics))
        print(f"\nreport: {run.folder / 'report.html'}\nmetrics: {run.folder / 'metrics.json'}")
        print(f"wall time: {time.perf_counter() - t0:.1f} s")
        return 0
    run = _open_run(args.run)
    if args.command == "specialists":
        given = [f"--{k.replace('_', '-')}" for k in _JOB_FLAGS if getattr(args, k) is not None]
        if args.launcher == "submitit":
            return _launch_specialists(args, run)
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to jobs: add --launcher submitit, or drop them")
    if args.command == "transfer":
        from . import transfer

        with runs.RunLock(run.folder):
            result = transfer.transfer(run, args.target, root=args.target_root, per_class=args.per_class)
        print(transfer.summary(result))
        print(f"\nnumbers: {transfer.result_path(run, args.target)}")
        return 0
    with _run_lock(args, run):
        if args.command == "train-specialist":
            sp = run.train_specialist(args.index)
            print(f"specialist {args.index}: {len(sp.classes)} classes, saved in {run.specialist_dir(args.index)}")
        elif args.command == "report":
            run.metrics()  # trains nothing: an unfinished stage is one line naming it and the command that makes it
            from .report import write_report

            print(f"report: {write_report(run)}")
        else:  # the stages up to this one: a missing or deleted result of an earlier stage is made again
            run.ensure_through(args.command.replace("-", "_"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
