"""The torchvision input path: subsets, sharding, per-sample seeded augmentation, resume, bad files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from constant_images import MEAN, STD, constant_split, identities
from PIL import Image

from fastfit.config import DataConfig
from fastfit.data.samples import ShardedSampler, balanced_subset
from fastfit.data.torchvision_backend import build_torchvision_loaders
from fastfit.dist import DistEnv
from fastfit.errors import DataError


def _env(rank: int = 0, world: int = 1) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def _cfg(root: Path, **overrides) -> DataConfig:
    base = dict(root=str(root), image_size=8, val_resize=0, augment="rrc", mean=MEAN, std=STD, workers=0)
    return DataConfig(**{**base, **overrides})


@pytest.fixture
def constant_root(tmp_path):
    constant_split(tmp_path, "train", {"a": 5, "b": 6, "c": 6})  # 17 training images
    constant_split(tmp_path, "val", {"a": 3, "b": 2, "c": 2})  # 7 val images
    return tmp_path


def test_balanced_subset_takes_classes_round_robin():
    targets = [0] * 5 + [1] * 2 + [2] * 7
    picked = balanced_subset(targets, 7, seed=3)
    assert picked == sorted(set(picked)) and len(picked) == 7
    assert [sum(targets[i] == c for i in picked) for c in range(3)] == [3, 2, 2]  # class 1 runs out after 2
    assert balanced_subset(targets, 7, seed=3) == picked
    assert any(balanced_subset(targets, 7, seed=s) != picked for s in range(4, 10))
    assert balanced_subset(targets, 100, seed=0) == list(range(len(targets)))


def test_sharded_sampler_two_ranks_split_the_one_rank_global_batches():
    size, batch = 23, 3
    one = ShardedSampler(size, _env(), seed=5, shuffle=True, batch_size=2 * batch)
    ranks = [ShardedSampler(size, _env(r, 2), seed=5, shuffle=True, batch_size=batch) for r in range(2)]
    for epoch in (0, 1):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        full = [i for _, i in one]
        mine = [[i for _, i in s] for s in ranks]
        assert len(full) == 18 and len(mine[0]) == len(mine[1]) == 9  # 23 // 6 * 6: the tail is dropped
        assert set(mine[0]).isdisjoint(mine[1])
        for step in range(3):
            assert set(mine[0][step * batch : (step + 1) * batch]) | set(
                mine[1][step * batch : (step + 1) * batch]
            ) == set(full[step * 2 * batch : (step + 1) * 2 * batch])
        ranks[0].set_epoch(epoch, start_step=2)
        assert [i for _, i in ranks[0]] == mine[0][2 * batch :]
    one.set_epoch(0)
    epoch0 = [i for _, i in one]
    one.set_epoch(1)
    assert [i for _, i in one] != epoch0


def test_val_sampler_deals_every_index_once():
    parts = [[i for _, i in ShardedSampler(11, _env(r, 3), seed=0, shuffle=False, batch_size=None)] for r in range(3)]
    assert sorted(i for part in parts for i in part) == list(range(11))
    assert [len(p) for p in parts] == [4, 4, 3]


def _gradient_root(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name in ("x", "y"):
            (root / split / name).mkdir(parents=True)
            for i in range(5):
                h, w = 20 + 3 * i, 26 - 2 * i
                pixels = np.linspace(0, 255, h * w * 3).reshape(h, w, 3) + rng.integers(0, 30, (h, w, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_augmentation_is_a_function_of_the_sample_not_of_workers_or_ranks(tmp_path):
    root = _gradient_root(tmp_path)
    batches = {}
    for workers in (0, 2):
        train, _, _ = build_torchvision_loaders(
            _cfg(root, workers=workers), _env(), root, 4, seed=7, channels_last=False
        )
        batches[workers] = list(train.epoch(2))
    assert len(batches[0]) == 2
    for (a, la), (b, lb) in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # Rank r's batch k row i is row 2i + r of the 1-rank global batch k (round-robin dealing).
    one, _, _ = build_torchvision_loaders(_cfg(root), _env(), root, 4, seed=7, channels_last=False)
    global_batches = list(one.epoch(2))
    for rank in range(2):
        train, _, _ = build_torchvision_loaders(_cfg(root), _env(rank, 2), root, 2, seed=7, channels_last=False)
        for k, (images, labels) in enumerate(train.epoch(2)):
            assert torch.equal(images, global_batches[k][0][rank::2])
            assert torch.equal(labels, global_batches[k][1][rank::2])


def test_resume_mid_epoch_gives_exactly_the_rest_of_the_epoch(constant_root):
    train, _, _ = build_torchvision_loaders(_cfg(constant_root), _env(), constant_root, 4, seed=1, channels_last=True)
    full = list(train.epoch(3))
    resumed = list(train.epoch(3, start_step=2))
    assert len(full) == train.steps_per_epoch == 4 and len(resumed) == 2
    for (a, la), (b, lb) in zip(full[2:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert full[0][0].is_contiguous(memory_format=torch.channels_last)


def test_bad_start_step_and_too_small_a_train_set_are_named(constant_root):
    train, _, _ = build_torchvision_loaders(_cfg(constant_root), _env(), constant_root, 4, seed=1, channels_last=False)
    with pytest.raises(DataError, match=r"start_step must be in \[0, 4\] \(steps per epoch\), got 5"):
        next(train.epoch(0, start_step=5))
    with pytest.raises(DataError, match="the training set has 17 images, fewer than one global batch of 18"):
        build_torchvision_loaders(_cfg(constant_root), _env(0, 2), constant_root, 9, seed=1, channels_last=False)


def test_a_class_folder_without_images_is_named(constant_root):
    (constant_root / "val" / "d").mkdir()
    with pytest.raises(
        DataError,
        match=f"dataset folder {constant_root / 'val'}: class folders without images: d; "
        "every class folder needs at least one image",
    ):
        build_torchvision_loaders(_cfg(constant_root), _env(), constant_root, 4, seed=1, channels_last=False)
    for name in "efghijk":  # many empty folders: a few names and the count, not a wall of text
        (constant_root / "val" / name).mkdir()
    with pytest.raises(DataError, match=r"without images: d, e, f, g, h, … \(8 of 11\); every class"):
        build_torchvision_loaders(_cfg(constant_root), _env(), constant_root, 4, seed=1, channels_last=False)


def test_bad_file_is_named_or_skipped_and_counted(constant_root):
    bad_train = constant_root / "train" / "b" / "002_bad.png"  # sorts between b/002.png and b/003.png
    bad_train.write_bytes(b"this is not a png\n" * 20)
    bad_val = constant_root / "val" / "a" / "000_bad.png"
    bad_val.write_bytes(b"")

    train, val, _ = build_torchvision_loaders(
        _cfg(constant_root), _env(), constant_root, 2, seed=0, channels_last=False
    )
    with pytest.raises(DataError, match=f"cannot decode image {bad_train}: .*set data.skip_bad=true"):
        for _ in train.epoch(0):
            pass
    with pytest.raises(DataError, match=f"cannot decode image {bad_val}"):
        list(val)

    train, val, _ = build_torchvision_loaders(
        _cfg(constant_root, skip_bad=True), _env(), constant_root, 2, seed=0, channels_last=False
    )
    # Train: the bad file's slot is filled by the next sample in dataset order (b/003.png, identity 8).
    listing = sorted(str(p) for p in (constant_root / "train").rglob("*.png"))
    position = listing.index(str(bad_train))
    sampler = ShardedSampler(len(listing), _env(), seed=0, shuffle=True, batch_size=2)
    order = [i for _, i in sampler]
    expected = [position + 1 if i == position else i for i in order]
    identity_of_position = [i - (i > position) for i in range(len(listing))]  # the bad file has no colour
    seen = [k for images, _ in train.epoch(0) for k in identities(images)]
    assert seen == [identity_of_position[i] for i in expected]
    assert train.bad_files == [str(bad_train)]  # 18 files, batch 2: every position is in the epoch
    # Val: dropped, every other sample exactly once, num_samples says so.
    seen = sorted(k for images, _ in val for k in identities(images))
    assert seen == list(range(7)) and val.num_samples == 7 and val.bad_files == [str(bad_val)]
