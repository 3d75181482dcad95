"""run.fused_kernels=true swaps the Triton ops into the trainer (interpreter on CPU) without changing the training."""

import json

import pytest
import torch

from fastfit.config import load_config
from fastfit.dist import DistEnv
from fastfit.distill.stage_model import StageModel, TeacherModel
from fastfit.engine.loop import train
from fastfit.engine.setup import setup_run

pytestmark = pytest.mark.interpreter

CONFIG = [
    "data.workers=0",
    "run.progress=false",
    "run.tensorboard=false",
    "run.device=cpu",
    "run.log_interval=1",
    "data.train_subset=128",
    "data.val_subset=64",
    "optim.batch_size=32",
    "optim.epochs=1",
    "run.max_steps_per_epoch=3",
    "model.teacher=wide_cnn",
    "recipe.name=mmrazor",
    'recipe.hints=[{student="stage2", teacher="stage2", connector="mmrazor", loss="normalized_l2", weight=10.0}]',
]


# upstream 1: the fused KD objective keeps the gradient its forward wrote; 2: its backward recomputes it.
@pytest.mark.parametrize("upstream", [1.0, 2.0])
def test_one_step_gives_the_same_terms_and_gradients(tmp_path, upstream):
    cfg = load_config("demo_fmnist_student", [*CONFIG, f'run.output_dir="{tmp_path}"'])
    run = setup_run(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    images, labels = next(iter(run.data.train.epoch(0)))
    stage = run.stages[0]
    teacher_out = TeacherModel(run.teacher, cfg.recipe.hints, stage)(images)
    results = {}
    for fused in (False, True):
        model = StageModel(cfg, stage, run.student, run.connectors, fused_kd=fused, fused_hint=fused)
        assert all(h.fused == fused for h in model.hint_losses) and model.kd.fused == fused
        model.zero_grad(set_to_none=True)
        loss, terms, _ = model(images, labels, teacher_out, torch.tensor(10.0))
        (loss if upstream == 1.0 else upstream * loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = ({k: v.item() for k, v in terms.items()}, grads)
    (ref_terms, ref_grads), (fused_terms, fused_grads) = results[False], results[True]
    assert fused_terms == pytest.approx(ref_terms, rel=1e-4)
    assert ref_grads.keys() == fused_grads.keys() and any(n.startswith("hint_losses.") for n in ref_grads)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        assert ((fused_grads[name] - grad).abs().max() / scale).item() < 1e-4, name


def _run(tmp_path, name, fused):
    out = tmp_path / name
    train(load_config("demo_fmnist_student", [*CONFIG, f"run.fused_kernels={fused}", f'run.output_dir="{out}"']))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    return steps, torch.load(out / "student.pt", weights_only=True)


@pytest.mark.slow
def test_fused_and_reference_losses_train_the_same_student(tmp_path):
    ref_steps, ref_weights = _run(tmp_path, "reference", "false")
    fused_steps, fused_weights = _run(tmp_path, "fused", "true")
    assert len(ref_steps) == len(fused_steps) == 3
    for key in ("loss", "ce", "kd", "hint/stage2"):
        assert [s[key] for s in fused_steps] == pytest.approx([s[key] for s in ref_steps], rel=1e-4, abs=1e-6), key
    # Rounding differences of ~1e-6 per step grow over SGD steps at lr 0.1; a wrong gradient term would move
    # weights by ~lr·|grad| ≈ 1e-2, far beyond this bound.
    for name, value in ref_weights.items():
        torch.testing.assert_close(fused_weights[name], value, rtol=1e-3, atol=1e-3, msg=name)
