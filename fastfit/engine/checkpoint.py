"""Checkpoints that never lose what the user had: atomic writes (temp file + fsync + rename + directory fsync),
the last K kept, loading with weights_only=True (an untrusted file runs no code), and a check that a checkpoint
belongs to the config it is resumed with. A checkpoint is a dict of state dicts: the run's (Run.state_dict) and
its current stage runner's (StageRunner.state_dict), with every rank's loss meters.

A process killed mid-write leaves only a hidden `.checkpoint-*.tmp` file, which no lookup ever picks and the next
save removes; the checkpoint before it stays the newest complete one."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastfit.dist import gather_to_main
from fastfit.engine.run_state import Run
from fastfit.errors import CheckpointError

CHECKPOINT_FORMAT = "fastfit-checkpoint-1"
_NAME = re.compile(r"^checkpoint-(\d{10})\.pt$")
_PARTIAL = re.compile(r"^\.checkpoint-\d{10}\.pt\..*\.tmp$")  # atomic_save's temp files for checkpoint names
# Config sections that must match for a resume to make sense; run.* and optim.epochs may change between runs.
_MUST_MATCH = ("model", "recipe", "data.dataset", "data.image_size", "optim.batch_size")


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: a crash leaves old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def checkpoint_path(directory: str | Path, global_step: int) -> Path:
    return Path(directory) / f"checkpoint-{global_step:010d}.pt"


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write state as checkpoint-<global step>.pt and delete all but the newest `keep` (keep ≤ 0 keeps all).
    Only one process writes to a checkpoint folder (rank 0), so temp files found here are from a killed writer."""
    remove_partial(directory)
    path = atomic_save({"format": CHECKPOINT_FORMAT, **state}, checkpoint_path(directory, state["global_step"]))
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def remove_partial(directory: str | Path) -> list[Path]:
    """Delete temp files a killed writer left behind; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _PARTIAL.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def set_aside(path: str | Path) -> Path | None:
    """Rename an earlier run's checkpoint folder or log to `<name>.previous-N` (first free N), so a fresh run
    neither mixes with it (keep-K would delete the new checkpoints first) nor deletes it. None if it is absent."""
    path = Path(path)
    if not path.exists():
        return None
    index = 1
    while (target := path.with_name(f"{path.name}.previous-{index}")).exists():
        index += 1
    path.rename(target)
    return target


def load_checkpoint(path: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """Read a fastfit checkpoint. weights_only=True (the default) unpickles only tensors and plain containers, so
    a file from an untrusted source cannot run code; pass False only for a file whose origin you trust."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give a checkpoint file, a run folder, or --resume auto"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain values, which "
                "loading with weights_only=True refuses (they could run code); fastfit checkpoints "
                "never do. If you trust its source, load it with fastfit.engine.checkpoint.load_checkpoint("
                "path, weights_only=False) and save its tensors again"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it may be truncated — "
            "resume from an older checkpoint in the same folder"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a fastfit checkpoint "
            f"(format {state.get('format') if isinstance(state, dict) else None!r}); "
            f"to start from plain weights use model.student_weights={path}"
        )
    return state


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`auto`: the newest checkpoint in output_dir (None when there is none); a folder: its newest; a file: itself."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: the folder holds no checkpoint-*.pt files")
        return found
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file or run folder")
    return path


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    differing = [key for key in _MUST_MATCH if _lookup(saved, key) != _lookup(current, key)]
    if differing:
        details = "; ".join(
            f"{key}: checkpoint {_lookup(saved, key)!r} vs now {_lookup(current, key)!r}" for key in differing
        )
        raise CheckpointError(
            f"checkpoint {path} comes from another config ({details}); resume with the config saved "
            "beside it (config.toml in the run folder) or start a new output_dir"
        )


def save(run: Run, runner_state: dict[str, Any]) -> Path | None:
    """Write a checkpoint of `run` at its position; every rank calls it (the per-rank loss meters in
    `runner_state["meters"]` are gathered to rank 0, which writes). Returns the file on rank 0, else None."""
    meters = gather_to_main(runner_state["meters"], run.env)
    if not run.env.is_main:
        return None
    state = {**run.state_dict(), **runner_state, "meters": meters}  # meters: one entry per rank
    return save_checkpoint(run.out / "checkpoints", state, run.cfg.run.keep_checkpoints)


def export_student(run: Run) -> Path | None:
    """The trained student as a plain state_dict in run.output_dir/student.pt (rank 0; None elsewhere)."""
    if not run.env.is_main:
        return None
    return atomic_save(run.student.state_dict(), run.out / "student.pt")
