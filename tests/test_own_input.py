"""No command writes onto its own input, and `fastfit eval` never presents a random network's accuracy."""

import os

import pytest
import torch
from tiny_runs import tiny_config

from fastfit.cli import main
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.loop import train
from fastfit.errors import ConfigError


def test_export_refuses_to_overwrite_its_checkpoint(tmp_path, capsys):
    state = {"global_step": 4, "student": {"w": torch.ones(3)}, "config": {"model": {"student": "fitnet_thin"}}}
    checkpoint = ckpt.save_checkpoint(tmp_path / "checkpoints", state, keep=0)
    original = checkpoint.read_bytes()
    link = tmp_path / "link.pt"
    os.symlink(checkpoint, link)
    same_file = [str(checkpoint), str(tmp_path / "checkpoints" / ".." / "checkpoints" / checkpoint.name), str(link)]
    for output in [*same_file, str(ckpt.checksum_path(checkpoint))]:
        assert main(["export", str(checkpoint), output]) == 2, output
        err = capsys.readouterr().err.strip()
        assert err == (
            f"fastfit export: error: fastfit export would overwrite its input {checkpoint} with a plain state_dict; "
            f"give another output path, e.g. {checkpoint.with_name('student.pt')}"
        )
    assert checkpoint.read_bytes() == original and ckpt.verify_checkpoint(checkpoint)
    assert main(["export", str(checkpoint), str(tmp_path / "student.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "student.pt", weights_only=True)["w"], torch.ones(3))


def test_eval_without_student_weights_refuses(tmp_path, capsys):
    overrides = ["run.device=cpu", "data.workers=0", f'data.root="{tmp_path / "absent"}"']
    assert main(["eval", "--config", "demo_fmnist_student", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fastfit eval: error: no weights for the student fitnet_thin")
    assert "pass --weights <checkpoint or student.pt>" in err


def test_training_refuses_weights_that_are_the_student_it_will_write(tmp_path):
    """model.student_weights (or teacher_weights) = <run.output_dir>/student.pt: the run would overwrite the file it
    started from. Refused before any work, the file untouched."""
    out = tmp_path / "run"
    train(tiny_config(tmp_path, "mmrazor", out, "optim.epochs=1", "optim.milestones=[]"))
    exported = (out / "student.pt").read_bytes()
    for key in ("student_weights", "teacher_weights"):
        spelled = out / ".." / "run" / "student.pt"
        with pytest.raises(ConfigError, match=rf"model.{key} {spelled} is the student.pt this run writes into"):
            train(
                tiny_config(
                    tmp_path, "mmrazor", out, "optim.epochs=1", "optim.milestones=[]", f'model.{key}="{spelled}"'
                )
            )
    assert (out / "student.pt").read_bytes() == exported
