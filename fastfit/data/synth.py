"""Synthetic ImageNet-like JPEG folders, for loader benchmarks and tests where the real dataset is absent.

    write_synthetic_imagenet("/tmp/synth", n_train=10_000, n_classes=100, n_val=1_000, seed=0)

Images are about ImageNet's typical shape (500×375, some portrait 375×500 or 500×333) and size (≈80 KB at
quality 90): a class colour, smooth gradients, random colour fields at three scales and fine grain, so the JPEG
entropy coder sees detail at every frequency, as in photos (flat images compress to a few KB and would flatter
every decoder). Layout: DIR/train/<class>/<n>.JPEG and DIR/val/<class>/<n>.JPEG with ImageNet-style class names
(n00000000, n00000001, …). The bytes depend only on (seed, split, class, index): any worker count gives the
same files. Files are written on a process pool (generation and encoding take ≈20 ms per image on one core).
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fastfit.errors import DataError

SHAPES = [((500, 375), 0.70), ((375, 500), 0.15), ((500, 333), 0.15)]  # (width, height), share
QUALITY = 90
_GRAIN = 12.0  # σ of the per-pixel grain in 8-bit levels; sets the file size (12 → ≈80 KB at 500×375, q 90)
_SPLITS = {"train": 0, "val": 1}
_POOL_MIN = 64  # images; fewer are written in-process (starting a pool costs more)


@dataclass
class SynthSummary:
    root: Path
    train_files: int
    val_files: int
    total_bytes: int

    @property
    def mean_kb(self) -> float:
        return self.total_bytes / max(1, self.train_files + self.val_files) / 1e3


def class_name(index: int) -> str:
    return f"n{index:08d}"


def synthetic_jpeg(seed: int, split: str, label: int, index: int, n_classes: int, quality: int = QUALITY) -> bytes:
    """The JPEG bytes of one image, a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLITS[split], label, index])
    shapes, shares = zip(*SHAPES, strict=True)
    width, height = shapes[rng.choice(len(shapes), p=shares)]

    def colour_field(grid_h: int, grid_w: int, amplitude: float) -> np.ndarray:
        grid = (rng.standard_normal((grid_h, grid_w, 3), dtype=np.float32) * 40 + 128).clip(0, 255).astype(np.uint8)
        smooth = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
        return (np.asarray(smooth, dtype=np.float32) - 128) * amplitude

    phase = 2 * np.pi * label / n_classes
    hue = np.array([np.sin(phase), np.sin(phase + 2.1), np.sin(phase + 4.2)], dtype=np.float32) * 60 + 128
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    pixels = (
        hue
        + 40 * x
        + 30 * y
        + colour_field(4, 5, 1.0)
        + colour_field(24, 32, 0.6)
        + colour_field(height // 6, width // 6, 0.5)
        + rng.standard_normal((height, width, 3), dtype=np.float32) * _GRAIN
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _write_one(job: tuple) -> int:
    path, seed, split, label, index, n_classes, quality = job
    data = synthetic_jpeg(seed, split, label, index, n_classes, quality)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never a half-written JPEG, even if interrupted
    return len(data)


def _per_class(total: int, n_classes: int) -> list[int]:
    return [total // n_classes + (c < total % n_classes) for c in range(n_classes)]


def write_synthetic_imagenet(
    root: str | os.PathLike,
    n_train: int,
    n_classes: int = 10,
    n_val: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    quality: int = QUALITY,
) -> SynthSummary:
    """Write `n_train` train and `n_val` (default n_train // 10) val JPEGs in `n_classes` class folders."""
    n_val = n_train // 10 if n_val is None else n_val
    if n_classes < 1 or n_train < 0 or n_val < 0:
        raise DataError(
            f"synthetic data needs classes >= 1 and non-negative image counts, got classes={n_classes}, "
            f"n={n_train}, val={n_val}"
        )
    root = Path(root).expanduser()
    jobs = []
    for split, total in (("train", n_train), ("val", n_val)):
        for label, count in enumerate(_per_class(total, n_classes)):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [
                (folder / f"{split}_{index:08d}.JPEG", seed, split, label, index, n_classes, quality)
                for index in range(count)
            ]
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers <= 1 or len(jobs) < _POOL_MIN:
        sizes = [_write_one(job) for job in jobs]
    else:
        # fork: workers start at once with numpy and PIL loaded (spawn would re-import fastfit and torch in each)
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            sizes = list(pool.map(_write_one, jobs, chunksize=16))
    return SynthSummary(root=root, train_files=n_train, val_files=n_val, total_bytes=sum(sizes))
