"""fastfit.data.check and `fastfit data check`: which files are bad, why, and where."""

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastfit.cli import main
from fastfit.data.check import check_dataset, check_files, check_image_file, dataset_layout, format_report
from fastfit.errors import DataError


def _jpeg(mode: str = "RGB", size=(40, 30)) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _png_with_corrupt_pixels() -> bytes:
    """A PNG whose header, IEND and chunk CRCs are all valid but whose compressed pixel data is not zlib."""
    data = bytearray(_png())
    start = data.index(b"IDAT") + 4
    length = int.from_bytes(data[start - 8 : start - 4], "big")
    data[start : start + length] = bytes(length)  # zeros: an invalid zlib stream
    data[start + length : start + length + 4] = zlib.crc32(bytes(data[start - 4 : start + length])).to_bytes(4, "big")
    return bytes(data)


BAD_CASES = {
    "empty.jpg": (b"", "empty file (0 bytes)"),
    "text.jpg": (b"hello world\n" * 50, "not an image"),
    "random.png": (bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8)), "not an image"),
    "truncated.jpg": (_jpeg()[:-300], "truncated JPEG (no end-of-image marker)"),
    "truncated.png": (_png()[:-20], "truncated PNG (no IEND chunk)"),
    "gif.jpg": (b"GIF89a" + bytes(200), "GIF image: DALI cannot decode GIF"),
    "header.jpg": (_jpeg()[:4] + bytes(300) + _jpeg()[304:], "bad header"),
}


@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_each_kind_of_bad_file_is_found_with_its_reason(tmp_path, name):
    data, reason = BAD_CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert reason in (check_image_file(path) or ""), check_image_file(path)
    assert check_image_file(path, decode=True) is not None


@pytest.mark.parametrize("data", [_jpeg(), _jpeg("L"), _jpeg("CMYK"), _png()], ids=["rgb", "grey", "cmyk", "png"])
def test_good_images_pass_both_checks(tmp_path, data):
    path = tmp_path / "good.img"
    path.write_bytes(data)
    assert check_image_file(path) is None and check_image_file(path, decode=True) is None


def test_corrupt_pixel_data_needs_the_full_decode(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(_png_with_corrupt_pixels())
    assert check_image_file(path) is None  # headers and end marker are fine
    assert check_image_file(path, decode=True).startswith("corrupt:")


def test_missing_file_is_unreadable(tmp_path):
    assert check_image_file(tmp_path / "nope.jpg").startswith("unreadable:")


def test_check_files_keeps_order_on_threads_and_processes(tmp_path, monkeypatch):
    good, bad = tmp_path / "g.jpg", tmp_path / "b.jpg"
    good.write_bytes(_jpeg())
    bad.write_bytes(b"")
    paths = [good, bad, good] * 30
    expected = [None, "empty file (0 bytes)", None] * 30
    assert check_files(paths) == expected
    monkeypatch.setattr("fastfit.data.check._PROCESS_THRESHOLD", 10)
    assert check_files(paths, workers=2) == expected


def _dataset(root: Path) -> dict[str, Path]:
    """train/{cat,dog}, val/{cat,dog} with a few good JPEGs, two bad files and one non-image file."""
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                (root / split / name / f"{i}.jpg").write_bytes(_jpeg())
    bad = {
        "train/dog/broken.jpg": root / "train" / "dog" / "broken.jpg",
        "val/cat/empty.png": root / "val" / "cat" / "empty.png",
    }
    bad["train/dog/broken.jpg"].write_bytes(_jpeg()[:-100])
    bad["val/cat/empty.png"].write_bytes(b"")
    (root / "train" / "cat" / "notes.txt").write_text("not listed by ImageFolder")
    return bad


def test_dataset_scan_lists_bad_files_with_counts_per_class(tmp_path):
    bad = _dataset(tmp_path)
    report = check_dataset(tmp_path)
    assert report.checked == 14 and report.ignored == 1
    assert {b.path for b in report.bad} == {str(p) for p in bad.values()}
    counts = {split: {name: (c.files, c.bad) for name, c in per.items()} for split, per in report.classes.items()}
    assert counts == {"train": {"cat": (3, 0), "dog": (4, 1)}, "val": {"cat": (4, 1), "dog": (3, 0)}}
    text = format_report(report)
    assert "14 images checked (headers), 2 bad, 1 non-image files ignored" in text
    assert f"{bad['train/dog/broken.jpg']}: truncated JPEG" in text and "train/dog 1/4" in text
    # A plain ImageFolder (no split level) works the same.
    single = check_dataset(tmp_path / "train", decode=True)
    assert list(single.classes) == [""] and [b.path for b in single.bad] == [str(bad["train/dog/broken.jpg"])]


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=f"dataset folder {tmp_path / 'missing'} does not exist"):
        dataset_layout(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(_jpeg())
    with pytest.raises(DataError, match="has no subfolders; expected <class>/<images>"):
        dataset_layout(tmp_path / "flat")


def _run(argv: list[str]) -> int:
    return main(argv)


def test_cli_check_exit_codes_and_json(tmp_path, capsys):
    root = tmp_path / "data"
    bad = _dataset(root)
    report_path = tmp_path / "out" / "report.json"
    assert _run(["data", "check", str(root), "--json", str(report_path)]) == 1
    payload = json.loads(report_path.read_text())
    assert payload["bad_count"] == 2 and payload["checked"] == 14
    assert {b["path"] for b in payload["bad"]} == {str(p) for p in bad.values()}
    assert payload["classes"]["val"]["cat"] == {"files": 4, "bad": 1}
    for path in bad.values():
        path.unlink()
    assert _run(["data", "check", str(root), "--decode"]) == 0
    assert "12 images checked (full decode), 0 bad" in capsys.readouterr().out
    assert _run(["data", "check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _class_folders(root: Path, classes: dict[str, int]) -> None:
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(_png())


def test_a_directory_symlink_loop_is_reported_and_lists_each_image_once(tmp_path):
    from fastfit.data.samples import image_folder

    root = tmp_path / "ds"
    _class_folders(root / "train", {"a": 2, "b": 3})
    (root / "train" / "a" / "loop").symlink_to(root / "train" / "a", target_is_directory=True)
    report = check_dataset(root / "train")
    assert [(b.path, b.reason.split(":")[0]) for b in report.bad] == [
        (str(root / "train" / "a" / "loop"), "directory symlink loop")
    ]
    assert report.checked == 5
    # training lists the real images of class a once (os.walk following links would list them ~40 times)
    listed = image_folder(root, "train").samples
    assert sorted(listed) == sorted(
        [(str(root / "train" / "a" / f"{i}.png"), 0) for i in range(2)]
        + [(str(root / "train" / "b" / f"{i}.png"), 1) for i in range(3)]
    )


def test_files_and_folders_reached_twice_are_reported(tmp_path):
    root = tmp_path / "ds"
    _class_folders(root, {"a": 2, "b": 1})
    (root / "b" / "copy.png").symlink_to(root / "a" / "0.png")
    (root / "b" / "more").symlink_to(root / "a", target_is_directory=True)
    reasons = {b.path: b.reason for b in check_dataset(root).bad}
    assert reasons == {
        str(root / "b" / "copy.png"): f"file reached twice (a symlink or hard link to {root / 'a' / '0.png'})",
        str(root / "b" / "more"): f"directory reached twice through symlinks: the same folder as {root / 'a'}",
    }


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_an_unreadable_class_folder_is_reported_and_exits_1(tmp_path, capsys):
    root = tmp_path / "ds"
    _class_folders(root, {"a": 2, "b": 1})
    (root / "b").chmod(0)
    try:
        assert main(["data", "check", str(root)]) == 1
        assert f"{root / 'b'}: unreadable folder: Permission denied" in capsys.readouterr().out
    finally:
        (root / "b").chmod(0o755)


def _png16(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")  # mode I;16: a 16-bit grayscale PNG
    return buffer.getvalue()


def test_small_and_high_bit_depth_images_are_reported_and_exit_1(tmp_path, capsys):
    root = tmp_path / "ds"
    _class_folders(root, {"a": 1, "b": 1})  # 40×30 images
    (root / "a" / "deep.png").write_bytes(_png16(np.full((40, 40), 40000)))
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'a' / 'deep.png'}: high bit depth (16-bit PNG)" in out and "1 bad" in out, out
    assert main(["data", "check", str(root), "--image-size", "32"]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'a' / '0.png'}: smaller than the crop: 40×30, the crop is 32×32" in out, out
    assert f"{root / 'b' / '0.png'}: smaller than the crop" in out and "3 bad" in out, out
    assert main(["data", "check", str(root), "--image-size", "30"]) == 1  # only the 16-bit image remains
    assert "1 bad" in capsys.readouterr().out


def test_training_scales_16_bit_pngs_to_8_bits_instead_of_clipping(tmp_path):
    from fastfit.data.torchvision_backend import load_rgb

    values = np.array([[0, 257, 1000, 32768], [40000, 65535, 128, 65000]])
    path = tmp_path / "deep.png"
    path.write_bytes(_png16(values))
    assert Image.open(path).mode == "I;16"
    expected = np.rint(values / 257).astype(np.uint8)  # 0, 1, 4, 128, 156, 255, 0, 253
    got = np.asarray(load_rgb(str(path)))
    assert got.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(got[..., channel], expected)
    # what PIL's own conversion does (and fastfit did): every value above 255 becomes white
    assert np.asarray(Image.open(path).convert("RGB"))[1, 0, 0] == 255 != expected[1, 0]


def test_a_folder_the_walk_cannot_open_is_reported_and_stops_training_with_its_name(tmp_path, monkeypatch):
    """The chmod test above as root too: the folder's listing fails as it does without read permission."""
    from fastfit.data.samples import image_folder

    root = tmp_path / "ds"
    _class_folders(root / "train", {"a": 2, "b": 1})
    locked = root / "train" / "b"
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = check_dataset(root / "train")
    assert [(b.path, b.reason) for b in report.bad] == [(str(locked), "unreadable folder: Permission denied")]
    with pytest.raises(DataError, match=f"dataset folder {locked}: unreadable folder: Permission denied; fix its"):
        image_folder(root, "train")
