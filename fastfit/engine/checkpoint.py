"""Checkpoints that never lose what the user had: atomic writes (temp file + fsync + rename + directory fsync),
the last K kept, loading with weights_only=True (an untrusted file runs no code), and a check that a checkpoint
belongs to the config it is resumed with. A checkpoint is a dict of state dicts: the run's (Run.state_dict) and
its current stage runner's (StageRunner.state_dict), with every rank's loss meters.

A process killed mid-write leaves only a hidden `.checkpoint-*.tmp` file, which no lookup ever picks and the next
save removes; the checkpoint before it stays the newest complete one.

Integrity: each checkpoint gets a `checkpoint-<step>.pt.sha256` file beside it (the format `sha256sum -c` reads),
hashed from the bytes as they are written. Loading verifies it, so a flipped byte anywhere — tensor data or pickle —
is an error naming the newest valid older checkpoint, and `--resume auto` falls back to that one. A checkpoint
without the file (written before checksums existed, or by a save killed between its two renames) still loads, with a
warning that it is unverified."""

from __future__ import annotations

import hashlib
import logging
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

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fastfit-checkpoint-1"
_NAME = re.compile(r"^checkpoint-(\d{10})\.pt$")
_PARTIAL = re.compile(r"^\.checkpoint-\d{10}\.pt\..*\.tmp$")  # atomic_save's temp files for checkpoint names
# Config sections that must match for a resume to make sense; run.* and optim.epochs may change between runs.
_MUST_MATCH = ("model", "recipe", "data.dataset", "data.image_size", "optim.batch_size")


class _HashingWriter:
    """A binary file that also feeds every byte written through it to sha256 (torch.save writes sequentially)."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _write_atomic(path: Path, write) -> None:
    """Call write(handle) on a temp file in path's folder, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
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


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: a crash leaves old or new."""
    path = Path(path)
    _write_atomic(path, lambda handle: torch.save(obj, handle))
    return path


def checksum_path(path: str | Path) -> Path:
    """The sha256 file written beside a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _save_with_checksum(obj: Any, path: Path) -> None:
    """atomic_save plus the checksum file. The old checksum goes first, so a crash in between leaves a checkpoint
    without one (loaded unverified) rather than a new file beside an old checksum (a false alarm)."""
    checksum_path(path).unlink(missing_ok=True)
    hashed = {}

    def write(handle) -> None:
        writer = _HashingWriter(handle)
        torch.save(obj, writer)
        hashed["hex"] = writer.digest.hexdigest()

    _write_atomic(path, write)
    line = f"{hashed['hex']}  {path.name}\n".encode()
    _write_atomic(checksum_path(path), lambda handle: handle.write(line))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path) -> bool:
    """True when `path` matches its checksum file, False when it has none (unverified); a CheckpointError naming
    the newest valid older checkpoint when it does not match."""
    path = Path(path)
    recorded = _recorded_sha256(path)
    if recorded is None:
        return False
    actual = _file_sha256(path)
    if actual == recorded:
        return True
    older = _newest_valid_before(path)
    advice = (
        f"the newest valid older checkpoint is {older}: resume from it with --resume {older} "
        "(--resume auto falls back to it by itself)"
        if older is not None
        else f"no valid older checkpoint is in {path.parent}; start a fresh run"
    )
    raise CheckpointError(
        f"checkpoint {path} is corrupt: its sha256 {actual[:16]}… differs from {recorded[:16]}… recorded in "
        f"{checksum_path(path).name} when it was written; {advice}"
    )


def _recorded_sha256(path: Path) -> str | None:
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    fields = sidecar.read_text(errors="replace").split()
    return fields[0].lower() if fields else ""


def _newest_valid_before(path: Path) -> Path | None:
    """The newest checkpoint in path's folder older than `path` whose checksum matches (or that has none)."""
    match = _NAME.match(path.name)
    step = int(match.group(1)) if match else None
    for older in reversed(list_checkpoints(path.parent)):
        if older == path or (step is not None and int(_NAME.match(older.name).group(1)) >= step):
            continue
        recorded = _recorded_sha256(older)
        if recorded is None or recorded == _file_sha256(older):
            return older
    return None


def newest_valid_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in `directory` that passes verify_checkpoint; corrupt newer ones are skipped with a
    warning (they stay where they are: resuming sets them aside)."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            logger.warning("%s — falling back to the previous checkpoint", err)
            continue
        return path
    return None


def checkpoint_path(directory: str | Path, global_step: int) -> Path:
    return Path(directory) / f"checkpoint-{global_step:010d}.pt"


def checkpoint_step(path: str | Path) -> int:
    """The global step in a checkpoint-<step>.pt name."""
    return int(_NAME.match(Path(path).name).group(1))


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
    path = checkpoint_path(directory, state["global_step"])
    _save_with_checksum({"format": CHECKPOINT_FORMAT, **state}, path)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
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
    if not verify_checkpoint(path):
        logger.warning(
            "checkpoint %s has no %s (written by a fastfit without checksums, or by a save killed before writing "
            "it): loading it unverified",
            path,
            checksum_path(path).name,
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
    """`auto`: the newest valid checkpoint in output_dir (None when there is none; corrupt newer ones are skipped
    with a warning); a folder: its newest valid one; a file: itself."""
    if resume == "auto":
        return _newest_or_raise(output_dir) if list_checkpoints(output_dir) else None
    path = Path(resume)
    if path.is_dir():
        if not list_checkpoints(path):
            raise CheckpointError(f"--resume {path}: the folder holds no checkpoint-*.pt files")
        return _newest_or_raise(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such checkpoint file or run folder")
    return path


def _newest_or_raise(directory: str | Path) -> Path:
    """The newest valid checkpoint of a folder that holds some; when every one is corrupt, the newest one's error."""
    found = newest_valid_checkpoint(directory)
    if found is None:
        verify_checkpoint(latest_checkpoint(directory))  # raises: it is corrupt like the rest
    return found


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
