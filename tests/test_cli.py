"""The `fastfit` command: configs, train → export → eval round trip, one-line errors with exit code 2."""

import json
import subprocess
import sys

import torch

from fastfit.cli import main

TINY = [
    "data.workers=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.device=cpu",
    "data.train_subset=256",
    "data.val_subset=120",
    "optim.batch_size=64",
    "optim.epochs=1",
    "run.max_steps_per_epoch=2",
]


def test_config_list_and_show(capsys):
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"fitnets_r50_r18_in1k", "demo_fmnist_fitnet", "demo_fmnist_teacher", "demo_fmnist_student"} <= set(listed)
    assert main(["config", "show", "demo_fmnist_fitnet", "optim.lr=0.2"]) == 0
    shown = capsys.readouterr().out
    assert "lr = 0.2\n" in shown and 'name = "fitnets-paper"' in shown


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert main(["train", "--config", "demo_fmnist_student", "optim.lr=oops"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastfit train: error: optim.lr must be float, got 'oops' (str)"
    assert main(["train", "--config", "no_such_config"]) == 2
    assert "shipped configs: demo_fmnist_fitnet" in capsys.readouterr().err


def test_train_export_eval_round_trip(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "demo_fmnist_student", *TINY, f'run.output_dir="{out}"']) == 0
    summary = json.loads((out / "summary.json").read_text())
    checkpoint = sorted((out / "checkpoints").glob("checkpoint-*.pt"))[-1]
    exported = tmp_path / "plain.pt"
    assert main(["export", str(checkpoint), str(exported)]) == 0
    state = torch.load(exported, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and "head.2.weight" in state
    capsys.readouterr()
    assert main(["eval", "--config", "demo_fmnist_student", *TINY, "--weights", str(exported)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("student fitnet_thin: top-1 ") and f"{summary['final']['top1']:.2f}" in line


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fastfit.cli", "config", "list"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "fitnets_r50_r18_in1k" in result.stdout
