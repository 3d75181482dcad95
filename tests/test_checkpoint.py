"""Checkpoint files: atomic writes that survive SIGKILL mid-write, keep-K, weights_only loading, and errors that
name the file and the fix."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastfit.engine import checkpoint as ckpt

# Writes ~64 MB checkpoints (keep 2) in a loop and prints each finished global step.
WRITER = """
import sys, torch
from fastfit.engine.checkpoint import save_checkpoint
blob = torch.arange(16 * 2**20, dtype=torch.float32)
step = 0
while True:
    step += 1
    save_checkpoint(sys.argv[1], {"global_step": step, "blob": blob + step}, keep=2)
    print(step, flush=True)
"""


def _assert_loads_whole(path):
    state = ckpt.load_checkpoint(path)
    step = state["global_step"]
    assert path.name == f"checkpoint-{step:010d}.pt"
    assert torch.equal(state["blob"], torch.arange(16 * 2**20, dtype=torch.float32) + step), f"{path} is not whole"
    return step


def test_sigkill_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    rng = random.Random(0)
    directory = tmp_path / "checkpoints"
    killed_mid_write = 0
    for trial in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(directory)], stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout.readline().strip(), "the writer must finish one checkpoint first"
            if trial == 0:  # kill exactly while a temp file is being written
                deadline = time.monotonic() + 30
                while not list(directory.glob(".checkpoint-*.tmp")) and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:  # or at a random moment of the loop
                time.sleep(rng.uniform(0.0, 0.3))
            partial_before = list(directory.glob(".checkpoint-*.tmp"))
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.wait(timeout=30)
        killed_mid_write += bool(partial_before)
        complete = ckpt.list_checkpoints(directory)
        assert complete and all(not p.name.startswith(".") for p in complete)
        newest = _assert_loads_whole(ckpt.latest_checkpoint(directory))
        assert len(complete) <= 2 + 1  # keep=2, plus at most one written before its predecessor was pruned
        # The next save removes what the killed writer left and continues the sequence.
        blob = torch.arange(16 * 2**20, dtype=torch.float32) + newest + 1000
        ckpt.save_checkpoint(directory, {"global_step": newest + 1000, "blob": blob}, keep=2)
        assert not list(directory.glob(".checkpoint-*.tmp"))
        _assert_loads_whole(ckpt.latest_checkpoint(directory))
        for path in ckpt.list_checkpoints(directory):
            path.unlink()
    assert killed_mid_write >= 1, "trial 0 waits for a temp file, so at least one kill lands mid-write"


def test_keep_k_keeps_the_newest_by_global_step(tmp_path):
    for step in (5, 1, 30, 12):
        ckpt.save_checkpoint(tmp_path, {"global_step": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000000012.pt", "checkpoint-0000000030.pt"]
    ckpt.save_checkpoint(tmp_path, {"global_step": 31}, keep=0)  # 0 keeps everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 3


def test_atomic_save_cleans_its_temp_file_when_serialization_fails(tmp_path):
    with pytest.raises((pickle.PicklingError, AttributeError)):
        ckpt.atomic_save({"fn": lambda: None}, tmp_path / "x.pt")  # lambdas cannot be pickled
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_foreign_files_are_refused_with_the_fix(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, {"global_step": 7, "w": torch.ones(1000)}, keep=0)
    truncated = tmp_path / "checkpoint-0000000008.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"checkpoint-0000000008.pt cannot be read .*truncated — resume "
        r"from an older checkpoint in the same folder",
    ):
        ckpt.load_checkpoint(truncated)
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, plain)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"weights.pt is not a fastfit checkpoint .*use "
        r"model.student_weights=",
    ):
        ckpt.load_checkpoint(plain)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"does not exist; give a checkpoint file, a run folder, or "
        r"--resume auto",
    ):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


class _RunsCode:
    """Unpickling this calls os.system — what weights_only loading exists to refuse."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_files_that_would_run_code_are_refused_by_default(tmp_path, capfd):
    path = tmp_path / "checkpoint-0000000001.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "payload": _RunsCode()}, path)
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"holds Python objects beyond tensors and plain values, which "
        r"loading with weights_only=True refuses .*weights_only=False",
    ):
        ckpt.load_checkpoint(path)
    assert "should-not-run" not in capfd.readouterr().out


def test_checkpoint_from_another_config_names_the_differing_keys(tmp_path):
    saved = {
        "model": {"student": "resnet18", "teacher": "resnet50"},
        "recipe": {"name": "mmrazor"},
        "data": {"dataset": "imagefolder", "image_size": 224},
        "optim": {"batch_size": 256, "lr": 0.1},
    }
    now = {**saved, "optim": {"batch_size": 512, "lr": 0.2}}
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"comes from another config \(optim.batch_size: checkpoint 256 vs "
        r"now 512\); resume with the config saved beside it",
    ):
        ckpt.check_same_config(saved, now, tmp_path / "c.pt")
    # the learning rate may change between runs
    ckpt.check_same_config(saved, {**saved, "optim": {"batch_size": 256, "lr": 0.3}}, tmp_path / "c.pt")


def test_resume_targets_resolve_or_say_what_is_missing(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match=r"the folder holds no checkpoint-\*.pt files"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"no such checkpoint file or run folder"):
        ckpt.resolve_resume(str(tmp_path / "gone.pt"), tmp_path)
    (tmp_path / ".checkpoint-0000000009.pt.abc.tmp").write_bytes(b"partial")
    ckpt.save_checkpoint(tmp_path, {"global_step": 3}, keep=0)
    assert ckpt.resolve_resume("auto", tmp_path).name == "checkpoint-0000000003.pt"


def test_set_aside_picks_the_first_free_name(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints.previous-1").mkdir()
    assert ckpt.set_aside(tmp_path / "checkpoints") == tmp_path / "checkpoints.previous-2"
    assert ckpt.set_aside(tmp_path / "checkpoints") is None
