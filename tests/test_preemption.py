"""Preemption: SIGTERM / SIGUSR1 → the step finishes, a checkpoint is written, the process exits with code 75, and
the run resumes exactly — by hand (--resume auto) or by torchrun's restarts (--max-restarts). Two gloo workers."""

import os
import signal
import subprocess
import sys
import time

import pytest
from tiny_runs import REPO, assert_same_training_state, records, tiny_config, torchrun, write_config

from fastfit.cli import main
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.loop import train
from fastfit.engine.preemption import StopSignals
from fastfit.errors import EXIT_PREEMPTED, ConfigError

# 2 epochs × 12 steps of a global batch of 8; logs every 5 steps, so most steps agree on stop requests through the
# asynchronous poll rather than a blocking check.
LONG = ["data.train_subset=128", "run.max_steps_per_epoch=12", "run.log_interval=5"]
TOTAL_STEPS = 24


def test_sigusr1_through_the_cli_exits_75_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, "mmrazor")
    monkeypatch.setenv("FASTFIT_INJECT", "sigusr1@2")
    before = signal.getsignal(signal.SIGUSR1)
    code = main(["train", "--config", str(config), f'run.output_dir="{tmp_path / "run"}"'])
    assert code == EXIT_PREEMPTED == 75
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "fastfit train: preempted: stopped by SIGUSR1 after global step 2 (stage 1, epoch 1, step 2); checkpoint "
    ), err
    assert err.endswith(
        "run the same command with --resume auto to continue (torchrun --max-restarts does so automatically)"
    ), err
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "checkpoint-0000000002.pt"
    assert signal.getsignal(signal.SIGUSR1) is before, "the run restores the handlers it replaced"


def test_a_repeated_signal_does_not_force_an_exit(tmp_path):
    """Under SLURM + torchrun a worker can get SIGTERM twice (scheduler and agent); both just request the stop."""
    with StopSignals(["SIGTERM"]) as signals:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert signals.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_signal_names_are_checked(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"run.preemption_signals: 'SIGKILL' is not a signal a process can catch; "
        r"use names such as SIGTERM, SIGUSR1",
    ):
        train(tiny_config(tmp_path, "mmrazor", tmp_path / "run", 'run.preemption_signals=["SIGTERM", "SIGKILL"]'))
    with pytest.raises(ConfigError, match=r"'SIGNOPE' is not a signal"):
        StopSignals(["SIGNOPE"])
    assert StopSignals([]).signals == []  # [] turns the handling off


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    config = write_config(root, "mmrazor")
    result = torchrun(2, config, root / "run", *LONG)
    assert result.returncode == 0, result.stdout[-4000:]
    return root / "run"


def _wait_for_progress(out, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().strip():
            return
        if process.poll() is not None:
            pytest.fail(f"torchrun ended before logging a step: {process.stdout.read()[-4000:]}")
        time.sleep(0.02)
    pytest.fail("no step logged in time")


def test_sigterm_to_torchrun_checkpoints_and_exits_75_then_resume_auto_finishes_the_run(baseline, tmp_path):
    config = write_config(tmp_path, "mmrazor")
    run = tmp_path / "run"
    process = torchrun(2, config, run, *LONG, "--resume", "auto", popen=True)
    _wait_for_progress(run, process)
    process.send_signal(signal.SIGTERM)  # torchrun's agent forwards it to both workers
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert output.count("fastfit train: preempted: stopped by SIGTERM after global step") == 2, output[-4000:]
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    assert 5 <= stopped["global_step"] < TOTAL_STEPS, "stopped within a few steps of the signal, before the end"
    assert not (run / "student.pt").exists()
    result = torchrun(2, config, run, *LONG, "--resume", "auto")
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"checkpoint-{stopped['global_step']:010d}.pt" in result.stdout
    assert records(run) == records(baseline)
    assert_same_training_state(run, baseline)


@pytest.mark.parametrize(
    "fault, extra",
    [
        # SIGTERM to rank 1 only, during step 8: the ranks learn of it through the asynchronous poll one step later,
        # both stop after step 9, rank 0 writes checkpoint 9, both exit 75 and torchrun restarts them.
        ("sigterm@8:rank1", []),
        # rank 0 killed right after step 10's update: the restart goes back to the periodic checkpoint of step 9.
        ("sigkill@10:rank0", ["run.checkpoint_every_steps=3"]),
    ],
)
def test_torchrun_restarts_resume_from_the_newest_checkpoint_by_themselves(baseline, tmp_path, fault, extra):
    config = write_config(tmp_path, "mmrazor")
    run = tmp_path / "run"
    result = torchrun(2, config, run, *LONG, *extra, env={"FASTFIT_INJECT": fault}, restarts=1)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "torchrun restart 1: resuming from the newest checkpoint" in result.stdout, result.stdout[-4000:]
    assert "checkpoint-0000000009.pt at stage 0 epoch 0 step 9 (global step 9)" in result.stdout, result.stdout[-4000:]
    assert records(run) == records(baseline)
    assert_same_training_state(run, baseline)


# Long enough (20 epochs × 16 steps) that the signal always lands mid-run; DataLoader workers in every process.
GROUP = ["data.train_subset=128", "optim.epochs=20", "run.log_interval=2", "data.workers=2"]


def _start_in_own_group(config, run, *extra):
    """scripts/train.py as one process in a session of its own, so os.killpg reaches it and its DataLoader workers
    the way SLURM, `timeout` or `kill -- -PGID` do."""
    command = [sys.executable, "scripts/train.py", "--config", str(config), f'run.output_dir="{run}"', *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTFIT_INJECT", None)
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


@pytest.mark.parametrize(
    "signals",
    [["SIGTERM"], ["SIGUSR1"], ["SIGINT"], ["SIGTERM", "SIGINT"]],
    ids=["sigterm", "sigusr1", "sigint", "sigint-after-sigterm"],
)
def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_75(tmp_path, signals):
    config = write_config(tmp_path, "mmrazor")
    run = tmp_path / "run"
    process = _start_in_own_group(config, run, *GROUP)
    try:
        _wait_for_progress(run, process)
        for name in signals:  # a second signal while the first one's step and checkpoint are under way
            os.killpg(process.pid, getattr(signal, name))
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == EXIT_PREEMPTED, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    last = err.strip().splitlines()[-1]
    # Two signals pending at once are handled in signal-number order: either may be the one named.
    assert any(last.startswith(f"fastfit train: preempted: stopped by {name} after global step ") for name in signals)
    if len(signals) > 1:
        assert "received while stopping for" in err and "SIGKILL (kill -9) abandons it" in err, err[-4000:]
    assert last.endswith(
        "run the same command with --resume auto to continue (torchrun --max-restarts does so automatically)"
    )
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    assert 2 <= stopped["global_step"] < 20 * 16
    assert f"checkpoint {ckpt.checkpoint_path(run / 'checkpoints', stopped['global_step'])};" in last, last


def test_ctrl_c_without_sigint_handling_is_one_line_and_exit_130(tmp_path):
    config = write_config(tmp_path, "mmrazor")
    run = tmp_path / "run"
    process = _start_in_own_group(config, run, *GROUP, 'run.preemption_signals=["SIGTERM"]')
    try:
        _wait_for_progress(run, process)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 130, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastfit train: interrupted (SIGINT) without writing a checkpoint; a training run "), last
    assert "continues from its newest checkpoint with --resume auto" in last, last


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_torchruns_process_group_checkpoints_on_every_rank(tmp_path, name):
    """torchrun, both workers and their DataLoader workers all get the signal (SLURM, `kill -- -PGID`, Ctrl-C), and
    torchrun forwards it once more: both ranks still stop after the same step with one checkpoint and exit 75."""
    config = write_config(tmp_path, "mmrazor")
    run = tmp_path / "run"
    process = torchrun(2, config, run, *GROUP, popen=True)
    try:
        _wait_for_progress(run, process)
        os.killpg(process.pid, getattr(signal, name))
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert output.count(f"fastfit train: preempted: stopped by {name} after global step") == 2, output[-4000:]
    assert "DataLoader worker" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    # torchrun itself ends on the signal with its own SignalException traceback (and no summary); the workers none
    assert output.count("Traceback") == output.count("SignalException: Process"), output[-4000:]
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints"))
    assert 2 <= stopped["global_step"] < 20 * 16
