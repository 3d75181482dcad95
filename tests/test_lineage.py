"""A run folder never loses a run: one live run per folder (an OS lock a second process runs into), one line of
checkpoints per folder (rollbacks and foreign checkpoints set the rest aside, never delete it), config.toml only
rewritten once a resume is accepted, every accepted config change recorded, and a finished run that is given more
epochs trains them."""

import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import REPO, assert_same_training_state, records, tiny_config, write_config

from fastfit.cli import main
from fastfit.config import load_config
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.lineage import read_history
from fastfit.engine.loop import train
from fastfit.engine.run_lock import RunFolderLock
from fastfit.errors import CheckpointError, Preempted

# Holds the run folder's lock in a real second process until its stdin closes.
HOLDER = """
import sys
from fastfit.engine.run_lock import RunFolderLock
RunFolderLock(sys.argv[1]).acquire()
print("held", flush=True)
sys.stdin.read()
"""
# Tries the lock once in a fresh process; prints "free" or the refusal.
PROBE = """
import sys
from fastfit.engine.run_lock import RunFolderLock
try:
    RunFolderLock(sys.argv[1]).acquire()
    print("free")
except ValueError as err:
    print(err)
"""


def _python(script: str, *args: str, **kwargs):
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, text=True, **kwargs)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted tiny runs (periodic checkpoints every 3 steps, all kept), made on first use, keyed by
    recipe and extra overrides."""
    made = {}

    def get(recipe: str, *overrides: str):
        key = (recipe, overrides)
        if key not in made:
            root = tmp_path_factory.mktemp(recipe)
            train(tiny_config(root, recipe, root / "run", "run.checkpoint_every_steps=3", *overrides))
            made[key] = root / "run"
        return made[key]

    return get


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_second_live_run_in_the_same_folder_is_refused_until_the_first_dies(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _python(HOLDER, str(out), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        config = write_config(tmp_path, "mmrazor")
        assert main(["train", "--config", str(config), f'run.output_dir="{out}"']) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        assert err.startswith(f"fastfit train: error: run folder {out} is in use by another live run")
        assert f"pid {holder.pid} on " in err and "give this run another run.output_dir" in err
        assert not (out / "config.toml").exists() and not (out / "checkpoints").exists(), "nothing was written"
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel alone releases the lock
        holder.wait(timeout=30)
    RunFolderLock(out).acquire().release()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    config = write_config(tmp_path, "mmrazor")
    assert main(["train", "--config", str(config), f'run.output_dir="{tmp_path / "run" / "sub"}"']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fastfit train: error: run.output_dir {tmp_path / 'run' / 'sub'} cannot hold a run (")
    assert err.endswith("give a writable folder") and "\n" not in err


def test_the_lock_is_not_kept_alive_by_a_forked_child(tmp_path):
    """DataLoader workers are forked from the run; one that lingers after the run ended must not hold its folder."""
    lock = RunFolderLock(tmp_path).acquire()
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        lock.release()
        probe = _python(PROBE, str(tmp_path), stdout=subprocess.PIPE)
        assert probe.communicate(timeout=60)[0].strip() == "free"
    finally:
        child.kill()
        child.join(timeout=30)


def test_rolling_back_then_preempted_then_resume_auto_continues_the_new_line(straight, tmp_path, monkeypatch, caplog):
    """Resume from step 3 of a finished run, get preempted at step 5, then --resume auto: the run continues from 5
    (not the abandoned line's step 8) and ends bitwise where the uninterrupted run ends; the abandoned checkpoints
    are set aside whole, with the log as it was."""
    reference = straight("mmrazor")
    run = _copy_run(reference, tmp_path / "run")
    abandoned = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run / "checkpoints")[1:]}
    assert sorted(abandoned) == [f"checkpoint-{s:010d}.pt" for s in (4, 6, 8)]
    cfg = tiny_config(tmp_path, "mmrazor", run, "run.checkpoint_every_steps=3")
    monkeypatch.setenv("FASTFIT_INJECT", "sigterm@5")
    caplog.set_level(logging.INFO, logger="fastfit")
    with pytest.raises(Preempted):
        train(cfg, resume=str(run / "checkpoints" / "checkpoint-0000000003.pt"))
    aside = run / "checkpoints.set-aside-1"
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(aside)} == abandoned
    assert all(ckpt.verify_checkpoint(p) for p in ckpt.list_checkpoints(aside)), "their checksums moved with them"
    assert (aside / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert any("not the newest checkpoint" in m and str(aside) in m for m in caplog.messages), caplog.messages
    monkeypatch.delenv("FASTFIT_INJECT")
    train(cfg, resume="auto")
    assert records(run) == records(reference)
    assert_same_training_state(run, reference)
    resumes = [e for e in read_history(run) if e["event"] == "resume"]
    assert [e["global_step"] for e in resumes] == [3, 5] and resumes[0]["set_aside"] == str(aside)


def test_a_foreign_checkpoint_sets_the_folders_run_aside_and_rotation_keeps_only_the_new_line(straight, tmp_path):
    """The folder holds a 12-step paper-recipe run; resuming another folder's mmrazor checkpoint of step 4 there with
    keep_checkpoints=1 must neither delete the paper run (rotation used to keep its step-12 checkpoint and delete
    the new ones) nor mix with it."""
    earlier = straight("fitnets-paper")
    run = _copy_run(earlier, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(run / "checkpoints")}
    source = straight("mmrazor")
    cfg = tiny_config(tmp_path, "mmrazor", run, "run.checkpoint_every_steps=3", "run.keep_checkpoints=1")
    train(cfg, resume=str(source / "checkpoints" / "checkpoint-0000000004.pt"))
    aside = run / "checkpoints.set-aside-1"
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(aside)} == before
    for name in ("metrics.jsonl", "student.pt", "summary.json"):
        assert (aside / name).read_bytes() == (earlier / name).read_bytes(), name
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["checkpoint-0000000008.pt"]
    assert records(run) == records(source), "the log continues the resumed run's own lines"
    assert_same_training_state(run, source)


def test_a_refused_resume_leaves_config_toml_as_it_was_so_its_advice_works(straight, tmp_path):
    run = _copy_run(straight("mmrazor"), tmp_path / "run")
    saved = (run / "config.toml").read_text()
    with pytest.raises(CheckpointError, match=r"optim.batch_size: checkpoint 8 vs now 16.*config.toml in the run"):
        train(tiny_config(tmp_path, "mmrazor", run, "optim.batch_size=16"), resume="auto")
    assert (run / "config.toml").read_text() == saved
    train(load_config(run / "config.toml", [f'run.output_dir="{run}"']), resume="auto")  # the advice works


@pytest.mark.parametrize(
    "extension, changed",
    [
        (("optim.epochs=3",), {"optim.epochs": [2, 3]}),
        (("optim.epochs=3", "optim.milestones=[1, 2]"), {"optim.epochs": [2, 3], "optim.milestones": [[1], [1, 2]]}),
    ],
    ids=["more-epochs", "more-epochs-and-a-later-milestone"],
)
def test_extending_a_finished_run_trains_the_new_epochs_and_records_the_change(
    straight, tmp_path, caplog, extension, changed
):
    """A finished 2-epoch run resumed with optim.epochs=3 (and a milestone at the new epoch) trains epoch 3 and ends
    bitwise where an uninterrupted run of the new config ends (the first two epochs' schedule is the same); the
    summary covers all three epochs."""
    run = _copy_run(straight("mmrazor"), tmp_path / "run")
    reference = straight("mmrazor", *extension)
    caplog.set_level(logging.INFO, logger="fastfit")
    summary = train(tiny_config(tmp_path, "mmrazor", run, "run.checkpoint_every_steps=3", *extension), "auto")
    assert records(run) == records(reference)
    assert_same_training_state(run, reference)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["history"] == summary["history"]
    change = {**changed, "run.output_dir": [str(straight("mmrazor")), str(run)]}
    assert read_history(run)[-1]["config_changes"] == change
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    assert last["config_history"] == [{"global_step": 8, "changes": change}]
    assert any("changed config" in m and "optim.epochs 2 → 3" in m for m in caplog.messages), caplog.messages
    assert "epochs = 3" in (run / "config.toml").read_text()


def test_extending_the_last_stage_of_a_two_stage_run_trains_it(straight, tmp_path):
    """The paper recipe finished (hint stage, then 2 KD epochs): optim.epochs=3 adds a third KD epoch (λ's anneal
    now spans the longer stage, so no bitwise reference); the hint stage is not repeated."""
    run = _copy_run(straight("fitnets-paper"), tmp_path / "run")
    summary = train(tiny_config(tmp_path, "fitnets-paper", run, "optim.epochs=3"), "auto")
    assert [(h["stage"], h["epoch"]) for h in summary["history"]] == [("hint", 1), ("kd", 1), ("kd", 2), ("kd", 3)]
    assert records(run)[: len(records(straight("fitnets-paper")))] == records(straight("fitnets-paper"))
    assert records(run)[-1]["global_step"] == 16 and "top1" in summary["final"]


def test_resume_auto_falls_back_past_corrupt_checkpoints_and_sets_them_aside(straight, tmp_path, caplog):
    reference = straight("mmrazor")
    run = _copy_run(reference, tmp_path / "run")
    for step in (6, 8):
        path = run / "checkpoints" / f"checkpoint-{step:010d}.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="fastfit")
    train(tiny_config(tmp_path, "mmrazor", run, "run.checkpoint_every_steps=3"), resume="auto")
    assert any("checkpoint-0000000008.pt is corrupt" in m and "falling back" in m for m in caplog.messages)
    assert any("resumed from" in m and "checkpoint-0000000004.pt" in m for m in caplog.messages), caplog.messages
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints.set-aside-1")] == [
        "checkpoint-0000000006.pt",
        "checkpoint-0000000008.pt",
    ]
    assert records(run) == records(reference)
    assert_same_training_state(run, reference)
