"""The torchvision input path: ImageFolder + PIL decoding in DataLoader workers (the CPU fallback to DALI).

Augmentation randomness is a function of (seed, epoch, sample index) alone: the sampler hands the dataset
(epoch, index) keys and each sample seeds its own generator. Batches are therefore identical for any number of
workers or ranks, a 2-rank run sees exactly the samples of a 1-rank run with the same global batch, and a resumed
epoch can start at any step without replaying the ones before it.

Bad files (data.skip_bad): a training sample that fails to decode is replaced by the next decodable sample in
dataset order (so every batch stays full and the step count fixed); a validation sample is dropped from its batch
(so accuracy never counts a stand-in). Either way the path travels with the batch to the main process, where the
loader keeps it in `bad_files`. The DALI backend follows the same rules and shares the sample listing below.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import v2

from fastfit.config import DataConfig
from fastfit.dist import DistEnv

_SEED_STRIDE = 1_000_003  # keeps (epoch, index) → seed one-to-one for any dataset below a million samples per epoch
MAX_SUBSTITUTES = 16  # consecutive undecodable files before skip_bad gives up: a broken folder, not a few files
_log = logging.getLogger("fastfit.data")


def check_split_dir(root: Path, split: str) -> Path:
    from fastfit.data import DataError

    path = root / split
    if not path.is_dir():
        raise DataError(f"dataset folder {path} does not exist; data.root must hold {split}/ with one folder per class")
    if not any(p.is_dir() for p in path.iterdir()):
        raise DataError(f"dataset folder {path} has no class folders; expected {split}/<class name>/<image files>")
    return path


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


def balanced_subset(targets: list[int], size: int, seed: int) -> list[int]:
    """`size` indices taken round-robin over classes, each class in a seeded random order (fixed per seed)."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    queues = [
        [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        for _, members in sorted(by_class.items())
    ]
    picked: list[int] = []
    depth = 0
    while len(picked) < size and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)]
        depth += 1
    return sorted(picked[:size])


def image_folder(root: Path, split: str) -> datasets.ImageFolder:
    from fastfit.data import DataError

    path = check_split_dir(root, split)
    try:
        return datasets.ImageFolder(path)
    except FileNotFoundError as err:  # a class folder without images
        classes = sorted(p.name for p in path.iterdir() if p.is_dir())
        empty = [
            name
            for name in classes
            if not any(
                datasets.folder.has_file_allowed_extension(f.name, datasets.folder.IMG_EXTENSIONS)
                for f in (path / name).iterdir()
            )
        ]
        listed = ", ".join(empty[:5]) + (f", … ({len(empty)} of {len(classes)})" if len(empty) > 5 else "")
        raise DataError(
            f"dataset folder {path}: class folders without images: {listed}; every class folder needs "
            f"at least one image ({', '.join(datasets.folder.IMG_EXTENSIONS)})"
        ) from err


def load_image_folders(cfg: DataConfig, root: Path, seed: int):
    """(train folder, train indices, val folder, val indices): the ImageFolder listings and the configured subsets.
    Both backends list samples here, so class indices and subsets are identical whichever decodes them."""
    from fastfit.data import DataError

    train_folder, val_folder = image_folder(root, cfg.train_dir), image_folder(root, cfg.val_dir)
    if train_folder.classes != val_folder.classes:
        raise DataError(
            f"{root}: train/ and val/ have different class folders ({len(train_folder.classes)} vs "
            f"{len(val_folder.classes)}); they must match so labels mean the same thing"
        )
    train_idx = list(range(len(train_folder)))
    if cfg.train_subset:
        train_idx = balanced_subset(train_folder.targets, cfg.train_subset, seed)
    val_idx = list(range(len(val_folder)))
    if cfg.val_subset:
        val_idx = balanced_subset(val_folder.targets, cfg.val_subset, seed)
    return train_folder, train_idx, val_folder, val_idx


def bad_file_message(path: str, err: object, others: int = 0) -> str:
    more = f" (and {others} more bad files)" if others else ""
    return (
        f"cannot decode image {path}: {err}{more}; remove the file or set data.skip_bad=true "
        f"(list every bad file with: fastfit data check DATA_ROOT --decode)"
    )


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
        self.folder, self.indices, self.transform, self.seed = folder, indices, transform, seed
        self.skip_bad, self.drop_bad, self.image_size = skip_bad, drop_bad, image_size

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, position: int):
        path, label = self.folder.samples[self.indices[position]]
        try:
            return self.folder.loader(path), label, path, None
        except Exception as err:  # PIL raises several types for broken files; name the file either way
            return None, label, path, err

    def __getitem__(self, key: tuple[int, int]):
        from fastfit.data import DataError

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


class ShardedSampler(Sampler):
    """(epoch, index) keys for one rank: a seeded permutation per epoch (train) or the plain order (val),
    dealt round-robin to ranks. Train drops the tail so every rank runs the same number of full batches."""

    def __init__(self, size: int, env: DistEnv, seed: int, shuffle: bool, batch_size: int | None):
        self.size, self.env, self.seed, self.shuffle, self.batch_size = size, env, seed, shuffle, batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _rank_indices(self) -> list[int]:
        order = self._order()
        if self.batch_size is not None:
            usable = len(order) // (self.batch_size * self.env.world_size) * self.batch_size * self.env.world_size
            order = order[:usable]
        mine = order[self.env.rank :: self.env.world_size]
        if self.batch_size is not None:
            mine = mine[self.start_step * self.batch_size :]
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, index) for index in self._rank_indices()])

    def __len__(self) -> int:
        return len(self._rank_indices())


class BadFileLog:
    """The bad files a loader met so far (each once, in order), logged when first seen."""

    def __init__(self):
        self.bad_files: list[str] = []
        self._seen: set[str] = set()

    def note_bad(self, paths) -> None:
        for joined in paths:
            for path in filter(None, joined.split("\n")):
                if path not in self._seen:
                    self._seen.add(path)
                    self.bad_files.append(path)
                    _log.warning(
                        "skipping undecodable image %s (data.skip_bad=true; %d so far)", path, len(self.bad_files)
                    )


class TorchvisionTrainLoader(BadFileLog):
    def __init__(
        self, dataset: SeededImageFolder, env: DistEnv, batch_size: int, workers: int, seed: int, channels_last: bool
    ):
        super().__init__()
        self.env, self.batch_size, self.channels_last = env, batch_size, channels_last
        self.sampler = ShardedSampler(len(dataset), env, seed, shuffle=True, batch_size=batch_size)
        self.steps_per_epoch = len(dataset) // (batch_size * env.world_size)
        if self.steps_per_epoch == 0:
            from fastfit.data import DataError

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
        )

    def epoch(self, epoch: int, start_step: int = 0):
        check_start_step(start_step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, start_step)
        for images, labels, bad in self.loader:
            self.note_bad(bad)
            yield _to_device(images, labels, self.env.device, self.channels_last)


def check_start_step(start_step: int, steps_per_epoch: int) -> None:
    if not 0 <= start_step <= steps_per_epoch:
        from fastfit.data import DataError

        raise DataError(f"start_step must be in [0, {steps_per_epoch}] (steps per epoch), got {start_step}")


class TorchvisionValLoader(BadFileLog):
    def __init__(self, dataset: SeededImageFolder, env: DistEnv, batch_size: int, workers: int, channels_last: bool):
        super().__init__()
        self.env, self.channels_last = env, channels_last
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
    train = TorchvisionTrainLoader(train_set, env, batch_size, cfg.workers, seed, channels_last)
    val = TorchvisionValLoader(val_set, env, batch_size, cfg.workers, channels_last)
    return train, val, train_folder.classes
