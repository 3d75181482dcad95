"""Exact resume: a run stopped after k steps and resumed equals the uninterrupted run bitwise on CPU — every logged
loss, LR and λ, the BatchNorm statistics, the optimizer state and the final weights — for both recipes, mid-epoch,
at an epoch's last step, and across the paper recipe's stage-1 → stage-2 boundary."""

import logging
import shutil
from pathlib import Path

import pytest
from tiny_runs import assert_same_training_state, records, tiny_config

from fastfit.engine import checkpoint as ckpt
from fastfit.engine.loop import train
from fastfit.errors import Preempted

STEPS = 4  # per epoch (run.max_steps_per_epoch in tiny_runs)
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs, one per recipe (and overrides), made on first use; periodic checkpoints every 3 steps
    (all kept)."""
    made = {}

    def get(recipe: str, *overrides: str):
        if (recipe, overrides) not in made:
            root = tmp_path_factory.mktemp(recipe)
            train(tiny_config(root, recipe, root / "run", "run.checkpoint_every_steps=3", *overrides))
            made[recipe, overrides] = root / "run"
        return made[recipe, overrides]

    return get


@pytest.mark.parametrize(
    "recipe, stop_at",
    [
        ("mmrazor", 3),  # mid-epoch, inside the LR warm-up
        ("mmrazor", 4),  # an epoch's last step: the resumed epoch has no steps left, only its evaluation
        ("fitnets-paper", 2),  # mid stage 1: the resumed run crosses into stage 2
        ("fitnets-paper", 7),  # mid stage 2: λ annealing and the LR schedule continue mid-epoch
    ],
)
def test_preempted_run_resumes_to_the_uninterrupted_run(straight, tmp_path, monkeypatch, recipe, stop_at):
    cfg = tiny_config(tmp_path, recipe, tmp_path / "run")
    monkeypatch.setenv("FASTFIT_INJECT", f"sigterm@{stop_at}")
    with pytest.raises(Preempted) as stopped:
        train(cfg)
    position = stopped.value.position
    assert position.global_step == stop_at and position.step == (stop_at - 1) % STEPS + 1
    assert stopped.value.checkpoint == ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.load_checkpoint(stopped.value.checkpoint)["position"] == vars(position)
    monkeypatch.delenv("FASTFIT_INJECT")
    train(cfg, resume="auto")
    assert records(tmp_path / "run") == records(straight(recipe))
    assert_same_training_state(tmp_path / "run", straight(recipe))


def test_lr_and_lambda_sit_at_the_right_step(straight):
    """The paper run's logged schedule against the formulas: stage 1 at hint_lr; stage 2 warms up over half an
    epoch, drops ×0.1 at epoch 1; λ falls linearly from 4 towards 1 over stage 2's 8 steps."""
    steps = [r for r in records(straight("fitnets-paper")) if "lr" in r]
    assert [r["global_step"] for r in steps] == list(range(1, 13))
    assert [r["lr"] for r in steps[:4]] == [0.05] * 4 and all("kd_weight" not in r for r in steps[:4])
    kd = steps[4:]
    progress = [e + s / STEPS for e in (0, 1) for s in range(STEPS)]
    expected_lr = [0.05 * (p + 1e-8) / 0.5 if p < 0.5 else (0.05 if p < 1 else 0.005) for p in progress]
    assert [r["lr"] for r in kd] == pytest.approx(expected_lr, rel=1e-12)
    assert [r["kd_weight"] for r in kd] == pytest.approx([4 - 3 * i / 8 for i in range(8)], rel=1e-6)


def test_restart_after_a_crash_resumes_from_the_periodic_checkpoint(straight, tmp_path, monkeypatch, caplog):
    """A process killed at step 5 (after the periodic checkpoint of step 3) and restarted by torchrun: the restart
    resumes without --resume, drops the log lines written after the checkpoint (one torn by the kill), and ends
    exactly where the uninterrupted run ends."""
    run = tmp_path / "run"
    shutil.copytree(straight("mmrazor"), run)
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        if int(path.stem.split("-")[1]) > 3:
            path.unlink()
    (run / "checkpoints" / ".checkpoint-0000000006.pt.x1y2.tmp").write_bytes(b"half a checkpoi")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:6]) + '\n{"stage": "joint", "glo')
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "checkpoint-0000000003.pt"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    caplog.set_level(logging.INFO, logger="fastfit")
    train(tiny_config(tmp_path, "mmrazor", run))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("torchrun restart 1: resuming") for m in messages), messages
    assert any("checkpoint-0000000003.pt at stage 0 epoch 0 step 3" in m for m in messages), messages
    assert records(run) == records(straight("mmrazor"))
    assert_same_training_state(run, straight("mmrazor"))
    assert not list((run / "checkpoints").glob(".*.tmp")), "the next save removes what a killed writer left"


def test_a_fresh_run_sets_an_earlier_run_aside_instead_of_mixing_with_it(straight, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(straight("mmrazor"), run)
    earlier = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    caplog.set_level(logging.INFO, logger="fastfit")
    train(tiny_config(tmp_path, "mmrazor", run))
    messages = [r.getMessage() for r in caplog.records]
    assert any("moved checkpoints.previous-1, metrics.jsonl.previous-1 aside" in m for m in messages), messages
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints.previous-1")] == earlier
    assert records(run) == records(straight("mmrazor"))  # the new log holds only the new run
    assert (run / "metrics.jsonl.previous-1").read_text() == (straight("mmrazor") / "metrics.jsonl").read_text()


def test_a_checkpoint_written_by_fastfit_0_1_0_resumes_exactly(straight, tmp_path):
    """tests/data holds a mid-epoch checkpoint (global step 3 of the tiny mmrazor run) written by fastfit 0.1.0
    before its modules moved into packages: it still loads, and the run resumed from it ends bitwise where the
    uninterrupted run of today's code ends. That run read its images with the torchvision backend (DALI crops
    differ), so both runs here do."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(DATA / "checkpoint-0.1.0-mmrazor-step3.pt", run / "checkpoints" / "checkpoint-0000000003.pt")
    backend = "data.backend=torchvision"
    train(tiny_config(tmp_path, "mmrazor", run, "run.checkpoint_every_steps=3", backend), resume="auto")
    assert records(run) == [r for r in records(straight("mmrazor", backend)) if r["global_step"] > 3]
    assert_same_training_state(run, straight("mmrazor", backend))
