"""The torchvision input path: ImageFolder + PIL decoding in DataLoader workers (the CPU fallback to DALI).

Augmentation randomness is a function of (seed, epoch, sample index) alone: the sampler hands the dataset
(epoch, index) keys and each sample seeds its own generator. Batches are therefore identical for any number of
workers or ranks, a 2-rank run sees exactly the samples of a 1-rank run with the same global batch, and a resumed
epoch can start at any step without replaying the ones before it.

Bad files (data.skip_bad): a training sample that fails to decode is replaced by the next decodable sample in
dataset order (so every batch stays full and the step count fixed); a validation sample is dropped from its batch
(so accuracy never counts a stand-in). Either way the path travels with the batch to the main process, where the
loader keeps it in `bad_files`. The DALI backend follows the same rules; both list and shard samples through
fastfit.data.samples.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms import v2

from fastfit.config import DataConfig
from fastfit.data.auto import resolve_workers
from fastfit.data.samples import (
    BadFileLog,
    ShardedSampler,
    bad_file_message,
    check_start_step,
    load_image_folders,
)
from fastfit.dist import DistEnv
from fastfit.errors import DataError

_SEED_STRIDE = 1_000_003  # keeps (epoch, index) → seed one-to-one for any dataset below a million samples per epoch
MAX_SUBSTITUTES = 16  # consecutive undecodable files before skip_bad gives up: a broken folder, not a few files
# Signals that ask a run to stop: SLURM, `timeout` and `kill -- -PGID` send them to every process of the group.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def init_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: stop signals are the main process's to act on. Torch's worker SIGTERM handler
    would kill the worker (and with it the run, before its checkpoint) and SIGINT would raise KeyboardInterrupt in it;
    ignored, the worker keeps serving batches until the main process has saved. Workers still end with the main
    process: it shuts them down on exit, and a worker whose parent died notices within seconds (torch's watchdog).

    A main process that ends mid-transfer (a bare Ctrl-C) breaks the connection a worker's fd-sharing thread is
    writing to; that is a consequence the main process already reports, so the thread's traceback is not printed."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.excepthook = _quiet_lost_main  # multiprocessing's resource_sharer thread reports through sys.excepthook


def _quiet_lost_main(exc_type, exc, tb) -> None:
    if not issubclass(exc_type, ConnectionError):
        sys.__excepthook__(exc_type, exc, tb)


def train_transform(cfg: DataConfig) -> v2.Transform:
    steps: list[v2.Transform] = [v2.ToImage()]
    if cfg.augment == "rrc":
        steps.append(
            v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.rrc_scale), ratio=tuple(cfg.rrc_ratio), antialias=True)
        )
    elif cfg.augment == "pad-crop":
        steps.append(v2.RandomCrop(cfg.image_size, padding=max(1, cfg.image_size // 8)))
    else:
        steps += [v2.Resize(cfg.image_size, antialias=True), v2.CenterCrop(cfg.image_size)]
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


def val_transform(cfg: DataConfig) -> v2.Transform:
    steps: list[v2.Transform] = [v2.ToImage()]
    if cfg.val_resize > 0:
        steps.append(v2.Resize(cfg.val_resize, antialias=True))
    steps += [v2.CenterCrop(cfg.image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)


# PIL modes holding more than 8 bits of gray; their convert("RGB") clips every value above 255 to white.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_rgb(path: str) -> Image.Image:
    """The image as 8-bit RGB. 16-bit gray (PIL modes I;16 and I, e.g. a 16-bit grayscale PNG) is scaled by 1/257,
    so 65535 becomes 255, where PIL's own conversion would clip it. (16-bit RGB PNGs PIL already reads as 8 bits.)"""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        if image.mode in _WIDE_GRAY_MODES:
            wide = np.asarray(image, dtype=np.float64)
            gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        return image.convert("RGB")


class SeededImageFolder(Dataset):
    """ImageFolder samples keyed by (epoch, index); the transform draws from a generator seeded by that key.

    Items are (image, label, bad) where `bad` holds the paths (newline-separated, "" if none) that failed to
    decode on the way to this item. Without skip_bad a failure raises DataError naming the file. With skip_bad,
    train substitutes the next decodable position; val (drop_bad) returns a zero placeholder with label -1 that
    the loader removes from the batch.
    """

    def __init__(
        self,
        folder: datasets.ImageFolder,
        indices: list[int],
        transform: v2.Transform,
        seed: int,
        skip_bad: bool = False,
        drop_bad: bool = False,
        image_size: int = 0,
    ):
        self.folder = folder
        self.indices = indices
        self.transform = transform
        self.seed = seed
        self.skip_bad = skip_bad
        self.drop_bad = drop_bad
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, position: int):
        path, label = self.folder.samples[self.indices[position]]
        try:
            return load_rgb(path), label, path, None
        except Exception as err:  # PIL raises several types for broken files; name the file either way
            return None, label, path, err

    def __getitem__(self, key: tuple[int, int]):
        epoch, position = key
        bad: list[str] = []
        for attempt in range(MAX_SUBSTITUTES + 1):
            image, label, path, err = self._load((position + attempt) % len(self.indices))
            if err is None:
                break
            if not self.skip_bad:
                raise DataError(bad_file_message(path, err)) from err
            bad.append(path)
            if self.drop_bad:
                return torch.zeros(3, self.image_size, self.image_size), -1, "\n".join(bad)
        else:
            raise DataError(
                f"{MAX_SUBSTITUTES + 1} consecutive files failed to decode (last {path}); "
                f"the folder looks broken, check it with: fastfit data check DATA_ROOT --decode"
            )
        # The substitute keeps the original key's seed: augmentation stays a function of (seed, epoch, position).
        # v2 transforms draw from torch's global generator; fork it so seeding here never leaks into the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * _SEED_STRIDE**2 + epoch * _SEED_STRIDE + position)
            return self.transform(image), label, "\n".join(bad)


class TorchvisionTrainLoader(BadFileLog):
    def __init__(
        self, dataset: SeededImageFolder, env: DistEnv, batch_size: int, workers: int, seed: int, channels_last: bool
    ):
        super().__init__()
        self.env = env
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.sampler = ShardedSampler(len(dataset), env, seed, shuffle=True, batch_size=batch_size)
        self.steps_per_epoch = len(dataset) // (batch_size * env.world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set has {len(dataset)} images, fewer than one global batch of "
                f"{batch_size * env.world_size}; lower optim.batch_size"
            )
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            pin_memory=env.device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=init_worker,
        )

    def epoch(self, epoch: int, start_step: int = 0):
        check_start_step(start_step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, start_step)
        for images, labels, bad in self.loader:
            self.note_bad(bad)
            yield _to_device(images, labels, self.env.device, self.channels_last)


class TorchvisionValLoader(BadFileLog):
    def __init__(self, dataset: SeededImageFolder, env: DistEnv, batch_size: int, workers: int, channels_last: bool):
        super().__init__()
        self.env = env
        self.channels_last = channels_last
        sampler = ShardedSampler(len(dataset), env, seed=0, shuffle=False, batch_size=None)
        self.num_samples = self._listed = len(sampler)
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=env.device.type == "cuda",
            drop_last=False,
            persistent_workers=workers > 0,
            worker_init_fn=init_worker,
        )

    def __iter__(self):
        for images, labels, bad in self.loader:
            if any(bad):  # only with skip_bad: drop the placeholders of undecodable files
                self.note_bad(bad)
                self.num_samples = self._listed - len(self.bad_files)  # each dropped file was one val sample
                keep = labels >= 0
                images, labels = images[keep], labels[keep]
                if labels.numel() == 0:
                    continue
            yield _to_device(images, labels, self.env.device, self.channels_last)


def _to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def build_torchvision_loaders(
    cfg: DataConfig, env: DistEnv, root: Path, batch_size: int, seed: int, channels_last: bool
):
    train_folder, train_idx, val_folder, val_idx = load_image_folders(cfg, root, seed)
    train_set = SeededImageFolder(train_folder, train_idx, train_transform(cfg), seed, skip_bad=cfg.skip_bad)
    val_set = SeededImageFolder(
        val_folder, val_idx, val_transform(cfg), seed, skip_bad=cfg.skip_bad, drop_bad=True, image_size=cfg.image_size
    )
    workers = resolve_workers(cfg)
    train = TorchvisionTrainLoader(train_set, env, batch_size, workers, seed, channels_last)
    val = TorchvisionValLoader(val_set, env, batch_size, workers, channels_last)
    return train, val, train_folder.classes
