"""The training engine on real data (Fashion-MNIST JPEGs): learning, the paper's two stages, exact resume, export."""

import json
import shutil

import pytest
import torch

from fastfit.config import load_config
from fastfit.dist import DistEnv
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.loop import train
from fastfit.engine.setup import per_rank_batch, setup_run
from fastfit.engine.stage_runner import StageRunner
from fastfit.errors import ConfigError
from fastfit.models import build_model

FAST = ["data.workers=0", "run.progress=false", "run.tensorboard=false", "run.device=cpu", "run.log_interval=2"]


def small(config: str, out, *extra: str):
    return load_config(config, [*FAST, f'run.output_dir="{out}"', *extra])


def paper_config(out, *extra):
    return small(
        "demo_fmnist_fitnet",
        out,
        "data.train_subset=256",
        "data.val_subset=100",
        "optim.batch_size=32",
        "optim.epochs=2",
        "recipe.hint_epochs=1",
        "run.max_steps_per_epoch=3",
        "run.keep_checkpoints=0",
        *extra,
    )


@pytest.mark.slow
def test_short_real_data_training_is_far_above_chance(tmp_path):
    cfg = small(
        "demo_fmnist_teacher",
        tmp_path,
        "data.train_subset=3000",
        "data.val_subset=500",
        "optim.batch_size=64",
        "optim.epochs=1",
        "optim.lr=0.05",
    )
    summary = train(cfg)
    top1 = summary["final"]["top1"]
    assert top1 > 60.0, f"10 classes: chance is 10 %, got {top1:.1f} %"
    assert summary["final"]["val_samples"] == 500
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train_img_s" in rec for rec in lines) and all("global_step" in rec for rec in lines)


def test_paper_stage_one_trains_only_up_to_the_guided_layer(tmp_path):
    run = setup_run(paper_config(tmp_path), DistEnv(0, 1, 0, torch.device("cpu")))
    hint_stage = StageRunner(run, 0)
    assert hint_stage.stage.name == "hint" and hint_stage.stage.constant_lr == 0.05
    trained = {id(p) for group in hint_stage.optimizer.param_groups for p in group["params"]}
    named = dict(run.student.named_parameters())
    assert all(id(p) in trained for n, p in named.items() if n.startswith(("stage1.", "stage2.")))
    assert not any(id(p) in trained for n, p in named.items() if n.startswith(("stage3.", "head.")))
    assert all(id(p) in trained for p in run.connectors.parameters())
    assert hint_stage.teacher is not None and "logits" not in hint_stage.teacher(torch.zeros(2, 3, 28, 28))
    kd_stage = StageRunner(run, 1)
    assert kd_stage.stage.name == "kd"
    assert not any(
        id(p) in {id(q) for g in kd_stage.optimizer.param_groups for q in g["params"]}
        for p in run.connectors.parameters()
    )
    # λ anneals linearly from 4 to 1 over the KD stage's steps (2 epochs × 3 steps)
    torch.testing.assert_close(kd_stage.kd_weights, torch.tensor([4.0, 3.5, 3.0, 2.5, 2.0, 1.5]))
    assert all(not p.requires_grad for p in run.teacher.parameters()) and not run.teacher.training


def test_weight_decay_skips_biases_and_norm_parameters(tmp_path):
    run = setup_run(paper_config(tmp_path), DistEnv(0, 1, 0, torch.device("cpu")))
    decay, no_decay = StageRunner(run, 1).optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_resume_reproduces_the_uninterrupted_run_across_the_stage_boundary(tmp_path):
    straight = train(paper_config(tmp_path / "a"))
    checkpoints = ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")
    assert len(checkpoints) == 3  # hint epoch 1, kd epoch 1, kd epoch 2
    final = torch.load(tmp_path / "a" / "student.pt", weights_only=True)
    for start in checkpoints[:2]:  # resume after stage 1, and mid stage 2
        out = tmp_path / f"b-{start.stem}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copy(start, out / "checkpoints" / start.name)
        resumed = train(paper_config(out), resume="auto")
        again = torch.load(out / "student.pt", weights_only=True)
        for name, value in final.items():
            assert torch.equal(value, again[name]), f"{name} differs after resuming from {start.name}"
        assert resumed["final"]["top1"] == straight["final"]["top1"]
        assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]


def test_exported_student_is_a_plain_state_dict(tmp_path):
    summary = train(paper_config(tmp_path, "optim.epochs=1"))
    model = build_model("fitnet_thin", 10, str(tmp_path / "student.pt"))
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    assert summary["student_params"] == sum(p.numel() for p in model.parameters())


def test_resume_with_another_config_is_refused(tmp_path):
    train(paper_config(tmp_path, "optim.epochs=1"))
    with pytest.raises(ckpt.CheckpointError, match=r"comes from another config \(model: .*fitnet_thin_wide"):
        train(paper_config(tmp_path, "optim.epochs=1", "model.student=fitnet_thin_wide"), resume="auto")


def test_class_count_mismatch_names_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"has 10 classes but model.num_classes is 5; set model.num_classes=10"):
        train(small("demo_fmnist_student", tmp_path, "model.num_classes=5", "data.train_subset=640"))


def test_global_batch_must_split_evenly_across_ranks(tmp_path):
    cfg = small("demo_fmnist_student", tmp_path, "optim.batch_size=100")
    assert per_rank_batch(cfg, DistEnv(0, 4, 0, torch.device("cpu"))) == 25
    with pytest.raises(ConfigError, match=r"optim.batch_size 100 \(global\) is not divisible by the 3 processes"):
        per_rank_batch(cfg, DistEnv(0, 3, 0, torch.device("cpu")))
