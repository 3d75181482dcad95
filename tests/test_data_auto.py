"""`auto` in the input pipeline: DALI whenever it is importable (its CPU pipeline on a CPU), torchvision without it,
and loader thread counts from the rank's share of the cores."""

import pytest
import torch
from constant_images import constant_split

from fastfit.config import DataConfig, load_config
from fastfit.data import auto, build_loaders
from fastfit.dist import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CUDA = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))


def _cores(monkeypatch, cores: int, local_ranks: int = 1) -> None:
    monkeypatch.setattr(auto.os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))


def test_backend_defaults_to_auto():
    assert DataConfig().backend == "auto" and load_config(None).data.backend == "auto"


@pytest.mark.parametrize("env", [CPU, CUDA], ids=["cpu", "cuda"])
def test_auto_is_dali_when_importable_and_torchvision_when_not(monkeypatch, env):
    monkeypatch.setattr(auto.importlib.util, "find_spec", lambda name: object() if name == "nvidia.dali" else None)
    assert auto.resolve_backend(DataConfig(), env) == "dali"
    monkeypatch.setattr(auto.importlib.util, "find_spec", lambda name: None)
    assert auto.resolve_backend(DataConfig(), env) == "torchvision"

    def no_nvidia(name):
        raise ModuleNotFoundError("No module named 'nvidia'")

    monkeypatch.setattr(auto.importlib.util, "find_spec", no_nvidia)
    assert auto.resolve_backend(DataConfig(), env) == "torchvision"
    # An explicit choice is never second-guessed.
    assert auto.resolve_backend(DataConfig(backend="dali"), env) == "dali"


def test_default_config_on_cpu_trains_from_dalis_cpu_pipeline(tmp_path):
    pytest.importorskip("nvidia.dali")
    for split in ("train", "val"):
        constant_split(tmp_path, split, {"a": 4, "b": 4})
    cfg = load_config(None, [f'data.root="{tmp_path}"', "data.image_size=8", "data.val_resize=0"]).data
    bundle = build_loaders(cfg, CPU, batch_size=4, seed=0, channels_last=False)
    assert bundle.backend == "dali"
    images, labels = next(iter(bundle.train.epoch(0)))
    assert images.device.type == "cpu" and images.shape == (4, 3, 8, 8) and labels.shape == (4,)


@pytest.mark.parametrize(
    ("cores", "local_ranks", "threads"), [(2, 1, 2), (16, 1, 8), (64, 8, 8), (24, 8, 3), (1, 1, 1), (4, 8, 1)]
)
def test_loader_threads_are_the_ranks_share_of_the_cores_at_most_8(monkeypatch, cores, local_ranks, threads):
    _cores(monkeypatch, cores, local_ranks)
    assert auto.resolve_dali_threads(DataConfig()) == threads
    assert auto.resolve_workers(DataConfig()) == threads


def test_explicit_thread_counts_pass_through(monkeypatch):
    _cores(monkeypatch, 2)
    cfg = DataConfig(dali_threads=5, workers=0)
    assert auto.resolve_dali_threads(cfg) == 5 and auto.resolve_workers(cfg) == 0
