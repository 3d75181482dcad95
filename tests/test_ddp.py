"""torchrun + gloo: two processes train to the same student as one process with the same global batch."""

import json

import pytest
import torch
from tiny_runs import torchrun

# BN-free models: BatchNorm statistics are per process in DDP, so only a BN-free pair is expected to match exactly.
CONFIG = """
[model]
teacher = "wide_cnn"
teacher_kwargs = {batch_norm = false}
student = "fitnet_thin"
student_kwargs = {batch_norm = false}
num_classes = 10

[recipe]
name = "mmrazor"

[[recipe.hints]]
student = "stage2"
teacher = "stage2"
connector = "paper"
loss = "half_sq"
weight = 0.01

[recipe.kd]
temperature = 4.0
weight = 1.0

[optim]
lr = 0.05
epochs = 1
batch_size = 32
milestones = []

[data]
dataset = "fashion-mnist"
image_size = 28
val_resize = 0
augment = "pad-crop"
train_subset = 256
val_subset = 101
workers = 0

[run]
device = "cpu"
progress = false
tensorboard = false
max_steps_per_epoch = 4
log_interval = 1
"""


def _train(nproc: int, config, out):
    result = torchrun(nproc, config, out, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    config = tmp_path / "ddp.toml"
    config.write_text(CONFIG)
    _train(1, config, tmp_path / "one")
    _train(2, config, tmp_path / "two")
    one = torch.load(tmp_path / "one" / "student.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "student.pt", weights_only=True)
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=f"{name} differs between 1 and 2 ranks")
    summary_one = (tmp_path / "one" / "summary.json").read_text()
    summary_two = (tmp_path / "two" / "summary.json").read_text()
    assert '"world_size": 2' in summary_two and '"world_size": 1' in summary_one
    # every validation image counted exactly once across the two ranks
    assert '"val_samples": 101' in summary_two
    # only rank 0 writes, one line per step; logged losses are global means, so they equal the 1-process ones
    steps = {
        n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
        for n in ("one", "two")
    }
    assert len(steps["two"]) == 4
    losses_one = [s["loss"] for s in steps["one"]]
    assert losses_one[0] != losses_one[-1], "the runs must actually train"
    assert [s["loss"] for s in steps["two"]] == pytest.approx(losses_one, rel=1e-5)
