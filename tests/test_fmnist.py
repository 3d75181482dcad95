"""Fashion-MNIST from the Debian package, exported once to a JPEG ImageFolder whose labels are the dataset's own."""

import gzip

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

from fastfit.data.fmnist import CLASSES, ensure_fashion_mnist_jpegs, load_split
from fastfit.errors import DataError


def test_export_keeps_labels_pixels_and_counts(tmp_path):
    images, labels = load_split("val")
    assert images.shape == (10_000, 28, 28) and labels.max() == 9
    root = ensure_fashion_mnist_jpegs(tmp_path / "cache")
    folder = datasets.ImageFolder(root / "val")
    assert folder.classes == [f"{i}-{name}" for i, name in enumerate(CLASSES)]
    assert len(folder) == 10_000 and np.bincount(folder.targets).tolist() == np.bincount(labels).tolist()
    for path, target in folder.samples[::997]:
        index = int(path.rsplit("/", 1)[1].split(".")[0])
        assert target == labels[index]
        decoded = np.asarray(Image.open(path).convert("L"), dtype=np.int16)
        assert np.abs(decoded - images[index]).mean() < 3.0  # JPEG quality 95 on 28×28 greys
    stamp = (root / "COMPLETE").stat().st_mtime_ns
    assert ensure_fashion_mnist_jpegs(tmp_path / "cache") == root and (root / "COMPLETE").stat().st_mtime_ns == stamp


def test_missing_package_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFIT_FMNIST_DIR", str(tmp_path))
    with pytest.raises(
        DataError, match=r"Fashion-MNIST files are missing from .*apt-get install dataset-fashion-mnist"
    ):
        ensure_fashion_mnist_jpegs(tmp_path / "cache")
    assert not (tmp_path / "cache").exists(), "a failed export must not leave a cache behind"


def test_corrupt_idx_file_is_named(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as handle:
            handle.write(b"\x00\x00\x09\x99" + b"\x00" * 8)
    monkeypatch.setenv("FASTFIT_FMNIST_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: not an IDX file .*reinstall the Debian package"):
        load_split("val")
