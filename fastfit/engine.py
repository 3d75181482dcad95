"""The one training loop every entry point uses: setup → (per stage) train_one_epoch → evaluate → save.

Reproducibility by construction: data order and augmentation are functions of (seed, epoch, index), and the
global RNG (dropout) is reseeded from (seed, rank, global step) before every step, so a run resumed from any
checkpoint — an epoch boundary or mid-epoch — continues exactly as the uninterrupted run would have. Mid-epoch
checkpoints also hold the partial loss meters, so logged means and epoch summaries match the uninterrupted run.

Losing nothing (docs/reliability.md): a preemption signal stops the run after the step with a checkpoint (exit
code 75); non-finite losses stop the run or are skipped (run.nonfinite); run.checkpoint_every_steps adds mid-epoch
checkpoints; a torchrun restart resumes from the newest checkpoint; a fresh run sets an earlier run's checkpoints
aside instead of mixing with them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastfit import checkpoint as ckpt
from fastfit.config import Config, ConfigError, to_toml
from fastfit.data import DataBundle, build_loaders
from fastfit.dist import (DistEnv, all_reduce_sum, cleanup_distributed, control_barrier, gather_to_main,
                          is_peer_failure, restart_count, setup_distributed)
from fastfit.distiller import StageModel, TeacherModel, build_connectors
from fastfit.faults import fault_from_env
from fastfit.models import build_model
from fastfit.nonfinite import NonFiniteGuard, prime_momentum
from fastfit.preemption import PeerFailure, Preempted, StopAgreement, StopSignals
from fastfit.profiling import LossMeter, Throughput
from fastfit.recipes import Stage, build_stages
from fastfit.runtime import Runtime, build_optimizer, param_groups, resolve_runtime
from fastfit.schedules import kd_weight, learning_rate

Log = Callable[[str], None]


@dataclass
class Position:
    """Where training stands: the next (stage, epoch within stage, step within epoch) to run."""

    stage: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass
class Run:
    cfg: Config
    env: DistEnv
    rt: Runtime
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    connectors: nn.ModuleDict
    stages: list[Stage]
    out: Path
    log: Log
    position: Position = field(default_factory=Position)
    history: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None
    restored: dict[str, Any] | None = None  # the checkpoint resumed from, until its stage has loaded it
    signals: StopSignals | None = None      # preemption requests (installed by train())
    skipped_steps: int = 0                  # steps skipped for non-finite losses (run.nonfinite = "skip")


def step_seed(seed: int, rank: int, global_step: int) -> int:
    return (seed * 1_000_003 + rank) * 1_000_000_007 + global_step


def per_rank_batch(cfg: Config, env: DistEnv) -> int:
    if cfg.optim.batch_size % env.world_size:
        raise ConfigError(f"optim.batch_size {cfg.optim.batch_size} (global) is not divisible by the {env.world_size} "
                          f"processes; use a multiple of {env.world_size}")
    return cfg.optim.batch_size // env.world_size


def build_models(cfg: Config, rt: Runtime, needs_teacher: bool) -> tuple[nn.Module, nn.Module | None]:
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    m = cfg.model
    student = build_model(m.student, m.num_classes, m.student_weights, m.student_kwargs, role="student")
    student = student.to(rt.device, memory_format=memory_format)
    teacher = None
    if needs_teacher:
        teacher = build_model(m.teacher, m.num_classes, m.teacher_weights, m.teacher_kwargs, role="teacher")
        teacher = teacher.to(rt.device, memory_format=memory_format).eval().requires_grad_(False)
    return student, teacher


def _check_run_switches(cfg: Config) -> None:
    r = cfg.run
    for name, value, low in (("run.log_interval", r.log_interval, 1),
                             ("run.nonfinite_check_every", r.nonfinite_check_every, 1),
                             ("run.checkpoint_every_steps", r.checkpoint_every_steps, 0)):
        if value < low:
            raise ConfigError(f"{name} must be ≥ {low}, got {value}")


def setup_run(cfg: Config, env: DistEnv, log: Log) -> Run:
    _check_run_switches(cfg)
    rt = resolve_runtime(cfg, env.device)
    # Rank-independent: every rank builds identical models (a teacher without weights is not synced by DDP).
    torch.manual_seed(step_seed(cfg.run.seed, 0, -1))
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = build_loaders(cfg.data, env, per_rank_batch(cfg, env), cfg.run.seed, rt.channels_last)
    if len(data.classes) != cfg.model.num_classes:
        raise ConfigError(f"the dataset at {data.root} has {len(data.classes)} classes but model.num_classes is "
                          f"{cfg.model.num_classes}; set model.num_classes={len(data.classes)}")
    stages = build_stages(cfg)
    student, teacher = build_models(cfg, rt, any(s.uses_teacher for s in stages))
    if teacher is not None and not cfg.model.teacher_weights:
        log(f"warning: model.teacher_weights is empty, so the teacher {cfg.model.teacher} is randomly initialized; "
            "distilling from it only makes sense for tests")
    if env.distributed and cfg.run.sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    memory_format = torch.channels_last if rt.channels_last else torch.contiguous_format
    connectors = build_connectors(cfg, teacher, student).to(rt.device, memory_format=memory_format)
    out = Path(cfg.run.output_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg))
    return Run(cfg, env, rt, data, student, teacher, connectors, stages, out, log)


def restore(run: Run, path: Path) -> None:
    state = ckpt.load_checkpoint(path)
    ckpt.check_same_config(state["config"], run.cfg.to_dict(), path)
    run.student.load_state_dict(state["student"])
    run.connectors.load_state_dict(state["connectors"])
    run.position = Position(**state["position"])
    run.history = list(state.get("history", []))
    run.skipped_steps = int(state.get("skipped_steps", 0))
    run.restored = state
    if run.env.is_main:
        _truncate_metrics(run.out / "metrics.jsonl", run.position.global_step)
    run.log(f"resumed from {path} at stage {run.position.stage} epoch {run.position.epoch} step {run.position.step} "
            f"(global step {run.position.global_step})")


def _truncate_metrics(path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint (by a run killed later) and a line torn by the kill, so the
    resumed run's lines follow on exactly."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("global_step", 0) <= global_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, env: DistEnv) -> dict[str, float]:
    """Top-1/top-5 and CE over the whole val set (each sample once across ranks)."""
    was_training = model.training
    model.eval()
    device = rt.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    for images, labels in loader:
        with rt.autocast():
            logits = model(images).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                             torch.nn.functional.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(labels.numel(), device=device)]).double()
    all_reduce_sum(sums, env)
    model.train(was_training)
    c1, c5, loss, n = sums.tolist()  # deliberate sync: once per evaluation
    n = max(n, 1.0)
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "val_loss": loss / n, "val_samples": int(n)}


class StageRunner:
    """The modules, optimizer and schedule tables of one stage."""

    def __init__(self, run: Run, index: int):
        cfg, rt = run.cfg, run.rt
        self.run, self.index, self.stage = run, index, run.stages[index]
        self.model = StageModel(cfg, self.stage, run.student, run.connectors, fused_kd=rt.fused_kernels,
                                fused_hint=rt.fused_kernels)
        self.teacher = TeacherModel(run.teacher, cfg.recipe.hints, self.stage) if self.stage.uses_teacher else None
        self.optimizer = build_optimizer(self.model.named_parameters(), cfg.optim, rt)
        if cfg.run.nonfinite == "skip" and not getattr(self.optimizer, "_step_supports_amp_scaling", False):
            # Skipping a step on the device needs an optimizer that takes `found_inf`: torch's fused SGD.
            o = cfg.optim
            self.optimizer = torch.optim.SGD(param_groups(self.model.named_parameters(), o.weight_decay), lr=o.lr,
                                             momentum=o.momentum, nesterov=o.nesterov, fused=True)
        prime_momentum(self.optimizer)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
        self.guard = NonFiniteGuard(cfg.run.nonfinite, rt.fp16, rt.device, [run.student, run.connectors])
        self.agreement = StopAgreement(run.env, run.signals)
        self.fault = fault_from_env(run.env.rank)
        self.meter, self.epoch_meter = LossMeter(), LossMeter()
        self._checked = 0  # global step of the last non-finite check
        wrapped: nn.Module = self.model
        if run.env.distributed:
            wrapped = DistributedDataParallel(self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
        self.step_fn = torch.compile(wrapped) if rt.compile else wrapped
        self.teacher_fn = (torch.compile(self.teacher) if rt.compile else self.teacher) if self.teacher else None
        self.steps_per_epoch = run.data.train.steps_per_epoch
        if cfg.run.max_steps_per_epoch > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.run.max_steps_per_epoch)
        total = max(1, self.stage.epochs * self.steps_per_epoch)
        # λ for every step of the stage, on the device: the step indexes it, so nothing is copied per step.
        kd_cfg = cfg.recipe.kd
        self.kd_lams = [kd_weight(kd_cfg, s / total) if kd_cfg else 0.0 for s in range(total)]  # host copy: logs
        self.kd_weights = torch.tensor(self.kd_lams, dtype=torch.float32, device=rt.device)

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.run.cfg.run.nonfinite == "skip":
            for group in self.optimizer.param_groups:  # a checkpoint of a "stop" run carries fused=False
                group["fused"], group["foreach"] = True, None
        self.scaler.load_state_dict(state["scaler"])
        if state["position"]["step"] > 0:  # mid-epoch: this rank's partial loss sums of the epoch continue
            per_rank = state["meters"]
            env = self.run.env
            if len(per_rank) != env.world_size:
                self.run.log(f"note: the checkpoint was written by {len(per_rank)} processes, this run has "
                             f"{env.world_size}; this epoch's logged means continue from rank 0's partial sums")
            saved = per_rank[env.rank if len(per_rank) == env.world_size else 0]
            _load_meter(self.meter, saved["interval"], self.run.rt.device)
            _load_meter(self.epoch_meter, saved["epoch"], self.run.rt.device)

    def meters_state(self) -> dict[str, Any]:
        """This rank's partial loss sums (they differ per rank; LossMeter.read averages them over ranks)."""
        return {"interval": _meter_state(self.meter), "epoch": _meter_state(self.epoch_meter)}

    def train_one_epoch(self, epoch: int, start_step: int) -> dict[str, float]:
        """Steps start_step… of `epoch`; raises Preempted (after a checkpoint) or NonFiniteError at a step end."""
        run, cfg, rt = self.run, self.run.cfg, self.run.rt
        self.model.train()
        if start_step == 0:
            self.meter, self.epoch_meter = LossMeter(), LossMeter()
        self._checked = run.position.global_step
        speed = Throughput()
        global_batch = run.data.train.batch_size * run.env.world_size
        bar = None
        if run.env.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=start_step, leave=False, dynamic_ncols=True,
                       desc=f"{self.stage.name} {epoch + 1}/{self.stage.epochs}")
        started = time.perf_counter()
        steps_run = 0
        # A checkpoint written after an epoch's last step resumes with nothing left to run in that epoch.
        batches = run.data.train.epoch(epoch, start_step) if start_step < self.steps_per_epoch else iter(())
        try:
            for step, (images, labels) in enumerate(batches, start=start_step):
                if step >= self.steps_per_epoch:
                    break
                lr = learning_rate(cfg.optim, epoch + step / self.steps_per_epoch, self.stage.constant_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                global_step = run.position.global_step + 1
                if self.fault is not None and self.fault.step == global_step:
                    images = self.fault.poison(images)
                torch.manual_seed(step_seed(cfg.run.seed, run.env.rank, run.position.global_step))
                index = epoch * self.steps_per_epoch + step
                self.guard.before_forward()
                with rt.autocast():
                    teacher_out = self.teacher_fn(images) if self.teacher_fn is not None else {}
                    loss, terms, _ = self.step_fn(images, labels, teacher_out, self.kd_weights[index])
                terms = {"loss": loss, **terms}
                self.guard.observe(terms)
                self.scaler.scale(loss).backward()
                applied = self.guard.step(self.optimizer, self.scaler)
                self.optimizer.zero_grad(set_to_none=True)
                metered = self.guard.meter_terms(terms, applied)
                self.meter.update(metered)
                self.epoch_meter.update(metered)
                speed.add(global_batch)
                steps_run += 1
                run.position = Position(self.index, epoch, step + 1, global_step)
                if bar is not None:
                    bar.update(1)
                if self.fault is not None and self.fault.step == global_step:
                    self.fault.after_step(run.env.rank)
                self._end_of_step(epoch, step, lr, self.kd_lams[index], speed, bar)
        finally:
            if bar is not None:
                bar.close()
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)  # deliberate: the epoch's wall time must include queued work
        elapsed = time.perf_counter() - started
        summary = {f"train_{k}": v for k, v in self.guard.unmask(self.epoch_meter.read(env=run.env)).items()}
        summary["train_img_s"] = steps_run * global_batch / elapsed if elapsed > 0 else 0.0
        summary["train_seconds"] = elapsed
        return summary

    def _end_of_step(self, epoch: int, step: int, lr: float, lam: float, speed: Throughput, bar) -> None:
        """Checks, logging and checkpoints after a step; every rank takes the same branches at the same step."""
        run, cfg = self.run, self.run.cfg
        global_step = run.position.global_step
        last = step + 1 == self.steps_per_epoch
        log_now = global_step % cfg.run.log_interval == 0
        every = cfg.run.checkpoint_every_steps
        checkpoint_now = every > 0 and global_step % every == 0 and not last  # the epoch end saves anyway
        check = last or log_now or checkpoint_now or global_step % cfg.run.nonfinite_check_every == 0
        preempt = False if check else self.agreement.poll()
        if check or preempt:  # a preemption checkpoint must not hold diverged weights either
            stop, counts = self.agreement.agree(self.guard.read())
            preempt = preempt or stop
            run.skipped_steps = self.guard.settle(counts, f"stage {self.stage.name} epoch {epoch + 1}",
                                                  self._checked + 1, global_step, run.skipped_steps, run.log)
            self._checked = global_step
        if log_now:
            values = self.guard.unmask(self.meter.read(env=run.env))
            record = {"stage": self.stage.name, "epoch": epoch, "step": step + 1, "global_step": global_step,
                      "lr": lr, **({"kd_weight": lam} if self.stage.use_kd else {}), "img_s": speed.rate(), **values}
            if cfg.run.nonfinite == "skip":
                record["skipped_steps"] = run.skipped_steps
            self._emit(record)
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{record['img_s']:.0f}")
        if checkpoint_now or preempt:
            save(run, self)
        if preempt:
            stop_for_preemption(run)

    def _emit(self, record: dict[str, Any]) -> None:
        run = self.run
        if not run.env.is_main:
            return
        with open(run.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if run.writer is not None:
            for key, value in record.items():
                if isinstance(value, float):
                    run.writer.add_scalar(f"{record['stage']}/{key}", value, record["global_step"])


def _open_tensorboard(run: Run):
    if not (run.env.is_main and run.cfg.run.tensorboard):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run.out / "tensorboard"))


def save(run: Run, runner: StageRunner) -> Path | None:
    """Every rank calls it (the per-rank loss meters are gathered); rank 0 writes."""
    meters = gather_to_main(runner.meters_state(), run.env)
    if not run.env.is_main:
        return None
    state = {
        "config": run.cfg.to_dict(),
        "student": run.student.state_dict(),
        "connectors": run.connectors.state_dict(),
        "optimizer": runner.optimizer.state_dict(),
        "optimizer_stage": runner.index,
        "scaler": runner.scaler.state_dict(),
        "position": vars(run.position).copy(),
        "global_step": run.position.global_step,
        "history": run.history,
        "meters": meters,  # one entry per rank
        "skipped_steps": run.skipped_steps,
        "rng": {"scheme": "torch.manual_seed(step_seed(seed, rank, global_step)) before every step",
                "seed": run.cfg.run.seed},
    }
    return ckpt.save_checkpoint(run.out / "checkpoints", state, run.cfg.run.keep_checkpoints)


def _meter_state(meter: LossMeter) -> dict[str, Any]:
    return {"sums": {name: value.cpu() for name, value in meter._sums.items()}, "count": meter._count}


def _load_meter(meter: LossMeter, saved: dict[str, Any], device: torch.device) -> None:
    meter._sums = {name: value.to(device) for name, value in saved["sums"].items()}
    meter._count = saved["count"]


def stop_for_preemption(run: Run) -> None:
    """After rank 0 saved the checkpoint of run.position: wait for it on every rank, then raise Preempted."""
    control_barrier(run.env)  # no rank exits (and makes torchrun stop the others) before the checkpoint is written
    name = run.signals.requested if run.signals is not None and run.signals.requested else "a signal to another rank"
    path = ckpt.checkpoint_path(run.out / "checkpoints", run.position.global_step)
    raise Preempted(name, path, run.position)


def export_student(run: Run) -> Path | None:
    if not run.env.is_main:
        return None
    return ckpt.atomic_save(run.student.state_dict(), run.out / "student.pt")


def fit(run: Run) -> dict[str, Any]:
    """Train every remaining stage from run.position; returns the run summary (also written as summary.json)."""
    cfg, started = run.cfg, time.perf_counter()
    run.writer = _open_tensorboard(run)
    teacher_metrics = None
    if run.teacher is not None and run.cfg.model.teacher_weights:
        teacher_metrics = evaluate(run.teacher, run.data.val, run.rt, run.env)
        run.log(f"teacher {cfg.model.teacher}: top-1 {teacher_metrics['top1']:.2f}  top-5 {teacher_metrics['top5']:.2f}")
    restored = run.restored
    for index in range(run.position.stage, len(run.stages)):
        runner = StageRunner(run, index)
        if restored is not None and restored["optimizer_stage"] == index:
            runner.load_state(restored)  # a checkpoint at a stage boundary holds the finished stage's optimizer
        stage = runner.stage
        first_epoch = run.position.epoch if run.position.stage == index else 0
        for epoch in range(first_epoch, stage.epochs):
            start_step = run.position.step if (run.position.stage, run.position.epoch) == (index, epoch) else 0
            run.position = Position(index, epoch, start_step, run.position.global_step)
            record: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1,
                                      **runner.train_one_epoch(epoch, start_step)}
            if not stage.truncated and ((epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == stage.epochs):
                record.update(evaluate(run.student, run.data.val, run.rt, run.env))
            run.history.append(record)
            done_stage = epoch + 1 == stage.epochs
            run.position = Position(index + 1 if done_stage else index, 0 if done_stage else epoch + 1, 0,
                                    run.position.global_step)
            # Logged before the checkpoint: a crash in between re-runs the epoch, and resuming drops the line.
            runner._emit({"global_step": run.position.global_step, **record})
            save(run, runner)
            run.log(_describe(record))
            finished = done_stage and index + 1 == len(run.stages)
            if not finished and runner.agreement.agree()[0]:  # a signal during evaluation or the save
                stop_for_preemption(run)
        restored = None
    export_student(run)
    summary = {
        "student": cfg.model.student, "teacher": cfg.model.teacher or None, "recipe": cfg.recipe.name,
        "student_params": sum(p.numel() for p in run.student.parameters()),
        "teacher_params": sum(p.numel() for p in run.teacher.parameters()) if run.teacher is not None else None,
        "teacher_metrics": teacher_metrics,
        "final": next((h for h in reversed(run.history) if "top1" in h), None),
        "history": run.history,
        "wall_seconds": time.perf_counter() - started,
        "world_size": run.env.world_size,
        "backend": run.data.backend,
    }
    if run.env.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if run.writer is not None:
        run.writer.close()
    return summary


def _describe(record: dict[str, Any]) -> str:
    parts = [f"{record['stage']} epoch {record['epoch']}", f"loss {record.get('train_loss', float('nan')):.4f}",
             f"{record['train_img_s']:.0f} img/s"]
    if "top1" in record:
        parts.append(f"top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}")
    return "  ".join(parts)


def _start_fresh(run: Run) -> None:
    """A run that does not resume: set an earlier run's checkpoints and log aside rather than mix with them."""
    if not run.env.is_main:
        return
    directory = run.out / "checkpoints"
    moved = [ckpt.set_aside(directory)] if ckpt.list_checkpoints(directory) else []
    if (run.out / "metrics.jsonl").is_file():
        moved.append(ckpt.set_aside(run.out / "metrics.jsonl"))
    if moved:
        run.log(f"{run.out} holds an earlier run; moved {', '.join(p.name for p in moved)} aside "
                "(to continue that run instead, pass --resume auto)")


def train(cfg: Config, resume: str | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run a config under the current torchrun environment (or as a single process).

    Raises Preempted after writing a checkpoint when a preemption signal arrives (the CLI exits with code 75).
    Under a torchrun restart (--max-restarts) the run resumes from the newest checkpoint even without --resume."""
    env = setup_distributed(cfg.run.device)
    log = log or (print if env.is_main else (lambda _msg: None))
    graceful = False
    try:
        with StopSignals(cfg.run.preemption_signals) as signals:
            run = setup_run(cfg, env, log)
            run.signals = signals
            if resume is None and restart_count() > 0:
                resume = "auto"
                log(f"torchrun restart {restart_count()}: resuming from the newest checkpoint in {run.out}")
            # None only for no --resume, or "auto" with no checkpoint yet; a missing file or folder raises.
            path = ckpt.resolve_resume(resume, run.out / "checkpoints") if resume else None
            if path is not None:
                restore(run, path)
            else:
                _start_fresh(run)
            summary = fit(run)
        graceful = True
        return summary
    except Preempted:
        graceful = True  # every rank stopped at the same step, past the same barrier
        raise
    except Exception as err:
        if env.distributed and is_peer_failure(err):
            # Give the launcher time to see the process that failed first (its error is the root cause to report);
            # torchrun stops this one meanwhile. Our signal handlers are already restored, so that ends it at once.
            time.sleep(5.0)
            raise PeerFailure(f"rank {env.rank} stopped because another process of the run failed first; its error "
                              "is the one to read (torchrun prints it as the root cause)") from err
        raise
    finally:
        cleanup_distributed(graceful)
