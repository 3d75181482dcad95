"""The DALI input path on the CPU ('cpu' decoder, device_id=None): the loader contract, torchvision parity,
sharding, determinism, colour handling and bad files. The GPU ('mixed') path: scripts/gpu_check_dali.py."""

import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install fastfit[dali])")

from constant_images import MEAN, STD, constant_split, identities  # noqa: E402

from fastfit.config import DataConfig  # noqa: E402
from fastfit.data.dali_backend import build_dali_loaders, dali_reason, read_file_list, require_dali  # noqa: E402
from fastfit.data.samples import ShardedSampler  # noqa: E402
from fastfit.data.torchvision_backend import build_torchvision_loaders  # noqa: E402
from fastfit.dist import DistEnv  # noqa: E402
from fastfit.errors import DataError  # noqa: E402

SKLEARN_IMAGES = Path(__import__("sklearn.datasets").datasets.__file__).parent / "images"


def _env(rank: int = 0, world: int = 1) -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def _cfg(root: Path, **overrides) -> DataConfig:
    base = dict(
        root=str(root), image_size=8, val_resize=0, augment="rrc", mean=MEAN, std=STD, workers=0, dali_threads=2
    )
    return DataConfig(**{**base, **overrides})


@pytest.fixture
def constant_root(tmp_path):
    # Class folder names whose sorted order differs from creation and numeric order: "10" < "9" < "B" < "a".
    root = tmp_path / "constant"
    constant_split(root, "train", {"a": 5, "9": 4, "B": 6, "10": 6})  # 21 training images
    constant_split(root, "val", {"a": 3, "9": 3, "B": 2, "10": 3})  # 11 val images: odd
    return root


@pytest.fixture
def noise_root(tmp_path):
    """21 training images of random noise in assorted sizes: any change of crop or flip changes the pixels."""
    root = tmp_path / "noise"
    rng = np.random.default_rng(0)
    for split, count in (("train", 21), ("val", 3)):
        for k in range(count):
            (root / split / f"c{k % 3}").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (20 + k % 7, 24 + k % 5, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"c{k % 3}" / f"{k:03d}.png")
    return root


@pytest.fixture
def photo_root(tmp_path):
    """The two real photos of scikit-learn (427×640 JPEGs), one class each, in both splits."""
    root = tmp_path / "photos"
    for split in ("train", "val"):
        for name in ("china", "flower"):
            (root / split / name).mkdir(parents=True)
            shutil.copy(SKLEARN_IMAGES / f"{name}.jpg", root / split / name / f"{name}.jpg")
    return root


@pytest.mark.parametrize("augment", ["rrc", "pad-crop", "none"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_have_the_contract_shape_dtype_and_layout(constant_root, augment, channels_last):
    train, val, classes = build_dali_loaders(
        _cfg(constant_root, augment=augment), _env(), constant_root, batch_size=4, seed=0, channels_last=channels_last
    )
    assert classes == ["10", "9", "B", "a"] and train.steps_per_epoch == 5 and train.batch_size == 4
    batches = list(train.epoch(0))
    assert len(batches) == 5
    for images, labels in batches + list(val):
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.float32 and images.device.type == "cpu"
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]
    # Constant images stay constant through any crop, resize and flip: identities survive augmentation.
    seen = [k for images, _ in batches for k in identities(images)]
    assert len(set(seen)) == 20 and set(seen) <= set(range(21))


def test_copy_and_zero_copy_outputs_agree_and_outlive_the_pipeline(constant_root):
    train, _, _ = build_dali_loaders(
        _cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True
    )
    kept = list(train.epoch(0))  # zero-copy views of DALI's buffers (dynamic executor)
    snapshot = [(x.clone(), y.clone()) for x, y in kept]
    for _ in train.epoch(1):  # more pipelines built, run and destroyed meanwhile
        pass
    assert all(torch.equal(x, a) and torch.equal(y, b) for (x, y), (a, b) in zip(kept, snapshot, strict=True))
    pipe = train._build(train._pipeline(epoch=11, keys=list(range(8))), list(range(8)))
    outputs = pipe.run()
    copied, viewed = train._to_torch(outputs, 3, zero_copy=False), train._to_torch(outputs, 3, zero_copy=True)
    assert all(torch.equal(a, b) for a, b in zip(copied, viewed, strict=True)) and copied[0].shape == (3, 3, 8, 8)


def test_normalization_matches_a_hand_computed_pixel(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((30, 40, 3), (200, 100, 50), np.uint8)).save(tmp_path / split / "c" / f"{i}.png")
    expected = torch.tensor([(200 / 255 - 0.5) / 0.2, (100 / 255 - 0.4) / 0.25, (50 / 255 - 0.3) / 0.3])
    for augment in ("rrc", "pad-crop", "none"):
        train, val, _ = build_dali_loaders(
            _cfg(tmp_path, augment=augment, image_size=16, val_resize=20),
            _env(),
            tmp_path,
            batch_size=2,
            seed=0,
            channels_last=True,
        )
        ((images, _),) = list(train.epoch(0))
        ((val_images, _),) = list(val)
        centre = images[:, :, 4:12, 4:12]  # pad-crop may show up to 2 padded pixels at an edge
        assert torch.allclose(centre, expected.view(1, 3, 1, 1).expand_as(centre), atol=1e-5), augment
        assert torch.allclose(val_images, expected.view(1, 3, 1, 1).expand_as(val_images), atol=1e-5)


def test_pad_crop_shifts_by_at_most_the_padding_and_fills_black(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        for i in range(16):
            Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(tmp_path / split / "c" / f"{i}.png")
    train, _, _ = build_dali_loaders(
        _cfg(tmp_path, augment="pad-crop", image_size=16, hflip=False),
        _env(),
        tmp_path,
        batch_size=16,
        seed=0,
        channels_last=False,
    )
    ((images, _),) = list(train.epoch(0))
    white = (images[:, 0] > 0).int()  # raw 255 → positive; padding (raw 0) → (0 − 0.5) / 0.2 < 0
    black = (1.0 - 0.5) / 0.2
    assert torch.allclose(images[:, 0][white == 1], torch.tensor(black))
    rows, cols = white.sum(2).amax(1), white.sum(1).amax(1)
    assert rows.min() >= 14 and cols.min() >= 14  # padding 16 // 8 = 2: at most 2 rows/columns lost
    assert (rows < 16).any() and (cols < 16).any()  # and the shift does happen


def test_labels_and_classes_match_torchvision_image_folder(constant_root):
    from torchvision.datasets import ImageFolder

    for split in ("train", "val"):
        reference = ImageFolder(constant_root / split)
        _, val, classes = build_dali_loaders(
            _cfg(constant_root, val_dir=split), _env(), constant_root, batch_size=3, seed=0, channels_last=True
        )
        assert classes == reference.classes
        got = [
            (k, label) for images, labels in val for k, label in zip(identities(images), labels.tolist(), strict=True)
        ]
        assert got == [(k, target) for k, target in enumerate(reference.targets)]


def test_val_two_ranks_cover_an_odd_set_exactly_once(constant_root):
    parts = []
    for rank in range(2):
        _, val, _ = build_dali_loaders(
            _cfg(constant_root), _env(rank, 2), constant_root, batch_size=4, seed=0, channels_last=True
        )
        seen = [k for images, _ in val for k in identities(images)]
        assert len(seen) == val.num_samples
        parts.append(seen)
    assert [len(p) for p in parts] == [6, 5]
    assert sorted(parts[0] + parts[1]) == list(range(11))


@pytest.mark.parametrize("augment", ["rrc", "pad-crop"])
def test_two_ranks_hold_bitwise_the_pixels_of_the_one_rank_global_batches(noise_root, augment):
    cfg = _cfg(noise_root, augment=augment, image_size=16)
    one, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=8, seed=3, channels_last=False)
    ranks = [
        build_dali_loaders(cfg, _env(rank, 2), noise_root, batch_size=4, seed=3, channels_last=False)[0]
        for rank in range(2)
    ]
    for epoch in (0, 1):
        global_batches = list(one.epoch(epoch))
        shards = [list(train.epoch(epoch)) for train in ranks]
        for step, (images, labels) in enumerate(global_batches):
            for rank in range(2):  # round-robin dealing: rank r holds samples r, r + 2, … of the global batch
                assert torch.equal(shards[rank][step][0], images[rank::2]), (epoch, step, rank)
                assert torch.equal(shards[rank][step][1], labels[rank::2])


@pytest.mark.parametrize("augment", ["rrc", "pad-crop"])
def test_mid_epoch_resume_gives_bitwise_the_uninterrupted_batches(noise_root, augment):
    cfg = _cfg(noise_root, augment=augment, image_size=16)
    train, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=4, seed=2, channels_last=True)
    full = list(train.epoch(3))
    fresh, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=4, seed=2, channels_last=True)
    for start_step in (1, 3, 4):
        resumed = list(fresh.epoch(3, start_step=start_step))
        assert len(resumed) == 5 - start_step
        for (x, y), (a, b) in zip(resumed, full[start_step:], strict=True):
            assert torch.equal(x, a) and torch.equal(y, b), start_step


def _by_sample(train, epoch: int) -> dict[int, torch.Tensor]:
    """Dataset index → augmented image of `epoch` (the sampler gives the order the batches hold)."""
    train.sampler.set_epoch(epoch)
    order = [index for _, index in train.sampler]
    images = torch.cat([x for x, _ in train.epoch(epoch)])
    return dict(zip(order, images, strict=True))


def test_crops_change_with_epoch_and_seed_but_not_with_the_batch_size(noise_root):
    cfg = _cfg(noise_root, image_size=16)
    train, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=4, seed=0, channels_last=False)
    other_seed, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=4, seed=1, channels_last=False)
    bigger, _, _ = build_dali_loaders(cfg, _env(), noise_root, batch_size=5, seed=0, channels_last=False)
    epoch0, epoch1, seed1 = _by_sample(train, 0), _by_sample(train, 1), _by_sample(other_seed, 0)
    bigger0 = _by_sample(bigger, 0)
    shared = sorted(set(epoch0) & set(epoch1))
    assert len(shared) >= 15 and all(not torch.equal(epoch0[i], epoch1[i]) for i in shared)
    shared = sorted(set(epoch0) & set(seed1))
    assert len(shared) >= 15 and all(not torch.equal(epoch0[i], seed1[i]) for i in shared)
    # Another batch size moves samples to other batches and positions; each keeps its pixels.
    shared = sorted(set(epoch0) & set(bigger0))
    assert len(shared) >= 15 and all(torch.equal(epoch0[i], bigger0[i]) for i in shared)


def _reference_rrc(path, u, size: int, scale, ratio, hflip: bool) -> tuple[torch.Tensor, int]:
    """torchvision's RandomResizedCrop.get_params written out in float64 with the draws taken from the uniforms `u`
    (layout: dali_pipelines.RANDOMS), then torchvision's crop + resize, flip and normalization with MEAN/STD: an
    independent reference for the window's position, extent and flip. Also the try taken (RRC_TRIES: the fallback)."""
    import math

    import torchvision.transforms.v2.functional as F

    from fastfit.data.dali_pipelines import CROP_ANCHORS, FLIP, RRC_TRIES, TRIES_FROM

    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    height, width = image.shape[1:]
    anchor_y, anchor_x = (float(v) for v in u[CROP_ANCHORS])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(RRC_TRIES):
        u_area, u_ratio = float(u[TRIES_FROM + 2 * k]), float(u[TRIES_FROM + 2 * k + 1])
        area = height * width * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        crop_w, crop_h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = math.floor(anchor_y * (height - crop_h + 1))  # torch.randint(0, height - h + 1)
            left = math.floor(anchor_x * (width - crop_w + 1))
            break
    else:  # torchvision's fallback: centre crop of the whole image, its aspect clamped into the ratio range
        if width / height < min(ratio):
            crop_w, crop_h = width, round(width / min(ratio))
        elif width / height > max(ratio):
            crop_w, crop_h = round(height * max(ratio)), height
        else:
            crop_w, crop_h = width, height
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        k = RRC_TRIES
    out = F.resized_crop(image, top, left, crop_h, crop_w, [size, size], antialias=True).float() / 255
    if hflip and u[FLIP] < 0.5:
        out = out.flip(-1)
    return (out - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1), k


@pytest.mark.parametrize(
    ("scale", "ratio", "tries_taken"),
    [
        ((0.08, 1.0), (3 / 4, 4 / 3), {0, 1}),  # torchvision's default: a third of the first draws miss here
        ((0.9, 1.0), (0.2, 5.0), {0, 1, 10}),  # few draws fit: later tries, some the centre fallback
        ((0.95, 1.0), (4.0, 5.0), {10}),  # no window fits a 427×640 photo: always the fallback
    ],
)
def test_random_resized_crop_takes_torchvisions_window_for_its_uniforms(photo_root, scale, ratio, tries_taken):
    from fastfit.data.dali_pipelines import RANDOMS
    from fastfit.data.sample_random import sample_uniforms

    cfg = _cfg(photo_root, image_size=48, rrc_scale=list(scale), rrc_ratio=list(ratio))
    train, _, _ = build_dali_loaders(cfg, _env(), photo_root, batch_size=1, seed=7, channels_last=False)
    flips, taken = 0, set()
    for epoch in range(6):
        for index, image in _by_sample(train, epoch).items():
            u = sample_uniforms(7, epoch, [index], RANDOMS)[0]
            flips += bool(u[2] < 0.5)
            expected, k = _reference_rrc(train.samples[index][0], u, 48, scale, ratio, hflip=True)
            taken.add(min(k, 1) if k < 10 else k)  # first try, a later one, or the fallback
            # Same window: the resampling filters differ by ≈0.1 grey level on average here; a window moved by 1%
            # of the image differed by 0.8 to 6, a wrong flip by 20 to 70, when this test was written.
            assert (image - expected).abs().mean() < 0.4 / 255 / min(STD), (epoch, index)
    assert 0 < flips < 12
    assert taken == tries_taken


def test_train_sharding_matches_torchvision_and_one_rank_global_batches(constant_root):
    # 21 images, 2 ranks × batch 4: 2 steps, 16 samples per epoch, the tail dropped.
    one, _, _ = build_dali_loaders(_cfg(constant_root), _env(), constant_root, batch_size=8, seed=3, channels_last=True)
    for epoch in (0, 1):
        global_batches = [identities(images) for images, _ in one.epoch(epoch)]
        ranks = []
        for rank in range(2):
            train, _, _ = build_dali_loaders(
                _cfg(constant_root), _env(rank, 2), constant_root, batch_size=4, seed=3, channels_last=True
            )
            assert train.steps_per_epoch == 2
            ranks.append([identities(images) for images, _ in train.epoch(epoch)])
            sampler = ShardedSampler(21, _env(rank, 2), seed=3, shuffle=True, batch_size=4)
            sampler.set_epoch(epoch)
            assert sum(ranks[-1], []) == [i for _, i in sampler]  # the torchvision backend's order, exactly
        assert set(sum(ranks[0], [])).isdisjoint(sum(ranks[1], []))
        for step in range(2):
            assert sorted(ranks[0][step] + ranks[1][step]) == sorted(global_batches[step])
            assert ranks[0][step] == global_batches[step][0::2] and ranks[1][step] == global_batches[step][1::2]
    assert [identities(x) for x, _ in one.epoch(0)] != [identities(x) for x, _ in one.epoch(1)]


def test_epochs_are_deterministic_and_resume_keeps_the_order(photo_root, constant_root):
    cfg = _cfg(photo_root, image_size=32)
    train, _, _ = build_dali_loaders(cfg, _env(), photo_root, batch_size=2, seed=5, channels_last=True)
    ((first, _),) = list(train.epoch(1))
    ((second, _),) = list(train.epoch(1))
    assert torch.equal(first, second)  # same epoch number, same pixels
    ((other, _),) = list(train.epoch(2))
    assert not torch.equal(first, other)  # another epoch, other crops
    again, _, _ = build_dali_loaders(cfg, _env(), photo_root, batch_size=2, seed=5, channels_last=True)
    assert torch.equal(next(again.epoch(1))[0], first)  # a fresh loader replays it too
    # Mid-epoch resume: the remaining batches hold exactly the samples of the uninterrupted epoch.
    train, _, _ = build_dali_loaders(
        _cfg(constant_root), _env(), constant_root, batch_size=4, seed=2, channels_last=True
    )
    full = [(identities(x), y.tolist()) for x, y in train.epoch(4)]
    assert [(identities(x), y.tolist()) for x, y in train.epoch(4, start_step=3)] == full[3:]
    assert list(train.epoch(4, start_step=5)) == []
    with pytest.raises(DataError, match=r"start_step must be in \[0, 5\] \(steps per epoch\), got -1"):
        next(train.epoch(4, start_step=-1))


def test_val_matches_torchvision_on_real_photos(photo_root):
    for val_resize, size in ((0, 224), (256, 224), (64, 56), (300, 299)):
        cfg = _cfg(photo_root, image_size=size, val_resize=val_resize)
        _, dali_val, _ = build_dali_loaders(cfg, _env(), photo_root, batch_size=2, seed=0, channels_last=True)
        _, tv_val, _ = build_torchvision_loaders(cfg, _env(), photo_root, batch_size=2, seed=0, channels_last=True)
        ((a, la),) = list(dali_val)
        ((b, lb),) = list(tv_val)
        assert torch.equal(la, lb)
        # Same output size and crop offset as torchvision; the resampling filters differ by ≤ 1 grey level here.
        assert (a - b).abs().max() <= 1.01 / 255 / min(STD), (val_resize, size, (a - b).abs().max())


def test_train_without_augmentation_matches_torchvision(photo_root):
    cfg = _cfg(photo_root, image_size=64, augment="none", hflip=False)
    dali_train, _, _ = build_dali_loaders(cfg, _env(), photo_root, batch_size=2, seed=0, channels_last=False)
    tv_train, _, _ = build_torchvision_loaders(cfg, _env(), photo_root, batch_size=2, seed=0, channels_last=False)
    ((a, la),) = list(dali_train.epoch(0))
    ((b, lb),) = list(tv_train.epoch(0))
    assert torch.equal(la, lb)
    # The short side is resized edge to edge here: the filters treat the outermost pixels differently, so the
    # interior is held to 1 grey level and the whole image to a small mean difference.
    inner = (a - b)[..., 2:-2, 2:-2].abs().max()
    assert inner <= 1.01 / 255 / min(STD) and (a - b).abs().mean() < 0.01, (inner, (a - b).abs().mean())


def _encoded(pixels: np.ndarray, mode: str, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_grey_cmyk_palette_and_alpha_images_decode_to_rgb_like_pil(tmp_path):
    y, x = np.mgrid[0:16, 0:16]
    pixels = np.stack([x * 15, y * 15, (x + y) * 7], -1).astype(np.uint8)
    cases = {
        "grey.jpg": ("L", "JPEG"),
        "cmyk.jpg": ("CMYK", "JPEG"),
        "rgb.jpg": ("RGB", "JPEG"),
        "rgb.png": ("RGB", "PNG"),
        "grey.png": ("L", "PNG"),
        "rgba.png": ("RGBA", "PNG"),
        "pal.png": ("P", "PNG"),
    }
    for split in ("train", "val"):
        for name, (mode, fmt) in cases.items():
            (tmp_path / split / name.replace(".", "_")).mkdir(parents=True)
            (tmp_path / split / name.replace(".", "_") / name).write_bytes(_encoded(pixels, mode, fmt))
    _, val, classes = build_dali_loaders(
        _cfg(tmp_path, image_size=16), _env(), tmp_path, batch_size=len(cases), seed=0, channels_last=True
    )
    ((images, labels),) = list(val)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for image, label in zip(images, labels.tolist(), strict=True):
        path = next((tmp_path / "val" / classes[label]).iterdir())
        reference = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
        assert (image - (reference - mean) / std).abs().max() < 1e-5, path.name


def test_file_list_form(constant_root, tmp_path):
    listing = tmp_path / "train.txt"
    files = sorted((constant_root / "train").rglob("*.png"))
    rows = [f"{p.relative_to(constant_root)} {i % 3}" for i, p in enumerate(files)]
    listing.write_text("# path label\n" + "\n".join(rows) + "\n\n")
    val_listing = tmp_path / "val.txt"
    val_listing.write_text("".join(f"{p} 4\n" for p in sorted((constant_root / "val").rglob("*.png"))[:3]))
    assert read_file_list(listing, constant_root)[0] == (str(files[0]), 0)
    train, val, classes = build_dali_loaders(
        _cfg(constant_root),
        _env(),
        constant_root,
        batch_size=4,
        seed=0,
        channels_last=True,
        train_list=listing,
        val_list=val_listing,
    )
    assert classes == ["0", "1", "2", "3", "4"] and train.steps_per_epoch == 5
    for images, labels in train.epoch(0):
        assert [k % 3 for k in identities(images)] == labels.tolist()  # identity k is listing position here
    assert [labels.tolist() for _, labels in val] == [[4, 4, 4]]
    # A list for one split, the folder for the other: class names come from the folders.
    train, val, classes = build_dali_loaders(
        _cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True, train_list=listing
    )
    assert classes == ["10", "9", "B", "a"] and val.num_samples == 11
    with pytest.raises(DataError, match="a file list has label 4 but .* has only 4 class folders"):
        build_dali_loaders(
            _cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True, val_list=val_listing
        )

    bad = tmp_path / "bad.txt"
    bad.write_text("a/000.png 1\na/001.png one\n")
    with pytest.raises(DataError, match=r"bad.txt line 2: expected 'relative/path label' .*got 'a/001.png one'"):
        read_file_list(bad, constant_root)
    with pytest.raises(DataError, match="file list .*missing.txt does not exist"):
        read_file_list(tmp_path / "missing.txt", constant_root)


def test_missing_dali_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(
        DataError,
        match=r"needs NVIDIA DALI, which is not installed: pip install fastfit\[dali\] "
        r"\(nvidia-dali-cuda130\), or set data.backend=torchvision",
    ):
        require_dali()


def test_too_small_a_train_set_is_named(constant_root):
    with pytest.raises(DataError, match="the training set has 21 images, fewer than one global batch of 22"):
        build_dali_loaders(_cfg(constant_root), _env(0, 2), constant_root, batch_size=11, seed=0, channels_last=True)


BAD_FILES = {"empty": b"", "text": b"not an image at all\n" * 40, "truncated": None}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_stops_the_build_naming_it(constant_root, kind):
    bad = constant_root / "train" / "B" / "002_bad.jpg"
    bad.write_bytes(
        BAD_FILES[kind] if BAD_FILES[kind] is not None else (SKLEARN_IMAGES / "china.jpg").read_bytes()[:20_000]
    )
    with pytest.raises(DataError, match=f"cannot decode image {bad}: .*; remove the file or set data.skip_bad=true"):
        build_dali_loaders(_cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True)


def test_skip_bad_substitutes_train_and_drops_val_like_torchvision(constant_root):
    bad_train = constant_root / "train" / "B" / "002_bad.png"  # listed between B/002.png and B/003.png
    bad_train.write_bytes(b"not a png\n" * 30)
    bad_val = constant_root / "val" / "9" / "000_bad.png"
    bad_val.write_bytes(b"")
    cfg = _cfg(constant_root, skip_bad=True)
    train, val, _ = build_dali_loaders(cfg, _env(), constant_root, batch_size=4, seed=1, channels_last=True)
    tv_train, tv_val, _ = build_torchvision_loaders(
        cfg, _env(), constant_root, batch_size=4, seed=1, channels_last=True
    )
    assert train.bad_files == [str(bad_train)] and val.bad_files == [str(bad_val)]
    for epoch in range(3):
        dali_ids = [identities(x) for x, _ in train.epoch(epoch)]
        assert dali_ids == [identities(x) for x, _ in tv_train.epoch(epoch)]
    assert sorted(k for x, _ in val for k in identities(x)) == list(range(11)) and val.num_samples == 11
    assert sorted(k for x, _ in tv_val for k in identities(x)) == list(range(11))


def test_decode_failure_at_run_time_is_named_or_skipped(constant_root, monkeypatch):
    # A file that passes the header check but fails to decode (here: the check is bypassed; a truncated JPEG is
    # one DALI reports cleanly). The loader must name it, or skip it and go on from the failing batch.
    bad = constant_root / "val" / "B" / "000_cut.jpg"
    bad.write_bytes((SKLEARN_IMAGES / "china.jpg").read_bytes()[:20_000])
    monkeypatch.setattr("fastfit.data.dali_backend.scan_bad_files", lambda paths, env: {})
    _, val, _ = build_dali_loaders(_cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True)
    with pytest.raises(DataError, match=f"cannot decode image {bad}: "):
        list(val)
    _, val, _ = build_dali_loaders(
        _cfg(constant_root, skip_bad=True), _env(), constant_root, batch_size=4, seed=0, channels_last=True
    )
    assert val.num_samples == 12
    seen = [k for x, _ in val for k in identities(x)]
    assert sorted(seen) == list(range(11)) and val.bad_files == [str(bad)] and val.num_samples == 11


def test_train_decode_failure_at_run_time_substitutes_like_torchvision(constant_root, monkeypatch):
    # Full decode ("none"): a random-resized-crop ROI decode may stop before the missing part and not notice.
    bad = constant_root / "train" / "B" / "002_cut.jpg"  # listed between B/002.png and B/003.png
    bad.write_bytes((SKLEARN_IMAGES / "china.jpg").read_bytes()[:20_000])
    monkeypatch.setattr("fastfit.data.dali_backend.scan_bad_files", lambda paths, env: {})
    # 22 files in batches of 2: every file is in every epoch (no tail dropped).
    train, _, _ = build_dali_loaders(
        _cfg(constant_root, augment="none"), _env(), constant_root, batch_size=2, seed=1, channels_last=True
    )
    with pytest.raises(DataError, match=f"cannot decode image {bad}: "):
        list(train.epoch(0))
    cfg = _cfg(constant_root, skip_bad=True, augment="none")
    train, _, _ = build_dali_loaders(cfg, _env(), constant_root, batch_size=2, seed=1, channels_last=True)
    tv_train, _, _ = build_torchvision_loaders(cfg, _env(), constant_root, batch_size=2, seed=1, channels_last=True)
    for epoch in range(2):
        assert [identities(x) for x, _ in train.epoch(epoch)] == [identities(x) for x, _ in tv_train.epoch(epoch)]
    assert train.bad_files == tv_train.bad_files == [str(bad)]


def test_failing_batch_is_searched_on_the_host_when_dali_does_not_name_the_file(constant_root):
    train, _, _ = build_dali_loaders(
        _cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True
    )
    broken = train.samples[6][0]
    Path(broken).write_bytes(b"")
    found = train._find_bad(RuntimeError("nvImageCodec failure: '#4'"), list(range(21)), batch=1)
    assert found == {6: "empty file (0 bytes)"}


def test_dali_reason_is_the_line_after_encountered():
    message = (
        "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nwhich was used "
        '...:\n  File "x.py", line 3\n\nencountered:\n\nFailed to decode sample #5 : /d/a.jpg\n'
        "Current pipeline object is no longer valid."
    )
    assert dali_reason(RuntimeError(message)) == "Failed to decode sample #5 : /d/a.jpg"
    assert dali_reason(RuntimeError("plain")) == "plain"


def test_scripts_run_on_the_cpu(tmp_path, constant_root):
    """bench_loader.py and gpu_check_dali.py --dry exercise their code paths on the cpu backends."""
    import json
    import runpy

    scripts = Path(__file__).resolve().parent.parent / "scripts"
    argv = sys.argv
    try:
        sys.argv = [
            "bench_loader.py",
            "--root",
            str(constant_root),
            "--batch",
            "4",
            "--image-size",
            "8",
            "--warmup",
            "1",
            "--steps",
            "7",
            "--threads",
            "1,2",
            "--workers",
            "0",
            "--out",
            str(tmp_path / "bench.json"),
        ]
        runpy.run_path(str(scripts / "bench_loader.py"), run_name="__main__")
        bench = json.loads((tmp_path / "bench.json").read_text())
        providers = [(r["backend"], r["threads"], r["workers"]) for r in bench["results"]]
        assert providers == [("dali-cpu", 1, None), ("dali-cpu", 2, None), ("torchvision", None, 0)]
        # 7 timed steps after 1 warm-up run past the 5-step epoch into the next one
        assert all(r["img_per_s"] > 0 and r["images"] == 28 for r in bench["results"])

        sys.argv = [
            "gpu_check_dali.py",
            "--dry",
            "--root",
            str(constant_root),
            "--out",
            str(tmp_path / "gpu"),
            "--threads",
            "2",
            "--warmup",
            "1",
            "--steps",
            "2",
        ]
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(scripts / "gpu_check_dali.py"), run_name="__main__")
        assert exit_info.value.code == 0
        check = json.loads((tmp_path / "gpu" / "gpu_check_dali.json").read_text())
        assert check["dry"] is True and check["val_parity"]["max_abs_diff"] == 0.0
        assert check["val_parity"]["samples"] == 11 and check["train_contract"]["ok"] is True
        assert check["throughput"] and all(r["img_per_s"] > 0 for r in check["throughput"])
    finally:
        sys.argv = argv


def test_config_file_lists_reach_dali_and_torchvision_refuses_them(constant_root, tmp_path):
    from fastfit.data import build_loaders

    listing = tmp_path / "train.txt"
    listing.write_text(
        "".join(
            f"{p.relative_to(constant_root)} {i % 2}\n"
            for i, p in enumerate(sorted((constant_root / "train").rglob("*.png")))
        )
    )
    bundle = build_loaders(
        _cfg(constant_root, backend="dali", train_list=str(listing)), _env(), batch_size=4, seed=0, channels_last=True
    )
    assert bundle.backend == "dali" and bundle.train.steps_per_epoch == 5
    assert {label for _, labels in bundle.train.epoch(0) for label in labels.tolist()} == {0, 1}
    with pytest.raises(DataError, match=r"data.train_list / data.val_list are read by the DALI backend only"):
        build_loaders(
            _cfg(constant_root, backend="torchvision", train_list=str(listing)),
            _env(),
            batch_size=4,
            seed=0,
            channels_last=True,
        )


def test_a_file_name_that_is_not_utf8_is_named_before_the_file_list_is_written(constant_root):
    first = sorted((constant_root / "train" / "a").iterdir())[0]
    raw = os.fsencode(first.parent) + b"/caf\xe9.png"  # Latin-1 "café": not UTF-8
    os.rename(os.fsencode(first), raw)
    with pytest.raises(DataError, match=r"file name b'.*/caf\\xe9.png' is not valid UTF-8.*data.backend=torchvision"):
        build_dali_loaders(_cfg(constant_root), _env(), constant_root, batch_size=4, seed=0, channels_last=True)


def test_16_bit_pngs_are_scaled_to_8_bits_like_the_torchvision_backend(tmp_path):
    """DALI's decoder scales 16-bit grey by 1/257 (rounded), as fastfit's torchvision backend does; PIL's own
    conversion would clip 40000 to 255."""
    values = {"low": 1000, "mid": 40000, "top": 65535}  # → 4, 156, 255
    for split in ("train", "val"):
        for name, value in values.items():
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.full((24, 24), value, np.uint16)).save(tmp_path / split / name / "deep.png")
    cfg = _cfg(tmp_path, image_size=16, val_resize=20, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    _, val, classes = build_dali_loaders(cfg, _env(), tmp_path, batch_size=3, seed=0, channels_last=True)
    ((images, labels),) = list(val)
    for image, label in zip(images, labels.tolist(), strict=True):
        expected = round(values[classes[label]] / 257) / 255
        assert torch.allclose(image, torch.full_like(image, expected), atol=1e-6), (classes[label], image.max())
