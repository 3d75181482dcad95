"""Tiny real training runs shared by the reliability tests: Fashion-MNIST JPEGs, a 16-wide teacher and a one-conv-
per-stage student (BatchNorm everywhere, so running statistics are part of what must survive a resume), 4 steps
per epoch; the LR warms up over half an epoch and drops at epoch 1, so every step has its own LR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastfit.config import Config, load_config
from fastfit.engine import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent

COMMON = """
[model]
teacher = "wide_cnn"
teacher_kwargs = {width = 16, hidden = 32}
student = "fitnet_thin"
student_kwargs = {depth_per_stage = 1}
num_classes = 10

[optim]
lr = 0.05
epochs = 2
batch_size = 8
milestones = [1]
warmup_epochs = 0.5

[data]
dataset = "fashion-mnist"
image_size = 28
val_resize = 0
augment = "pad-crop"
train_subset = 64
val_subset = 20
workers = 0

[run]
device = "cpu"
progress = false
tensorboard = false
max_steps_per_epoch = 4
log_interval = 1
keep_checkpoints = 0
"""

RECIPES = {
    # one joint stage: CE + normalized-L2 hint through a 1×1 conv + BN + ReLU connector + KL(τ)
    "mmrazor": """
[recipe]
name = "mmrazor"

[[recipe.hints]]
student = "stage2"
teacher = "stage2"
connector = "mmrazor"
loss = "normalized_l2"
weight = 10.0
""",
    # stage 1 (1 epoch): hint training; stage 2 (2 epochs): CE + λ·H(P_T^τ, P_S^τ), λ annealed 4 → 1 per step
    "fitnets-paper": """
[recipe]
name = "fitnets-paper"
hint_epochs = 1
hint_lr = 0.05

[[recipe.hints]]
student = "stage2"
teacher = "stage2"
connector = "paper"
loss = "half_sq"
weight = 1.0
""",
}

TIMING = ("img_s", "train_img_s", "train_seconds")


def write_config(directory: Path, recipe: str) -> Path:
    path = Path(directory) / f"{recipe}.toml"
    path.write_text(RECIPES[recipe] + COMMON)
    return path


def tiny_config(directory: Path, recipe: str, out: Path, *overrides: str) -> Config:
    return load_config(write_config(directory, recipe), [f'run.output_dir="{out}"', *overrides])


def records(out: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (the only ones allowed to differ between equal runs)."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_training_state(a: Path, b: Path) -> None:
    """Exported students and the final checkpoints' student, connectors and optimizer state: bitwise equal."""
    for name, value in torch.load(Path(a) / "student.pt", weights_only=True).items():
        other = torch.load(Path(b) / "student.pt", weights_only=True)[name]
        delta = (value.double() - other.double()).abs().max()
        assert torch.equal(value, other), f"student {name} differs: max |Δ| {delta}"
    last_a = ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(a) / "checkpoints"))
    last_b = ckpt.load_checkpoint(ckpt.latest_checkpoint(Path(b) / "checkpoints"))
    assert last_a["position"] == last_b["position"]
    for key in ("connectors", "student"):
        for name, value in last_a[key].items():
            assert torch.equal(value, last_b[key][name]), f"{key} {name} differs in the final checkpoint"
    for param_id, state in last_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, last_b["optimizer"]["state"][param_id][name]), f"optimizer {name} of {param_id}"


def torchrun(
    nproc: int,
    config: Path,
    out: Path,
    *extra: str,
    env: dict | None = None,
    restarts: int = 0,
    timeout: float = 240,
    popen: bool = False,
):
    """scripts/train.py under torchrun with `nproc` gloo workers (single-threaded, so two fit on two cores)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.1",
        "scripts/train.py",
        "--config",
        str(config),
        f'run.output_dir="{out}"',
        *extra,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if "FASTFIT_INJECT" not in (env or {}):
        full_env.pop("FASTFIT_INJECT", None)  # only the faults a test asks for
    if popen:
        return subprocess.Popen(
            command,
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(
        command,
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )  # callers assert on the code and show the output
