"""Find the files in an image dataset that would stop (or, with data.skip_bad, be skipped by) a training run.

    report = check_dataset("/data/imagenet", decode=False)   # or `fastfit data check /data/imagenet`

Layout: an ImageFolder (DIR/<class>/<images>) or a folder of splits (DIR/train/<class>/…, DIR/val/<class>/…).
Only files with an ImageFolder image extension are checked; others are counted as ignored (ImageFolder skips them).

Fast mode reads the first bytes and the last kilobyte of each file and parses the header: it finds empty and
unreadable files, non-images, truncated JPEG/PNG files (no end marker) and broken headers — ≈40 µs per file on
one core with a warm page cache. `decode=True` also decodes every image fully (a few ms each), which finds
corruption inside the data. Small jobs run on threads; large ones on forked processes, since header parsing is
Python code that holds the GIL (ImageNet's 1.33M files: ≈55 s on one core, ≈4 s on 16).

The DALI loader runs the fast check on every file it will read: DALI 2.4's decoder crashes the process
(SIGSEGV, no message) on some non-image or header-corrupt files in batches of 32 or more.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from fastfit.data.samples import walk_once
from fastfit.errors import DataError

_PROCESS_THRESHOLD = 20_000  # files; below this, starting processes costs more than the GIL does
_CHUNK = 64  # files per pool task
_HEAD_BYTES = 32  # the signature, and a PNG's IHDR up to its bit depth (byte 24)
_TAIL_BYTES = 1024  # an end marker within this much of the end allows for padding after it (some encoders add it)
_SIGNATURES = [  # (magic at offset 0, format); DALI and PIL decode all of these except GIF (DALI cannot)
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
] + [(f"P{i}".encode(), "PNM") for i in range(1, 7)]


@dataclass
class BadFile:
    path: str
    reason: str


@dataclass
class ClassCount:
    files: int = 0
    bad: int = 0


@dataclass
class CheckReport:
    root: str
    decode: bool
    checked: int = 0
    ignored: int = 0  # files without an image extension (ImageFolder does not list them)
    bad: list[BadFile] = field(default_factory=list)
    classes: dict[str, dict[str, ClassCount]] = field(default_factory=dict)  # split ("" = none) → class → counts

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "decode": self.decode,
            "checked": self.checked,
            "ignored": self.ignored,
            "bad_count": len(self.bad),
            "bad": [vars(b) for b in self.bad],
            "classes": {split: {name: vars(c) for name, c in per.items()} for split, per in self.classes.items()},
        }


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


# PIL modes of more than 8 bits per channel; a 16-bit RGB PNG opens as 8-bit RGB, so PNGs are told by their header.
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def check_image_file(
    path: str | os.PathLike, decode: bool = False, min_size: int = 0, high_bit: bool = False
) -> str | None:
    """Why `path` is not a usable image, or None if it is. `min_size` > 0: an image whose shorter side is smaller
    is reported (smaller than the crop); `high_bit`: images of more than 8 bits per channel are reported."""
    try:  # raw pread: a third of the cost of Python file objects, which matters at a million files
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, _HEAD_BYTES, 0)
            tail = os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES))
        finally:
            os.close(fd)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if size == 0:
        return "empty file (0 bytes)"
    kind = _sniff(head)
    if kind is None:
        return f"not an image (starts with {head[:8]!r})"
    if kind == "GIF":
        return "GIF image: DALI cannot decode GIF; convert it to JPEG or PNG"
    # JPEG entropy data never contains FF D9 (0xFF is always stuffed), so a missing EOI means a cut-off file.
    if kind == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    try:
        with Image.open(path) as image:
            if image.width <= 0 or image.height <= 0:
                return f"bad header: size {image.width}×{image.height}"
            if min_size and min(image.size) < min_size:
                return (
                    f"smaller than the crop: {image.width}×{image.height}, the crop is {min_size}×{min_size} "
                    "(it would be upscaled or padded); remove it or lower --image-size / data.image_size"
                )
            depth = head[24] if kind == "PNG" else None
            if high_bit and (image.mode in HIGH_BIT_MODES or (depth is not None and depth > 8)):
                bits = f"{depth}-bit PNG" if depth and depth > 8 else f"PIL mode {image.mode}"
                return (
                    f"high bit depth ({bits}): both fastfit backends scale it to 8 bits, other tools "
                    "may clip it; convert it to 8 bits to be sure"
                )
            if decode:
                image.convert("RGB")  # loads every pixel: raises on corrupt or truncated data
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return f"{'corrupt' if decode else 'bad header'}: {err}"
    return None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)


def dataset_layout(root: Path) -> dict[str, Path]:
    """split name → folder holding class folders; {"": root} when root itself is an ImageFolder."""
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; give a folder with class folders or train/ and val/")
    subdirs = _class_dirs(root)
    if not subdirs:
        raise DataError(
            f"dataset folder {root} has no subfolders; expected <class>/<images> or <split>/<class>/<images>"
        )
    # A split folder holds class folders; a class folder holds images. Decide on all subfolders together.
    if all(_has_subfolders(d) for d in subdirs):
        return {d.name: d for d in subdirs}
    return {"": root}


def _has_subfolders(folder: Path) -> bool:
    try:
        return any(child.is_dir() for child in folder.iterdir())
    except OSError:  # unreadable: it is reported as such by the walk
        return False


def check_dataset(
    root: str | os.PathLike, decode: bool = False, workers: int | None = None, min_size: int = 0
) -> CheckReport:
    """Check every image of the dataset under `root` (see the module docstring). Besides bad files it reports
    directory symlink loops, folders and files reached twice, unreadable folders, high-bit-depth images and, with
    `min_size` > 0, images whose shorter side is smaller than the crop."""
    root = Path(root).expanduser()
    report = CheckReport(root=str(root), decode=decode)
    jobs: list[tuple[str, str, Path]] = []
    for split, folder in dataset_layout(root).items():
        report.classes[split] = {}
        seen_dirs: dict[tuple[int, int], str] = {}
        seen_files: dict[tuple[int, int], str] = {}
        for class_dir in _class_dirs(folder):
            count = report.classes[split][class_dir.name] = ClassCount()
            walk = walk_once(class_dir, seen_dirs)
            report.bad += [BadFile(path, reason) for path, reason in walk.skipped]
            for directory, names in walk.folders:
                for name in names:
                    path = Path(directory) / name
                    if not _is_image(name):
                        report.ignored += 1
                        continue
                    first = _first_path(path, seen_files)
                    if first is not None:  # a second name for a file already listed: training would use it twice
                        count.files += 1
                        count.bad += 1
                        report.bad.append(BadFile(str(path), f"file reached twice (a symlink or hard link to {first})"))
                        continue
                    jobs.append((split, class_dir.name, path))
    paths = [path for _, _, path in jobs]
    reasons = check_files(paths, decode, workers, min_size=min_size, high_bit=True)
    for (split, name, path), reason in zip(jobs, reasons, strict=True):
        count = report.classes[split][name]
        count.files += 1
        if reason is not None:
            count.bad += 1
            report.bad.append(BadFile(str(path), reason))
    report.checked = len(jobs)
    return report


def _first_path(path: Path, seen: dict[tuple[int, int], str]) -> str | None:
    """The path under which this file (by st_dev, st_ino) was met before, or None (and it is recorded)."""
    try:
        info = path.stat()
    except OSError:
        return None  # a broken link: check_image_file says so
    identity = (info.st_dev, info.st_ino)
    if identity in seen:
        return seen[identity]
    seen[identity] = str(path)
    return None


def _check_chunk(job: tuple[list, bool, int, bool]) -> list[str | None]:
    paths, decode, min_size, high_bit = job
    return [check_image_file(p, decode, min_size, high_bit) for p in paths]


def check_files(
    paths: list, decode: bool = False, workers: int | None = None, min_size: int = 0, high_bit: bool = False
) -> list[str | None]:
    """check_image_file over many paths, in order, in parallel. Chunks keep the number of futures small."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = [(paths[i : i + _CHUNK], decode, min_size, high_bit) for i in range(0, len(paths), _CHUNK)]
    if len(paths) >= _PROCESS_THRESHOLD and cpus > 1 and "fork" in multiprocessing.get_all_start_methods():
        # fork: workers start in milliseconds with everything imported (spawn would re-import torch in each)
        with ProcessPoolExecutor(max_workers=workers or cpus, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_check_chunk, jobs, chunksize=4))
    else:
        with ThreadPoolExecutor(max_workers=workers or min(32, 4 * cpus)) as pool:
            results = list(pool.map(_check_chunk, jobs))
    return [reason for chunk in results for reason in chunk]


def format_report(report: CheckReport, limit: int = 50) -> str:
    """A human summary: totals, bad files (first `limit`) and the classes that hold them."""
    lines = [
        f"{report.root}: {report.checked} images checked ({'full decode' if report.decode else 'headers'}), "
        f"{len(report.bad)} bad, {report.ignored} non-image files ignored"
    ]
    for bad in report.bad[:limit]:
        lines.append(f"  {bad.path}: {bad.reason}")
    if len(report.bad) > limit:
        lines.append(f"  … and {len(report.bad) - limit} more (use --json for the full list)")
    for split, per in report.classes.items():
        hit = {name: c for name, c in per.items() if c.bad}
        if hit:
            label = f"{split}/" if split else ""
            lines.append(
                f"  bad files per class in {label or 'the dataset'}: "
                + ", ".join(f"{label}{name} {c.bad}/{c.files}" for name, c in hit.items())
            )
    return "\n".join(lines)
