"""`fastfit data …`: dataset chores from the command line.

    fastfit data check DIR [--decode] [--json F] [--workers N]   list bad files (exit 1 if any)
    fastfit data synth DIR --n N [--classes K] [--val N] [--seed S] [--workers N]

Each handler returns the process exit code: 0 on success, 1 when bad files were found, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD_FILES, EXIT_BAD_INPUT = 0, 1, 2


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
    """Add `data check` and `data synth` under an argparse subparsers object (handlers in `func`)."""
    data = subparsers.add_parser("data", help="check a dataset for bad images, or write a synthetic one")
    sub = data.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser("check", help="list unreadable, non-image, truncated or corrupt images (exit 1 if any)")
    check.add_argument("dir", help="an ImageFolder (DIR/<class>/…) or a folder of splits (DIR/train/<class>/…)")
    check.add_argument("--decode", action="store_true", help="decode every image fully (slower; finds corrupt data)")
    check.add_argument("--json", metavar="F", default=None, help="also write the full report as JSON to F")
    check.add_argument("--workers", type=_positive, default=None, help="parallel workers (default: CPU count)")
    check.set_defaults(func=run_check)

    synth = sub.add_parser("synth", help="write ImageNet-like JPEGs (≈500×375, ≈80 KB) in train/ and val/")
    synth.add_argument("dir", help="output folder (train/ and val/ are created inside)")
    synth.add_argument("--n", type=_non_negative, required=True, help="number of training images")
    synth.add_argument("--classes", type=_positive, default=10, help="number of classes (default 10)")
    synth.add_argument("--val", type=_non_negative, default=None, help="number of val images (default n // 10)")
    synth.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes (default 0)")
    synth.add_argument("--workers", type=_positive, default=None, help="parallel processes (default: CPU count)")
    synth.set_defaults(func=run_synth)


def run_check(args: argparse.Namespace) -> int:
    from fastfit.data import DataError
    from fastfit.data.check import check_dataset, format_report

    try:
        report = check_dataset(args.dir, decode=args.decode, workers=args.workers)
    except DataError as err:
        print(f"fastfit data check: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(format_report(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"report written to {path}")
    return EXIT_BAD_FILES if report.bad else EXIT_OK


def run_synth(args: argparse.Namespace) -> int:
    from fastfit.data import DataError
    from fastfit.data.synth import write_synthetic_imagenet

    try:
        summary = write_synthetic_imagenet(
            args.dir, n_train=args.n, n_classes=args.classes, n_val=args.val, seed=args.seed, workers=args.workers
        )
    except DataError as err:
        print(f"fastfit data synth: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(
        f"wrote {summary.train_files} train and {summary.val_files} val JPEGs in {args.classes} classes to "
        f"{summary.root} ({summary.total_bytes / 1e6:.1f} MB, {summary.mean_kb:.0f} KB each on average)"
    )
    return EXIT_OK
