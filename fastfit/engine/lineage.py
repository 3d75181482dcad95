"""One line of checkpoints per run folder. A resume continues exactly one lineage: checkpoints of the folder newer
than the one resumed from (a rollback, or corrupt newer files skipped by `--resume auto`) and an earlier run's
checkpoints when resuming another folder's checkpoint are moved into `checkpoints.set-aside-N` — never deleted —
so `--resume auto` and keep-K rotation only ever see the lineage being continued. A lineage resumed from another
folder brings its log lines along when its metrics.jsonl lies where fastfit keeps it.

The folder's `history.jsonl` gets one line per start and resume: when, from which checkpoint, the config changes
accepted on resume (`{"key": [old, new]}`) and what was set aside. The config changes also travel in the checkpoint
(`Run.config_history`), so a lineage carries its own record to another folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fastfit.engine import checkpoint as ckpt
from fastfit.engine.run_state import Run

logger = logging.getLogger(__name__)

HISTORY_NAME = "history.jsonl"
SET_ASIDE_TAG = "set-aside"
# What a foreign resume moves aside with the folder's checkpoints: the earlier run's log and outputs.
_RUN_OUTPUTS = ("metrics.jsonl", "student.pt", "summary.json")


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Every dotted config key whose value differs: {"optim.epochs": [2, 3], …} (absent keys as None)."""
    old, new = _flatten(saved), _flatten(current)
    return {
        key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)
    }


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def continue_lineage(run: Run, path: Path, changes: dict[str, list[Any]]) -> None:
    """After every rank has loaded `path`: rank 0 sets aside what is not this lineage, trims metrics.jsonl to the
    resumed step and records the resume in history.jsonl."""
    if not run.env.is_main:
        return
    step = run.position.global_step
    directory = run.out / "checkpoints"
    own = path.resolve().parent == directory.resolve()
    target = _set_aside_newer(directory, step, run.out) if own else _set_aside_folder(directory, run.out)
    if not own:
        _carry_metrics(path, run.metrics.path)
    run.metrics.truncate_after(step)
    if changes:
        logger.info(
            "resuming with a changed config (recorded in %s): %s",
            run.out / HISTORY_NAME,
            "; ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items()),
        )
    append_history(
        run.out,
        {
            "event": "resume",
            "checkpoint": str(path),
            "global_step": step,
            "config_changes": changes,
            "set_aside": str(target) if target else None,
        },
    )


def _set_aside_newer(directory: Path, step: int, out: Path) -> Path | None:
    """Move the checkpoints newer than `step` (with a copy of metrics.jsonl as it was) to checkpoints.set-aside-N."""
    newer = [p for p in ckpt.list_checkpoints(directory) if ckpt.checkpoint_step(p) > step]
    if not newer:
        return None
    target = _free_name(directory)
    target.mkdir()
    for checkpoint in newer:
        _move(checkpoint, target)
        if ckpt.checksum_path(checkpoint).exists():
            _move(ckpt.checksum_path(checkpoint), target)
    if (out / "metrics.jsonl").is_file():
        shutil.copy2(out / "metrics.jsonl", target / "metrics.jsonl")
    logger.warning(
        "resuming from global step %d, which is not the newest checkpoint of %s: moved the %d newer ones (%s) and a "
        "copy of metrics.jsonl to %s; nothing is deleted (resume from that folder to continue that line instead)",
        step,
        out,
        len(newer),
        ", ".join(p.name for p in newer),
        target,
    )
    return target


def _set_aside_folder(directory: Path, out: Path) -> Path | None:
    """A checkpoint from elsewhere: the folder's own checkpoints and outputs belong to another run; move them."""
    outputs = [out / name for name in _RUN_OUTPUTS if (out / name).is_file()]
    if not ckpt.list_checkpoints(directory) and not outputs:
        return None
    target = _free_name(directory)
    if directory.is_dir():
        directory.rename(target)
    else:
        target.mkdir()
    for path in outputs:
        _move(path, target)
    logger.warning(
        "resuming from a checkpoint of another folder: %s held another run; moved its checkpoints%s to %s "
        "(nothing is deleted)",
        out,
        "".join(f", {p.name}" for p in outputs),
        target,
    )
    return target


def _carry_metrics(path: Path, metrics: Path) -> None:
    """Start this folder's metrics.jsonl with the lines of the resumed lineage, when its log is found where fastfit
    keeps it: beside a set-aside folder's checkpoints, above a `checkpoints` folder, or as metrics.jsonl.previous-N
    beside checkpoints.previous-N (truncate_after then drops the lines after the resumed step)."""
    folder = path.parent
    candidates = [folder / "metrics.jsonl"]
    if folder.name == "checkpoints":
        candidates.append(folder.parent / "metrics.jsonl")
    elif folder.name.startswith("checkpoints.previous-"):
        candidates.append(folder.parent / ("metrics.jsonl" + folder.name.removeprefix("checkpoints")))
    found = next((c for c in candidates if c.is_file()), None)
    if found is not None and not metrics.exists():
        shutil.copyfile(found, metrics)
        logger.info("%s starts with the resumed run's log lines from %s", metrics, found)


def _free_name(directory: Path) -> Path:
    index = 1
    while (target := directory.with_name(f"{directory.name}.{SET_ASIDE_TAG}-{index}")).exists():
        index += 1
    return target


def _move(path: Path, folder: Path) -> None:
    os.replace(path, folder / path.name)


def append_history(out: Path, event: dict[str, Any]) -> None:
    """Append one event (with the time and this process's pid) to the run folder's history.jsonl (rank 0 only)."""
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    Path(out).mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": stamp, "pid": os.getpid(), **event}, default=str)
    with open(Path(out) / HISTORY_NAME, "a") as handle:
        handle.write(line + "\n")


def read_history(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / HISTORY_NAME
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
