"""The `fastfit` command: demo, study, train, eval, export, profile, config, data. Thin: parse, load the config,
call the package. It installs the console log handler (fastfit.console) before running a command.

Bad input ends with one line naming the problem and the fix (exit code 2), not a traceback. A run stopped by a
preemption signal exits with code 75 (EX_TEMPFAIL) after writing its checkpoint: run the same command with
--resume auto to continue. A rank that stopped because another rank failed exits with code 1 and says so; a rank
whose collective timed out names the ranks that stopped responding and exits 1. A Ctrl-C that is not a preemption
signal ends in one line with code 130. Under torchrun each of these messages is also written to the worker's error
file, so torchrun's failure summary shows it instead of "To enable traceback see …".
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from fastfit.config import load_config, shipped_configs_dir, to_toml
from fastfit.console import setup_logging
from fastfit.errors import (
    EXIT_BAD_INPUT,
    EXIT_PEER_FAILED,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    FastfitError,
    PeerFailure,
    PeerUnresponsive,
    Preempted,
)

EXIT_OK = 0
EXIT_BAD_FILES = 1  # `fastfit data check` found bad files
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config", "-c", required=required, help="a TOML file or the name of a shipped config (fastfit config list)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.path=value",
        help="dotted overrides applied after the file, e.g. optim.lr=0.05 data.root=/data/imagenet",
    )


def check_output_file(what: str, path: str | Path) -> Path:
    """`path` can be written as a file: it is not a folder and the nearest existing folder above it is a folder.
    Checked before a command does its work, so a typo in an output path does not cost the work."""
    path = Path(path)
    if path.is_dir():
        raise FastfitError(f"{what} {path} is a folder; give a file name inside it, e.g. {path / 'out'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FastfitError(f"{what} {path}: {parent} is a file, not a folder; give a path in a folder")
            break
    return path


def _os_error_line(err: OSError) -> str:
    """One line for an OSError: the path, what the system said and what to do about it."""
    where = " and ".join(str(name) for name in (err.filename, err.filename2) if name is not None) or "a file"
    fixes = {
        errno.ENOSPC: "free disk space, then run the same command again (train: add --resume auto)",
        errno.EDQUOT: "free space within your disk quota, then run the same command again",
        errno.EACCES: "fix its permissions or choose another path",
        errno.EPERM: "fix its permissions or choose another path",
        errno.EROFS: "the file system is read-only; choose a path on a writable one",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
        errno.EISDIR: "it is a folder; give a file",
    }
    fix = fixes.get(err.errno, "check the path and the disk")
    return f"{where}: {err.strerror or err}; {fix}"


def cmd_train(args: argparse.Namespace) -> int:
    from fastfit.engine.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastfit.demo.run import run_demo

    run_demo(out=args.out, budget=args.budget, device=args.device, extra=args.overrides, progress=not args.no_progress)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fastfit.study.runner import run_study

    try:
        seeds = tuple(int(seed) for seed in args.seeds.split(",") if seed.strip())
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
    run_study(
        out=args.out,
        budget=args.budget,
        device=args.device,
        seeds=seeds,
        phase=args.phase,
        extra=args.overrides,
        progress=not args.no_progress,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastfit.engine.evaluate import evaluate_weights

    cfg = load_config(args.config, args.overrides)
    for role, metrics in evaluate_weights(cfg, args.weights).items():
        print(f"{role}: top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  ({metrics['val_samples']} images)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastfit.engine.checkpoint import atomic_save, checksum_path, load_checkpoint

    source, target = Path(args.checkpoint), check_output_file("fastfit export's output", args.output)
    if target.resolve() in (source.resolve(), checksum_path(source).resolve()) or (
        target.exists() and source.exists() and os.path.samefile(source, target)
    ):
        raise CheckpointError(
            f"fastfit export would overwrite its input {source} with a plain state_dict; give another output path, "
            f"e.g. {source.with_name('student.pt')}"
        )
    state = load_checkpoint(source)
    atomic_save(state["student"], args.output)
    print(f"wrote the student's plain state_dict ({state['config']['model']['student']}) to {args.output}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from fastfit.perf.profiler import ABLATIONS, SECTIONS, profile_throughput

    sections = tuple(args.sections or SECTIONS)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown profile section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    ablate = args.ablate
    if args.ablate_only is not None:
        ablate = tuple(name.strip() for name in args.ablate_only.split(",") if name.strip())
        unknown = [name for name in ablate if name not in ABLATIONS]
        if unknown or not ablate:
            raise ConfigError(
                f"unknown --ablate switch {unknown[0] if unknown else ablate!r}; "
                f"give a comma-separated subset of: {', '.join(ABLATIONS)} (or --ablate for all)"
            )
    if args.json is not None:
        check_output_file("--json", args.json)
    cfg = load_config(args.config, args.overrides)
    profile_throughput(
        cfg,
        steps=args.steps,
        warmup=args.warmup,
        sections=sections,
        ablate=ablate,
        trace_steps=args.trace_steps,
        stage=args.stage,
        json_path=args.json,
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.config is not None or args.overrides:
            extra = " ".join(filter(None, [args.config, *args.overrides]))
            raise ConfigError(f"fastfit config list takes no arguments, got {extra!r}; use fastfit config show NAME")
        for path in sorted(shipped_configs_dir().glob("*.toml")):
            print(path.stem)
        return 0
    if args.config is None:
        raise ConfigError("fastfit config show needs a config: a TOML file or a name from `fastfit config list`")
    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0


def record_error(err: BaseException) -> None:
    """Under torchrun, write `err` to the worker's error file so torchrun's failure summary shows this message."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastfit", description="FitNets knowledge distillation, fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="teacher, student alone and FitNet on Fashion-MNIST, with a report")
    demo.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    demo.add_argument(
        "--budget",
        choices=["auto", "cpu", "full"],
        default="auto",
        help="auto: full settings on a GPU, a 10-minute budget on CPU",
    )
    demo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    demo.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to all three runs")
    demo.set_defaults(func=cmd_demo)

    study_datasets = sub.add_parser(
        "study", help="a multi-seed study: alone / KD / FitNet / joint, tuned on a validation split"
    ).add_subparsers(dest="dataset", required=True, metavar="DATASET")
    study = study_datasets.add_parser(
        "fmnist", help="Fashion-MNIST: 3 seeds × 2 students × 4 rows, one teacher (resumable)"
    )
    study.add_argument("--out", default="reports/study", help="results folder (default reports/study); resumable")
    study.add_argument(
        "--budget", choices=["auto", "cpu", "full"], default="auto", help="auto: full on a GPU, cpu (≈30 min) otherwise"
    )
    study.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    study.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the final phase (default 0,1,2)")
    study.add_argument("--phase", choices=["search", "final", "all"], default="all")
    study.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    study.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to every run")
    study.set_defaults(func=cmd_study)

    train = sub.add_parser("train", help="train with a config (also under torchrun)")
    _add_config_args(train)
    train.add_argument(
        "--resume",
        default=None,
        help="'auto' (newest checkpoint in run.output_dir, if any), a checkpoint file or a run folder",
    )
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="top-1/top-5 of a student (and the configured teacher) on the val set")
    _add_config_args(evaluate)
    evaluate.add_argument("--weights", default=None, help="student weights: a checkpoint or exported state_dict")
    evaluate.set_defaults(func=cmd_eval)

    export = sub.add_parser("export", help="write a checkpoint's student as a plain torchvision state_dict")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.set_defaults(func=cmd_export)

    profile = sub.add_parser("profile", help="images/second of each part of a training step, in one run")
    _add_config_args(profile)
    profile.add_argument("--steps", type=_positive, default=50, help="timed steps per section (after --warmup)")
    profile.add_argument(
        "--warmup", type=_non_negative, default=10, help="untimed steps first (compilation happens here)"
    )
    profile.add_argument(
        "--sections",
        nargs="+",
        metavar="SECTION",
        help="naive end_to_end compute_only teacher_only student_only loader_only (default: all)",
    )
    profile.add_argument(
        "--ablate",
        action="store_true",
        help="also end to end with each speed switch flipped in turn and the loader thread counts swept",
    )
    profile.add_argument(
        "--ablate-only",
        default=None,
        metavar="SWITCHES",
        help="the ablation for a comma-separated subset only, e.g. 'DALI,loader threads'",
    )
    profile.add_argument(
        "--trace-steps",
        type=_non_negative,
        default=0,
        help="write a torch.profiler trace of this many steps to run.output_dir/profile_trace",
    )
    profile.add_argument(
        "--stage", type=_non_negative, default=None, help="recipe stage to profile (default: the last)"
    )
    profile.add_argument("--json", default=None, help="write the results JSON here (e.g. docs/results/…)")
    profile.set_defaults(func=cmd_profile)

    config = sub.add_parser("config", help="list shipped configs or print a resolved one")
    config.add_argument("action", choices=["list", "show"])
    config.add_argument("config", nargs="?", help="show: a TOML file or shipped config name")
    config.add_argument("overrides", nargs="*", metavar="key.path=value")
    config.set_defaults(func=cmd_config)

    add_data_commands(sub)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_data_commands(subparsers) -> None:
    """`fastfit data check DIR [--decode] [--json F] [--workers N]` (exit 1 if bad files) and
    `fastfit data synth DIR --n N [--classes K] [--val N] [--seed S] [--workers N]`."""
    data = subparsers.add_parser("data", help="check a dataset for bad images, or write a synthetic one")
    sub = data.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser(
        "check",
        help="list unreadable, non-image, truncated, corrupt, high-bit-depth or too small images, symlink loops, "
        "files reached twice and unreadable folders (exit 1 if any)",
    )
    check.add_argument("dir", help="an ImageFolder (DIR/<class>/…) or a folder of splits (DIR/train/<class>/…)")
    check.add_argument("--decode", action="store_true", help="decode every image fully (slower; finds corrupt data)")
    check.add_argument("--json", metavar="F", default=None, help="also write the full report as JSON to F")
    check.add_argument("--workers", type=_positive, default=None, help="parallel workers (default: CPU count)")
    check.add_argument(
        "--image-size",
        type=_positive,
        default=None,
        metavar="N",
        help="also report images whose shorter side is below the N×N crop (data.image_size)",
    )
    check.set_defaults(func=cmd_data_check)

    synth = sub.add_parser("synth", help="write ImageNet-like JPEGs (≈500×375, ≈80 KB) in train/ and val/")
    synth.add_argument("dir", help="output folder (train/ and val/ are created inside)")
    synth.add_argument("--n", type=_non_negative, required=True, help="number of training images")
    synth.add_argument("--classes", type=_positive, default=10, help="number of classes (default 10)")
    synth.add_argument("--val", type=_non_negative, default=None, help="number of val images (default n // 10)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
    synth.add_argument("--workers", type=_positive, default=None, help="parallel processes (default: CPU count)")
    synth.set_defaults(func=cmd_data_synth)


def cmd_data_check(args: argparse.Namespace) -> int:
    from fastfit.data.check import check_dataset, format_report

    if args.json:
        check_output_file("--json", args.json)
    report = check_dataset(args.dir, decode=args.decode, workers=args.workers, min_size=args.image_size or 0)
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {path}")
    return EXIT_BAD_FILES if report.bad else EXIT_OK


def cmd_data_synth(args: argparse.Namespace) -> int:
    from fastfit.data.synth import write_synthetic_imagenet

    summary = write_synthetic_imagenet(
        args.dir, n_train=args.n, n_classes=args.classes, n_val=args.val, seed=args.seed, workers=args.workers
    )
    print(
        f"wrote {summary.train_files} train and {summary.val_files} val JPEGs in {args.classes} classes to "
        f"{summary.root} ({summary.total_bytes / 1e6:.1f} MB, {summary.mean_kb:.0f} KB each on average)"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run one `fastfit` command; returns its exit code (0 ok, 2 bad input, 75 preempted, 1 failed or bad files)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    name = " ".join(filter(None, ["fastfit", args.command, getattr(args, "data_command", None)]))
    try:
        return args.func(args)
    except FastfitError as err:
        record_error(err)
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        # A path the system refused (a full disk, permissions, a file where a folder belongs): the user's to fix.
        if err.errno is None:
            raise
        record_error(err)
        print(f"{name}: error: {_os_error_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Preempted as err:
        record_error(err)
        print(f"{name}: preempted: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except PeerUnresponsive as err:
        record_error(err)  # the root cause torchrun must report: the unresponsive rank is killed without a word
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_PEER_FAILED
    except PeerFailure as err:
        # Not recorded: torchrun must report the rank that failed first, not this consequence of it.
        print(f"{name}: {err}", file=sys.stderr)
        return EXIT_PEER_FAILED
    except KeyboardInterrupt:
        # Only where SIGINT is not a preemption signal (run.preemption_signals) or before training started.
        print(
            f"{name}: interrupted (SIGINT) without writing a checkpoint; a training run continues from its newest "
            "checkpoint with --resume auto (list SIGINT in run.preemption_signals to checkpoint on Ctrl-C)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def train_main(argv: list[str] | None = None) -> int:
    """scripts/train.py: `fastfit train` without the subcommand word (torchrun-friendly). Unexpected exceptions
    are written to torchrun's error file too (elastic's @record), so its summary shows the failing rank's error."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(main)(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
