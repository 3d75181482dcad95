"""Non-finite losses: found without a per-step sync, reported by term; "stop" saves nothing after them, "skip" makes
the bad step change nothing (weights, momentum, BatchNorm statistics) — fp32 and fp16 + GradScaler."""

import json
import logging
import math

import pytest
import torch
from tiny_runs import tiny_config, torchrun, write_config
from torch import nn

from fastfit.engine import checkpoint as ckpt
from fastfit.engine.loop import train
from fastfit.engine.nonfinite import NonFiniteGuard, prime_momentum
from fastfit.errors import NonFiniteError

CONSTANT_LR = ["optim.warmup_epochs=0", "optim.milestones=[]", "optim.epochs=1"]


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_stop_names_the_bad_terms_and_saves_nothing_after_them(tmp_path, monkeypatch, amp):
    # Checks only at the step-3 checkpoint and the epoch end: the NaN batch of step 2 is found at step 3, before
    # that checkpoint is written.
    cfg = tiny_config(
        tmp_path,
        "mmrazor",
        tmp_path / "run",
        f"run.amp={amp}",
        "run.log_interval=50",
        "run.nonfinite_check_every=50",
        "run.checkpoint_every_steps=3",
    )
    monkeypatch.setenv("FASTFIT_INJECT", "nan@2")
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite loss in stage joint epoch 1, global steps 1–3: loss \(\d "
        r"steps?\), hint/stage2 \(\d steps?\), kd \(\d steps?\), ce \(\d steps?\) "
        r"became NaN/Inf; nothing was saved after it\. Resume from the last "
        r"checkpoint .*or set run.nonfinite=skip",
    ):
        train(cfg)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints") == []


@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_skip_makes_the_bad_step_change_nothing(tmp_path, monkeypatch, amp, caplog):
    """Three steps with step 3's batch NaN end in exactly the state of the first two steps alone."""
    clean = tiny_config(
        tmp_path,
        "mmrazor",
        tmp_path / "two",
        *CONSTANT_LR,
        f"run.amp={amp}",
        "run.nonfinite=skip",
        "run.max_steps_per_epoch=2",
    )
    two = train(clean)
    monkeypatch.setenv("FASTFIT_INJECT", "nan@3")
    caplog.set_level(logging.INFO, logger="fastfit")
    three = train(
        tiny_config(
            tmp_path,
            "mmrazor",
            tmp_path / "three",
            *CONSTANT_LR,
            f"run.amp={amp}",
            "run.nonfinite=skip",
            "run.max_steps_per_epoch=3",
        ),
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith(
            "skipped 1 step(s) with a non-finite loss or gradient in stage joint epoch 1, "
            "global step 3: loss (1 step), hint/stage2 (1 step), kd (1 step), ce (1 step)"
        )
        for m in warnings
    ), warnings
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints"))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "three" / "checkpoints"))
    for key in ("student", "connectors"):  # weights and BatchNorm statistics
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key} {name} changed in the skipped step"
    for param_id, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][param_id]["momentum_buffer"])
    assert b["skipped_steps"] == 1
    assert three["final"]["top1"] == two["final"]["top1"]
    lines = [json.loads(line) for line in (tmp_path / "three" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in lines if "lr" in r] == [0, 0, 1]
    assert math.isnan(lines[2]["loss"]), "a logged interval holding only skipped steps has no mean"
    # the epoch mean covers the two applied steps only
    assert three["history"][0]["train_loss"] == pytest.approx(two["history"][0]["train_loss"], rel=1e-6)


def test_skip_also_catches_gradients_that_go_bad_under_a_finite_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    prime_momentum(optimizer)
    guard = NonFiniteGuard("skip", fp16=False, device=torch.device("cpu"), modules=[model])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.before_forward()
    out = model(torch.randn(8, 3))
    loss = out.square().mean() + (model[0].weight - model[0].weight.detach()).abs().sqrt().sum()  # √|0|: ∞ slope
    guard.observe({"loss": loss})
    loss.backward()
    assert torch.isfinite(loss) and not torch.isfinite(model[0].weight.grad).all()
    applied = guard.step(optimizer, scaler)
    assert not bool(applied)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed although the step was skipped"
    assert guard.names == ["loss", "gradients"] and guard.read().tolist() == [1, 0, 1]
    assert guard.read().tolist() == [0, 0, 0], "read resets"


def test_primed_fused_sgd_survives_a_skipped_first_step():
    """A fused SGD's first step allocates its momentum with empty_like; skipped via found_inf, the garbage stays.
    Primed with zeros, a skipped first step is a no-op and the next step equals a fresh optimizer's first."""
    grad = torch.tensor([0.5, -1.0, 2.0])
    fresh = nn.Parameter(torch.ones(3))
    reference = torch.optim.SGD([fresh], lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    fresh.grad = grad.clone()
    reference.step()
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    prime_momentum(optimizer)
    param.grad = torch.full((3,), float("nan"))
    optimizer.grad_scale, optimizer.found_inf = None, torch.ones(1)
    optimizer.step()
    del optimizer.grad_scale, optimizer.found_inf
    assert torch.equal(param.detach(), torch.ones(3))
    param.grad = grad.clone()
    optimizer.step()
    assert torch.equal(param, fresh) and torch.equal(
        optimizer.state[param]["momentum_buffer"], reference.state[fresh]["momentum_buffer"]
    )
    # by hand: buf = g + wd·p = [0.51, -0.99, 2.01]; p = 1 - 0.1·buf
    torch.testing.assert_close(param.detach(), torch.tensor([0.949, 1.099, 0.799]), rtol=0, atol=1e-7)


def test_unmask_recovers_means_over_applied_steps():
    assert NonFiniteGuard.unmask({"loss": 2.0, "_applied": 0.5}) == {"loss": 4.0}
    assert math.isnan(NonFiniteGuard.unmask({"loss": 0.0, "_applied": 0.0})["loss"])
    assert NonFiniteGuard.unmask({"loss": 2.0}) == {"loss": 2.0}


def test_a_nan_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """Two gloo workers; only rank 1's batch of step 2 is NaN. The ranks agree at the next check, both exit with
    code 2, and torchrun's summary shows the non-finite loss error."""
    config = write_config(tmp_path, "mmrazor")
    result = torchrun(
        2,
        config,
        tmp_path / "run",
        "run.nonfinite_check_every=3",
        "run.log_interval=50",
        env={"FASTFIT_INJECT": "nan@2:rank1"},
        timeout=180,
    )
    assert result.returncode != 0
    out = result.stdout
    line = "fastfit train: error: non-finite loss in stage joint epoch 1, global steps 1–3"
    assert out.count(line) == 2, out[-4000:]
    assert "exitcode  : 2" in out and "NonFiniteError: non-finite loss" in out, out[-4000:]
