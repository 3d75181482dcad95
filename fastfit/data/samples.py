"""What both input backends share, so they list, subset and shard samples identically: the ImageFolder listing
of a split (class index = sorted folder name), class-balanced subsets, the per-rank sample order (ShardedSampler),
and the record of bad files met on the way.

The torchvision backend (torchvision_backend.py) and the DALI backend (dali_backend.py) both build on this module;
a new backend should too, so that a given (seed, epoch, rank count) yields the same samples whichever decodes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Sampler
from torchvision import datasets

from fastfit.config import DataConfig
from fastfit.dist import DistEnv
from fastfit.errors import DataError

logger = logging.getLogger(__name__)


def check_split_dir(root: Path, split: str) -> Path:
    path = root / split
    if not path.is_dir():
        raise DataError(f"dataset folder {path} does not exist; data.root must hold {split}/ with one folder per class")
    if not any(p.is_dir() for p in path.iterdir()):
        raise DataError(f"dataset folder {path} has no class folders; expected {split}/<class name>/<image files>")
    return path


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


@dataclass
class FolderWalk:
    """Every real directory under a folder, each once, as os.walk(followlinks=True) would list it without repeats."""

    folders: list[tuple[str, list[str]]] = field(default_factory=list)  # (directory path, its file names, sorted)
    # (path, why it was not listed): a symlink back to a directory above it, one reached twice, an unreadable folder
    skipped: list[tuple[str, str]] = field(default_factory=list)


def walk_once(top: str | os.PathLike, seen: dict[tuple[int, int], str] | None = None) -> FolderWalk:
    """Walk `top` following directory symlinks, visiting each real directory (by st_dev, st_ino) once, so a symlink
    loop cannot repeat a class's images. `seen` (directory identity → first path) may be shared across calls, so a
    directory linked into two classes is listed for the first only. Folders come sorted by path, as os.walk's are
    when sorted (the order ImageFolder uses)."""
    seen = {} if seen is None else seen
    walk = FolderWalk()
    pending = [(os.fspath(top), ())]  # (path, identities of the directories above it)
    while pending:
        path, above = pending.pop()
        try:
            info = os.stat(path)
            identity = (info.st_dev, info.st_ino)
            if identity in above:
                walk.skipped.append((path, f"directory symlink loop: leads back to {seen[identity]}"))
                continue
            if identity in seen:
                walk.skipped.append(
                    (path, f"directory reached twice through symlinks: the same folder as {seen[identity]}")
                )
                continue
            seen[identity] = path
            with os.scandir(path) as entries:
                entries = list(entries)
        except OSError as err:
            walk.skipped.append((path, f"unreadable folder: {err.strerror or err}"))
            continue
        files = sorted(e.name for e in entries if not _is_dir(e))
        walk.folders.append((path, files))
        for entry in sorted((e for e in entries if _is_dir(e)), key=lambda e: e.name, reverse=True):
            pending.append((entry.path, (*above, identity)))
    walk.folders.sort()
    return walk


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk(followlinks=True) does
    except OSError:
        return False


class _ImageFolderOnce(datasets.ImageFolder):
    """ImageFolder whose listing visits each real directory once (see walk_once); an unreadable folder is an error."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        instances: list[tuple[str, int]] = []
        seen: dict[tuple[int, int], str] = {}
        empty = []
        for target_class in sorted(class_to_idx):
            walk = walk_once(os.path.join(directory, target_class), seen)
            for path, reason in walk.skipped:
                if reason.startswith("unreadable"):
                    raise DataError(f"dataset folder {path}: {reason}; fix its permissions or remove it")
                logger.warning("%s: %s; its images are listed once", path, reason)
            before = len(instances)
            for folder, names in walk.folders:
                for name in names:
                    path = os.path.join(folder, name)
                    if datasets.folder.has_file_allowed_extension(path, extensions or datasets.folder.IMG_EXTENSIONS):
                        instances.append((path, class_to_idx[target_class]))
            if len(instances) == before:
                empty.append(target_class)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return instances


def image_folder(root: Path, split: str) -> datasets.ImageFolder:
    path = check_split_dir(root, split)
    try:
        return _ImageFolderOnce(path)
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


class ShardedSampler(Sampler):
    """(epoch, index) keys for one rank: a seeded permutation per epoch (train) or the plain order (val),
    dealt round-robin to ranks. Train drops the tail so every rank runs the same number of full batches."""

    def __init__(self, size: int, env: DistEnv, seed: int, shuffle: bool, batch_size: int | None):
        self.size = size
        self.env = env
        self.seed = seed
        self.shuffle = shuffle
        self.batch_size = batch_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

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


def check_start_step(start_step: int, steps_per_epoch: int) -> None:
    if not 0 <= start_step <= steps_per_epoch:
        raise DataError(f"start_step must be in [0, {steps_per_epoch}] (steps per epoch), got {start_step}")


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
                    logger.warning(
                        "skipping undecodable image %s (data.skip_bad=true; %d so far)", path, len(self.bad_files)
                    )
