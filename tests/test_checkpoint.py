"""Checkpoint files: atomic writes that survive SIGKILL mid-write, keep-K, weights_only loading, and errors that
name the file and the fix."""

import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastfit.engine import checkpoint as ckpt

DATA = Path(__file__).resolve().parent / "data"

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


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_an_error_naming_the_newest_valid_older_checkpoint(tmp_path, caplog):
    """A flip in the tensor data (step 3) and in the pickle (step 2) both load silently without a checksum; with one
    each is named, with step 1 as the checkpoint to resume from, and --resume auto falls back to it."""
    weights = torch.arange(4096, dtype=torch.float32)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"global_step": step, "w": weights, "marker_key": "x"}, keep=0)
    first, second, third = ckpt.list_checkpoints(tmp_path)
    assert ckpt.checksum_path(third).read_text().split() == [ckpt._file_sha256(third), third.name]  # sha256sum -c
    _flip(third, third.read_bytes().index(weights[1000:1004].numpy().tobytes()))
    _flip(second, second.read_bytes().index(b"marker_key"))
    assert torch.load(third, weights_only=True)["w"][1000] != 1000.0, "the flip reached the tensor data"
    assert "larker_key" in torch.load(second, weights_only=True), "the flip reached the pickle"
    for corrupt in (third, second):
        with pytest.raises(
            ckpt.CheckpointError,
            match=rf"checkpoint {corrupt} is corrupt: its sha256 .* differs from .* recorded in {corrupt.name}.sha256 "
            rf"when it was written; the newest valid older checkpoint is {first}: resume from it with --resume",
        ):
            ckpt.load_checkpoint(corrupt)
    caplog.set_level(logging.WARNING, logger="fastfit")
    assert ckpt.resolve_resume("auto", tmp_path) == first
    assert ckpt.resolve_resume(str(tmp_path), tmp_path) == first
    assert [m for m in caplog.messages if "falling back" in m] == [
        m for m in caplog.messages if "is corrupt" in m
    ] and len(caplog.messages) == 4
    _flip(first, 100)
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt: .*no valid older checkpoint is in"):
        ckpt.resolve_resume("auto", tmp_path)


def test_a_checkpoint_without_a_checksum_loads_with_a_warning(tmp_path, caplog):
    """Checkpoints written before checksums existed (the 0.1.0 fixture) still load, said to be unverified."""
    old = tmp_path / "checkpoint-0000000003.pt"
    shutil.copy(DATA / "checkpoint-0.1.0-mmrazor-step3.pt", old)
    caplog.set_level(logging.WARNING, logger="fastfit")
    assert ckpt.load_checkpoint(old)["global_step"] == 3
    assert any(f"{old} has no {old.name}.sha256" in m and "unverified" in m for m in caplog.messages), caplog.messages


def test_rotation_removes_the_checksums_with_their_checkpoints(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, {"global_step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0000000002.pt",
        "checkpoint-0000000002.pt.sha256",
        "checkpoint-0000000003.pt",
        "checkpoint-0000000003.pt.sha256",
    ]


def test_weights_from_a_corrupt_checkpoint_are_refused(tmp_path):
    """`fastfit eval --weights` and model.student_weights read a checkpoint through the models package: a flipped
    byte there is refused too, naming the file."""
    from fastfit.errors import ModelError
    from fastfit.models import build_model, load_weights

    model = build_model("fitnet_thin", 10, kwargs={"depth_per_stage": 1})
    path = ckpt.save_checkpoint(tmp_path, {"global_step": 1, "student": model.state_dict()}, keep=0)
    load_weights(build_model("fitnet_thin", 10, kwargs={"depth_per_stage": 1}), str(path), "student")
    weight = next(v for v in model.state_dict().values() if v.numel() >= 64)
    _flip(path, path.read_bytes().index(weight.flatten()[:16].numpy().tobytes()))
    with pytest.raises(
        ModelError, match=rf"student weights {path} are corrupt: their sha256 differs .*older checkpoint"
    ):
        load_weights(build_model("fitnet_thin", 10, kwargs={"depth_per_stage": 1}), str(path), "student")
