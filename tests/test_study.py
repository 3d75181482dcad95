"""`fastfit study fmnist` on a small stand-in for the Fashion-MNIST export: the validation split never holds a test
image, and an interrupted study resumes, skipping the runs it finished."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastfit.data import fmnist
from fastfit.study import runner
from fastfit.study.plan import ROWS, STUDENTS, Budget
from fastfit.study.split import ensure_study_split, validation_indices

PER_CLASS = {"train": 8, "val": 3}  # the export's "val" is Fashion-MNIST's test set
VAL_PER_CLASS = 2


def _fake_export(root: Path) -> Path:
    """An export laid out like fmnist.ensure_fashion_mnist_jpegs's (train/ and val/, files named by index)."""
    rng = np.random.default_rng(0)
    for split, per_class in PER_CLASS.items():
        index = 0
        for label in range(len(fmnist.CLASSES)):
            folder = root / split / fmnist.class_folder(label)
            folder.mkdir(parents=True)
            for _ in range(per_class):
                pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{index:05d}.jpg")
                index += 1
    (root / "COMPLETE").write_text(fmnist._FORMAT_VERSION + "\n")
    return root


def _files(folder: Path) -> dict[str, Path]:
    return {f"{p.parent.name}/{p.name}": p for p in folder.glob("*/*.jpg")}


def test_validation_split_is_carved_from_training_images_only(tmp_path):
    export = _fake_export(tmp_path / "export")
    root = ensure_study_split(tmp_path / "study", export, per_class=VAL_PER_CLASS)
    train, val, test = (_files(root / split) for split in ("train", "val", "test"))
    source_train, source_test = _files(export / "train"), _files(export / "val")
    # Every validation image is one of the training images, and the same file (content and identity) as it.
    assert set(val) <= set(source_train)
    for key, path in val.items():
        assert path.read_bytes() == source_train[key].read_bytes()
        assert os.stat(path).st_ino == os.stat(source_train[key]).st_ino  # a hard link to the training image
    # No test image is in the validation split (by content, not only by name), and none is trained on.
    test_bytes = {p.read_bytes() for p in source_test.values()}
    assert not any(p.read_bytes() in test_bytes for p in val.values())
    assert not any(p.read_bytes() in test_bytes for p in train.values())
    # train and val partition the training images; test is the whole test set.
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(source_train)
    assert set(test) == set(source_test)
    # Class-balanced, and recorded.
    per_class = {}
    for key in val:
        per_class[key.split("/")[0]] = per_class.get(key.split("/")[0], 0) + 1
    assert per_class == {fmnist.class_folder(c): VAL_PER_CLASS for c in range(len(fmnist.CLASSES))}
    record = json.loads((root / "split.json").read_text())
    assert sorted(int(Path(k).stem) for k in val) == record["val_indices"]
    # Made once: a second call keeps the same split.
    assert ensure_study_split(tmp_path / "study", export, per_class=VAL_PER_CLASS) == root
    assert set(_files(root / "val")) == set(val)


def test_validation_indices_are_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 30)
    np.random.default_rng(1).shuffle(labels)
    chosen = validation_indices(labels, per_class=5)
    assert chosen == validation_indices(labels, per_class=5)  # fixed seed
    assert np.bincount(labels[chosen], minlength=10).tolist() == [5] * 10
    assert validation_indices(labels, per_class=5, seed=2) != chosen


TINY = Budget(
    teacher_images=0,
    teacher_epochs=1,
    images=0,
    epochs=2,
    hint_epochs=1,
    batch_size=10,
    lrs=(0.05,),
    temperatures=(2.0,),
)
EXTRA = ["data.backend=torchvision", "data.workers=0", "run.device=cpu", "run.log_interval=1"]


@pytest.mark.slow
def test_an_interrupted_study_resumes_and_skips_finished_runs(tmp_path, monkeypatch):
    export = _fake_export(tmp_path / "export")
    out = tmp_path / "study"
    calls = []
    real_train = runner.train

    def train_then_fail(cfg, resume=None):
        if len(calls) == 4:
            raise KeyboardInterrupt  # the user stops the study during its fifth run
        calls.append(cfg.run.output_dir)
        return real_train(cfg, resume=resume)

    kwargs = dict(budget=TINY, seeds=(0,), extra=EXTRA, export=export, val_per_class=VAL_PER_CLASS)
    monkeypatch.setattr(runner, "train", train_then_fail)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(out, **kwargs)
    finished = sorted(p.parent for p in (out / "runs").rglob("result.json"))
    assert finished == sorted(Path(c) for c in calls)  # the four finished runs, and not the interrupted one

    again = []

    def counting_train(cfg, resume=None):
        again.append(cfg.run.output_dir)
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(runner, "train", counting_train)
    report = runner.run_study(out, **kwargs)
    total = 1 + len(STUDENTS) * 2 + len(STUDENTS) * len(ROWS)
    assert len(calls) + len(again) == total  # nothing trained twice
    assert not {str(Path(p)) for p in again} & {str(p) for p in finished}
    assert len(report["runs"]) == len(STUDENTS) * len(ROWS)
    assert {(r["student"], r["row"]) for r in report["runs"]} == {(s, r) for s in STUDENTS for r in ROWS}
    assert all(r["eval_split"] == "test" for r in report["runs"])
    assert all(e["eval_split"] == "val" for s in report["search"].values() for e in s["lr"] + s["temperature"])
    saved = json.loads((out / "study.json").read_text())
    assert saved["environment"]["git_sha"] and len(saved["runs"]) == len(report["runs"])
    assert "| thin-bn | FitNet |" in (out / "report.md").read_text()


def test_the_demo_uses_the_settings_the_committed_study_chose_on_validation():
    from fastfit.study.plan import CHOSEN

    study = json.loads((Path(__file__).resolve().parent.parent / "docs/results/study_fmnist.json").read_text())
    assert {student: entry["chosen"] for student, entry in study["search"].items()} == CHOSEN
    for entry in study["search"].values():  # chosen = the best validation top-1 of its grid
        assert entry["chosen"]["lr"] == max(entry["lr"], key=lambda r: r["top1"])["lr"]
        assert entry["chosen"]["temperature"] == max(entry["temperature"], key=lambda r: r["top1"])["temperature"]
        assert all(r["eval_split"] == "val" for r in entry["lr"] + entry["temperature"])
