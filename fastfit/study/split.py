"""The study's data: a validation split carved from Fashion-MNIST's 60k training images, disjoint from the test set.

    root/train/<class>/*.jpg   the training images minus the validation split (50,000)
    root/val/<class>/*.jpg     the validation split (1,000 per class, a fixed seed): every hyperparameter is chosen here
    root/test/<class>/*.jpg    the 10,000 official test images: only reported, never used to choose anything
    root/split.json            which training-set indices went to val

Files are hard links to the JPEG export (copies where the file system refuses links), so the study costs no
second export. The split is written once, atomically, and checked on every later use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fastfit.data.fmnist import CLASSES, class_folder, ensure_fashion_mnist_jpegs
from fastfit.errors import DataError

VAL_PER_CLASS = 1000
SPLIT_SEED = 20150101  # fixed for the study: every run and every seed sees the same validation images
_VERSION = "1"


def validation_indices(labels: np.ndarray, per_class: int = VAL_PER_CLASS, seed: int = SPLIT_SEED) -> list[int]:
    """A class-balanced, seeded choice of `per_class` training indices per class (sorted)."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in range(len(CLASSES)):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise DataError(f"class {CLASSES[label]!r} has {len(members)} training images, fewer than {per_class}")
        chosen += rng.choice(members, size=per_class, replace=False).tolist()
    return sorted(int(i) for i in chosen)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy is as good
        shutil.copyfile(source, target)


def ensure_study_split(root: Path, export: Path | None = None, per_class: int = VAL_PER_CLASS) -> Path:
    """The study's train/val/test folders under `root`, made once from the Fashion-MNIST JPEG export (`export`:
    its folder, default the shared cache)."""
    root = Path(root)
    marker = root / "split.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("version") == _VERSION and recorded.get("val_per_class") == per_class:
            return root
    export = ensure_fashion_mnist_jpegs(export)
    files = {int(p.stem): p for p in (export / "train").glob("*/*.jpg")}
    labels = np.array([int(files[i].parent.name.split("-", 1)[0]) for i in range(len(files))])
    val = set(validation_indices(labels, per_class))
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".study-split-", dir=root.parent))
    try:
        for split in ("train", "val", "test"):
            for label in range(len(CLASSES)):
                (staging / split / class_folder(label)).mkdir(parents=True)
        for index, path in files.items():
            _link(path, staging / ("val" if index in val else "train") / path.parent.name / path.name)
        for path in (export / "val").glob("*/*.jpg"):
            _link(path, staging / "test" / path.parent.name / path.name)
        record = {
            "version": _VERSION,
            "seed": SPLIT_SEED,
            "val_per_class": per_class,
            "val_indices": sorted(val),
            "source": str(export),
        }
        (staging / "split.json").write_text(json.dumps(record) + "\n")
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
