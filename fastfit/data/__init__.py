"""Input pipelines behind one contract, so the trainer never knows which backend feeds it.

    bundle = build_loaders(cfg.data, env, batch_size=per_rank_batch, seed=cfg.run.seed, channels_last=True)
    for images, labels in bundle.train.epoch(epoch, start_step=0): ...   # bundle.train.steps_per_epoch steps
    for images, labels in bundle.val: ...                                # each val sample once across ranks

Images arrive on env.device as float (B, 3, H, W), normalized, channels-last in memory when asked; labels int64.
Class indices follow torchvision ImageFolder (sorted folder names) for every backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fastfit.config import DataConfig
from fastfit.data.auto import resolve_backend
from fastfit.dist import DistEnv
from fastfit.errors import DataError


class TrainLoader(Protocol):
    steps_per_epoch: int
    batch_size: int  # per rank

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch` from step `start_step` on; the same epoch number gives the same batches."""


class ValLoader(Protocol):
    num_samples: int  # samples this rank evaluates

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataBundle:
    train: TrainLoader
    val: ValLoader
    classes: list[str]
    backend: str
    root: Path


def dataset_root(cfg: DataConfig) -> Path:
    """The folder holding train/ and val/: the configured root, or the Fashion-MNIST JPEG cache (made once)."""
    if cfg.dataset == "fashion-mnist":
        from fastfit.data.fmnist import ensure_fashion_mnist_jpegs

        return ensure_fashion_mnist_jpegs(Path(cfg.root) if cfg.root else None)
    if not cfg.root:
        raise DataError(
            "data.root is empty; set it to the folder holding train/ and val/ class folders "
            "(ImageNet layout), e.g. data.root=/data/imagenet"
        )
    return Path(cfg.root).expanduser()


def build_loaders(cfg: DataConfig, env: DistEnv, batch_size: int, seed: int, channels_last: bool) -> DataBundle:
    """Train and val loaders for this rank; `batch_size` is per rank."""
    root = dataset_root(cfg)
    backend = resolve_backend(cfg, env)
    if backend == "dali":
        from fastfit.data.dali_backend import build_dali_loaders

        train, val, classes = build_dali_loaders(
            cfg,
            env,
            root,
            batch_size=batch_size,
            seed=seed,
            channels_last=channels_last,
            train_list=cfg.train_list or None,
            val_list=cfg.val_list or None,
        )
    else:
        if cfg.train_list or cfg.val_list:
            raise DataError(
                "data.train_list / data.val_list are read by the DALI backend only; install DALI "
                "(pip install 'fastfit[dali]') and set data.backend=dali or auto, or use the folder layout "
                "(train/<class>/…)"
            )
        from fastfit.data.torchvision_backend import build_torchvision_loaders

        train, val, classes = build_torchvision_loaders(
            cfg, env, root, batch_size=batch_size, seed=seed, channels_last=channels_last
        )
    return DataBundle(train=train, val=val, classes=classes, backend=backend, root=root)
