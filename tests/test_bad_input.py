"""Bad input through `fastfit train`: one line naming the thing and the fix, exit code 2, before any training.

The rest of the issue's list is covered where the code lives (docs/reliability.md has the full table): unknown
model, wrong tap path, unmappable tap shapes, missing teacher weights (test_models_taps.py); unknown config key,
wrong type (test_config.py); class-count mismatch, batch size not divisible, checkpoint of another config
(test_engine.py, test_checkpoint.py); corrupt JPEG, DALI not installed (the data tests)."""

import pytest
from tiny_runs import write_config

from fastfit.cli import main


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, "mmrazor")


def _fails(capsys, *argv) -> str:
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    return err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data.dataset=imagefolder", 'data.root=""'],
            "data.root is empty; set it to the folder holding train/ and val/",
        ),
        (
            ["data.dataset=imagefolder", "data.root=/no/such/imagenet"],
            "dataset folder /no/such/imagenet/train does not exist; "
            "data.root must hold train/ with one folder per class",
        ),
        (["run.nonfinite=maybe"], "run.nonfinite must be one of 'stop' | 'skip', got 'maybe'"),
        (["run.nonfinite_check_every=0"], "run.nonfinite_check_every = 0 is out of range: it must be finite and ≥ 1"),
        (["run.checkpoint_every_steps=-5"], "run.checkpoint_every_steps = -5 is out of range"),
        (['run.preemption_signals=["TERM9"]'], "run.preemption_signals: 'TERM9' is not a signal a process can catch"),
        (["run.preemption_signals=SIGTERM"], "run.preemption_signals must be a list of str, got 'SIGTERM'"),
        (["model.num_classes=7"], "has 10 classes but model.num_classes is 7; set model.num_classes=10"),
        (["optim.batch_size=5", "data.train_subset=3"], "fewer than one global batch of 5; lower optim.batch_size"),
    ],
)
def test_bad_settings_are_one_line_with_the_fix(config, tmp_path, capsys, overrides, message):
    err = _fails(capsys, "--config", str(config), f'run.output_dir="{tmp_path / "run"}"', *overrides)
    assert err.startswith("fastfit train: error: ") and message in err, err


def test_empty_dataset_folder_says_what_it_must_hold(config, tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    err = _fails(
        capsys,
        "--config",
        str(config),
        f'run.output_dir="{tmp_path / "run"}"',
        "data.dataset=imagefolder",
        f'data.root="{tmp_path / "data"}"',
    )
    assert "train has no class folders; expected train/<class name>/<image files>" in err, err


def test_resume_targets_that_do_not_exist_are_named(config, tmp_path, capsys):
    err = _fails(
        capsys, "--config", str(config), f'run.output_dir="{tmp_path / "run"}"', "--resume", str(tmp_path / "gone.pt")
    )
    assert f"--resume {tmp_path / 'gone.pt'}: no such checkpoint file or run folder" in err, err
    (tmp_path / "empty").mkdir()
    err = _fails(
        capsys, "--config", str(config), f'run.output_dir="{tmp_path / "run"}"', "--resume", str(tmp_path / "empty")
    )
    assert "the folder holds no checkpoint-*.pt files" in err, err


def test_malformed_fault_injection_is_named(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTFIT_INJECT", "sigterm-at-5")
    err = _fails(capsys, "--config", str(config), f'run.output_dir="{tmp_path / "run"}"')
    assert "FASTFIT_INJECT='sigterm-at-5' is not <fault>@<step>[:rank<r>]" in err, err
