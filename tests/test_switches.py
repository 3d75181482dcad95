"""Every speed switch the config allows trains to the same losses as the plain path (a few steps, CPU)."""

import json

import pytest
import torch

from fastfit.config import load_config
from fastfit.engine.loop import train
from fastfit.engine.runtime import compile_mode
from fastfit.errors import ConfigError

BASE = [
    "data.workers=0",
    "data.backend=torchvision",  # the switches under test, not the loader: the same images for every run
    "run.progress=false",
    "run.tensorboard=false",
    "run.device=cpu",
    "run.log_interval=1",
    "data.train_subset=128",
    "data.val_subset=32",
    "optim.batch_size=32",
    "optim.epochs=1",
    "run.max_steps_per_epoch=2",  # one update between the compared steps: enough to see a switch change training
    "model.teacher=wide_cnn",
    "recipe.name=mmrazor",
    'recipe.hints=[{student="stage2", teacher="stage2"}]',
]
PLAIN = ["run.amp=off", "run.channels_last=false", "run.compile=false", "run.fused_kernels=false", "optim.fused=false"]
# Each switch: its overrides and the relative tolerance on each step's losses (other kernels round differently,
# and the differences grow a little with every SGD step).
SWITCHES = [
    pytest.param(["run.channels_last=true"], 1e-3, id="channels_last"),
    pytest.param(["optim.fused=true"], 1e-5, id="fused_optimizer"),
    pytest.param(["run.fused_kernels=true"], 1e-4, id="fused_kernels", marks=pytest.mark.interpreter),
    pytest.param(["run.amp=bf16"], 3e-2, id="bf16_autocast"),
    pytest.param(["run.compile=true"], 1e-3, id="compile"),
    pytest.param(
        ["run.channels_last=true", "optim.fused=true", "run.fused_kernels=true", "run.amp=bf16", "run.compile=true"],
        3e-2,
        id="all",
        marks=pytest.mark.interpreter,
    ),
]


def _losses(tmp_path, name, extra):
    out = tmp_path / name
    train(load_config("demo_fmnist_student", [*BASE, *PLAIN, *extra, f'run.output_dir="{out}"']))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    return [{k: s[k] for k in ("loss", "ce", "kd", "hint/stage2")} for s in steps]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _losses(tmp_path_factory.mktemp("plain"), "plain", [])


@pytest.mark.slow
@pytest.mark.parametrize("overrides, tolerance", SWITCHES)
def test_switch_trains_like_the_plain_path(overrides, tolerance, plain, tmp_path):
    got = _losses(tmp_path, "switched", overrides)
    assert len(got) == len(plain) == 2
    for step, (a, b) in enumerate(zip(got, plain, strict=True)):
        for term in b:
            assert a[term] == pytest.approx(b[term], rel=tolerance, abs=1e-6), f"step {step + 1} {term}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on a GPU only")
def test_cuda_graphs_train_like_the_plain_path(plain, tmp_path):
    got = _losses(tmp_path, "graphs", ["run.device=cuda", "run.compile=true", "run.cuda_graphs=true"])
    for a, b in zip(got, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_cuda_graphs_need_compile_and_pick_the_graphing_mode(tmp_path):
    with pytest.raises(ConfigError, match=r"run.cuda_graphs = true needs run.compile = true"):
        train(
            load_config("demo_fmnist_student", [*BASE, *PLAIN, "run.cuda_graphs=true", f'run.output_dir="{tmp_path}"'])
        )
    assert compile_mode("default", True) == "reduce-overhead"
    assert compile_mode("max-autotune", False) == "max-autotune-no-cudagraphs"
    assert compile_mode("max-autotune-no-cudagraphs", True) == "max-autotune"
    assert compile_mode("default", False) == "default"


def test_half_precision_batches_reach_fp32_models_as_float32(tmp_path):
    # DALI on a GPU hands over float16 batches; with autocast off the trainer must widen them, not crash.
    from fastfit.dist import DistEnv
    from fastfit.engine.setup import setup_run
    from fastfit.engine.stage_runner import StageRunner

    cfg = load_config("demo_fmnist_student", [*BASE, *PLAIN, f'run.output_dir="{tmp_path}"'])
    run = setup_run(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    runner = StageRunner(run, 0)
    images, labels = next(iter(run.data.train.epoch(0)))
    reference, _ = runner.train_step(images.half().float(), labels, 0)
    run2 = setup_run(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    terms, _ = StageRunner(run2, 0).train_step(images.half(), labels, 0)
    assert terms["loss"].dtype == torch.float32
    assert terms["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-6)
