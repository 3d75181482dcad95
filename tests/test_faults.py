"""Multi-process faults: one rank raising makes every rank exit within a bounded time, and torchrun reports the
failing rank's own error as the root cause (not the other rank's "connection closed"). Two gloo workers."""

import os
import re
import signal
import time

import pytest
from tiny_runs import tiny_config, torchrun, write_config

from fastfit.engine.faults import Fault, fault_from_env
from fastfit.errors import ConfigError, FastfitError

BOUND_S = 60  # torchrun notices a failed worker within 0.1 s; the other rank lingers at most 5 s


def test_one_rank_raising_stops_all_ranks_with_that_error(tmp_path):
    config = write_config(tmp_path, "mmrazor")
    started = time.monotonic()
    result = torchrun(
        2, config, tmp_path / "run", "run.log_interval=5", env={"FASTFIT_INJECT": "raise@3:rank1"}, timeout=BOUND_S
    )  # a hang fails the test with TimeoutExpired
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode != 0
    root = out[out.index("Root Cause (first observed failure):") :]
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)", root), root
    assert "RuntimeError: fault injected by FASTFIT_INJECT=raise@3:rank1 at global step 3 on rank 1" in root, root
    # rank 0 either stopped on its own, saying why, or was stopped by torchrun while it waited for that
    assert "rank 0 stopped because another process of the run failed first" in out or re.search(
        r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: -15", out
    ), out[-4000:]
    assert elapsed < BOUND_S


def test_a_rank_that_stops_responding_is_named_and_every_process_exits(tmp_path):
    """SIGSTOP freezes rank 1 after its first step (as a hung or swapped-out peer). Rank 0 waits the configured
    collective timeout, not a hard-coded 600 s, names rank 1 in one line, and torchrun then ends every process."""
    config = write_config(tmp_path, "mmrazor")
    timeout_s = 4
    process = torchrun(
        2,
        config,
        tmp_path / "run",
        f"run.collective_timeout_s={timeout_s}",
        "data.train_subset=128",
        "optim.epochs=20",
        env={"FASTFIT_INJECT": "sigstop@1:rank1"},
        popen=True,
    )  # torchrun then SIGTERMs rank 1, which a stopped process never acts on, and SIGKILLs it 30 s later
    try:
        # ~10 s start, 4 s timeout, ≤ 4 s roll call, torchrun's fixed 30 s before SIGKILL; a hang: TimeoutExpired
        output, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGCONT)
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode != 0
    message = next((line for line in output.splitlines() if line.startswith("fastfit train: error: ")), None)
    assert message is not None, output[-4000:]
    assert message.startswith(
        f"fastfit train: error: rank 1 stopped responding: rank 0 waited {timeout_s} s (run.collective_timeout_s) "
        "in a collective that it never joined"
    ), message
    root = output[output.index("Root Cause (first observed failure):") :]
    assert re.search(r"rank\s+: 0 \(local_rank: 0\)", root) and "rank 1 stopped responding" in root, root
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: -9", output), output[-4000:]
    with pytest.raises(ProcessLookupError):  # nothing of the run is left: torchrun, both ranks, their workers
        os.killpg(process.pid, 0)


def test_collective_timeout_must_be_a_positive_number(tmp_path):
    for bad in ("0", "-5", "nan", "inf"):
        with pytest.raises(
            ConfigError, match=r"run.collective_timeout_s must be (a finite number )?> 0, got .*; set it to a value > 0"
        ):
            tiny_config(tmp_path, "mmrazor", tmp_path / "run", f"run.collective_timeout_s={bad}")
    assert tiny_config(tmp_path, "mmrazor", tmp_path / "run").run.collective_timeout_s == 600


def test_fault_specs_parse_or_say_the_format(monkeypatch):
    monkeypatch.setenv("FASTFIT_INJECT", "sigterm@5:rank1")
    assert fault_from_env(rank=1) == Fault("sigterm", 5) and fault_from_env(rank=0) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert fault_from_env(rank=1) is None, "a torchrun restart runs clean"
    monkeypatch.setenv("FASTFIT_INJECT", "explode@5")
    with pytest.raises(
        FastfitError,
        match=r"FASTFIT_INJECT='explode@5' is not <fault>@<step>\[:rank<r>\] with fault "
        r"sigterm, sigusr1, sigkill, sigstop, raise or nan .*unset FASTFIT_INJECT",
    ):
        fault_from_env(rank=0)
