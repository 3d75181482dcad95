"""Fashion-MNIST (Debian package `dataset-fashion-mnist`) exported once to a JPEG ImageFolder cache, so the demo
reads images through exactly the path ImageNet uses (decode → crop → normalize).

Class folders are named `0-t-shirt_top` … `9-ankle_boot`: sorted, they give the dataset's own label order.
The images stay single-channel JPEGs (as the originals are grey); every decoder turns them into RGB.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fastfit.errors import DataError

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_FORMAT_VERSION = "1"


def source_dir() -> Path:
    return Path(os.environ.get("FASTFIT_FMNIST_DIR", PACKAGE_DIR))


def default_cache_dir() -> Path:
    base = Path(os.environ.get("FASTFIT_CACHE", Path.home() / ".cache" / "fastfit"))
    return base / "fashion-mnist-jpeg"


def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        header = handle.read(8)
        got_magic, count = struct.unpack(">II", header)
        if got_magic != magic:
            raise DataError(
                f"{path}: not an IDX file (magic {got_magic:#x}, expected {magic:#x}); reinstall the "
                "Debian package dataset-fashion-mnist"
            )
        if magic == 0x803:
            rows, cols = struct.unpack(">II", handle.read(8))
            return np.frombuffer(handle.read(), dtype=np.uint8).reshape(count, rows, cols)
        return np.frombuffer(handle.read(), dtype=np.uint8)


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels uint8 N) from the Debian package files."""
    images_name, labels_name, expected = SPLITS[split]
    folder = source_dir()
    images_path, labels_path = folder / images_name, folder / labels_name
    if not images_path.is_file() or not labels_path.is_file():
        raise DataError(
            f"Fashion-MNIST files are missing from {folder}; install the Debian package: "
            "sudo apt-get install dataset-fashion-mnist (or set FASTFIT_FMNIST_DIR to a folder with the "
            "four *-ubyte.gz files)"
        )
    images, labels = _read_idx(images_path, 0x803), _read_idx(labels_path, 0x801)
    if len(images) != expected or len(labels) != expected:
        raise DataError(
            f"{folder}: expected {expected} {split} images and labels, found {len(images)} and {len(labels)}"
        )
    return images, labels


def class_folder(label: int) -> str:
    return f"{label}-{CLASSES[label]}"


def ensure_fashion_mnist_jpegs(cache_dir: Path | None = None, quality: int = 95) -> Path:
    """The JPEG ImageFolder (train/, val/); exported on first use, atomically (a half-written cache never counts)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    marker = cache_dir / "COMPLETE"
    if marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION:
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fmnist-", dir=cache_dir.parent))
    try:
        for split in SPLITS:
            images, labels = load_split(split)
            for label in range(len(CLASSES)):
                (staging / split / class_folder(label)).mkdir(parents=True)
            for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
                Image.fromarray(pixels, mode="L").save(
                    staging / split / class_folder(int(label)) / f"{index:05d}.jpg", quality=quality
                )
        (staging / "COMPLETE").write_text(_FORMAT_VERSION + "\n")
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(staging, cache_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cache_dir
