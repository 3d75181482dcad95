"""fastfit.data.synth and `fastfit data synth`: ImageNet-like JPEG folders, deterministic by seed."""

import io

import pytest
from PIL import Image

from fastfit.cli import build_parser
from fastfit.data.synth import SHAPES, class_name, synthetic_jpeg, write_synthetic_imagenet
from fastfit.errors import DataError


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.JPEG"))


def test_layout_counts_shapes_and_realistic_sizes(tmp_path):
    summary = write_synthetic_imagenet(tmp_path, n_train=10, n_classes=3, n_val=4, seed=1, workers=1)
    counts = {
        split: [len(list((tmp_path / split / class_name(c)).iterdir())) for c in range(3)] for split in ("train", "val")
    }
    assert counts == {"train": [4, 3, 3], "val": [2, 1, 1]}
    assert class_name(2) == "n00000002"
    sizes = []
    for path in tmp_path.rglob("*.JPEG"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size in [shape for shape, _ in SHAPES]
            image.load()
        sizes.append(path.stat().st_size)
    assert summary.total_bytes == sum(sizes) and (summary.train_files, summary.val_files) == (10, 4)
    # ImageNet's JPEGs average ~110 KB at ~400×350; these aim at ~80 KB at 500×375 (photo-like detail).
    assert 60e3 < summary.total_bytes / len(sizes) < 110e3, summary.mean_kb
    assert min(sizes) > 40e3


def test_bytes_depend_only_on_seed_split_class_index(tmp_path, monkeypatch):
    one = synthetic_jpeg(3, "train", 1, 5, n_classes=4)
    assert synthetic_jpeg(3, "train", 1, 5, n_classes=4) == one
    assert synthetic_jpeg(4, "train", 1, 5, n_classes=4) != one
    assert synthetic_jpeg(3, "val", 1, 5, n_classes=4) != one
    assert Image.open(io.BytesIO(one)).size in [shape for shape, _ in SHAPES]
    write_synthetic_imagenet(tmp_path / "serial", n_train=4, n_classes=2, n_val=2, seed=3, workers=1)
    monkeypatch.setattr("fastfit.data.synth._POOL_MIN", 0)
    write_synthetic_imagenet(tmp_path / "pool", n_train=4, n_classes=2, n_val=2, seed=3, workers=2)
    assert _files(tmp_path / "serial") == _files(tmp_path / "pool")
    for rel in _files(tmp_path / "serial"):
        assert (tmp_path / "serial" / rel).read_bytes() == (tmp_path / "pool" / rel).read_bytes()


def test_bad_counts_are_refused_with_the_values(tmp_path):
    with pytest.raises(DataError, match="needs classes >= 1 and non-negative image counts, got classes=0, n=5, val=0"):
        write_synthetic_imagenet(tmp_path, n_train=5, n_classes=0)


def _parser():
    return build_parser()


def test_cli_synth(tmp_path, capsys):
    args = _parser().parse_args(
        ["data", "synth", str(tmp_path), "--n", "3", "--classes", "3", "--val", "0", "--seed", "2", "--workers", "1"]
    )
    assert args.func(args) == 0
    assert "wrote 3 train and 0 val JPEGs in 3 classes" in capsys.readouterr().out
    assert len(_files(tmp_path)) == 3
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "synth", str(tmp_path), "--n", "-1"])
    assert "expected an integer >= 0, got -1" in capsys.readouterr().err
