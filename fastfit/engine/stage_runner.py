"""One stage of training: its modules (student taps + connectors + losses, the teacher's taps), optimizer and
schedule tables, the training step, and an epoch of steps with the checks, logs and checkpoints between them."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastfit.distill.stage_model import StageModel, TeacherModel
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.faults import fault_from_env
from fastfit.engine.meters import NO_TIMER, LossMeter, PhaseTimer, Throughput
from fastfit.engine.nonfinite import NonFiniteGuard, prime_momentum
from fastfit.engine.optimizer import build_optimizer
from fastfit.engine.preemption import StopAgreement, raise_preempted
from fastfit.engine.run_state import Position, Run, step_seed
from fastfit.engine.schedules import kd_weight, learning_rate

logger = logging.getLogger(__name__)


class StageRunner:
    """The modules, optimizer and schedule tables of one stage."""

    def __init__(self, run: Run, index: int):
        cfg, rt = run.cfg, run.rt
        self.run = run
        self.index = index
        self.stage = run.stages[index]
        self.model = StageModel(
            cfg, self.stage, run.student, run.connectors, fused_kd=rt.fused_kernels, fused_hint=rt.fused_kernels
        )
        self.teacher = TeacherModel(run.teacher, cfg.recipe.hints, self.stage) if self.stage.uses_teacher else None
        # Skipping a step on the device (run.nonfinite = "skip") needs an optimizer taking `found_inf`.
        self.optimizer = build_optimizer(
            self.model.named_parameters(), cfg.optim, rt, needs_found_inf=cfg.run.nonfinite == "skip"
        )
        prime_momentum(self.optimizer)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
        self.guard = NonFiniteGuard(cfg.run.nonfinite, rt.fp16, rt.device, [run.student, run.connectors])
        self.agreement = StopAgreement(run.env, run.signals)
        self.fault = fault_from_env(run.env.rank)
        self.meter = LossMeter()
        self.epoch_meter = LossMeter()
        self._checked = 0  # global step of the last non-finite check
        wrapped: nn.Module = self.model
        if run.env.distributed:
            # Every parameter of a stage model is used at every step (the recipes need no find_unused_parameters),
            # so the graph is static; gradients are views into the all-reduce buckets (no copy).
            wrapped = DistributedDataParallel(
                self.model,
                device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                static_graph=True,
            )
        self.step_fn = torch.compile(wrapped, mode=rt.compile_mode) if rt.compile else wrapped
        self.teacher_fn = None
        if self.teacher is not None:
            self.teacher_fn = torch.compile(self.teacher, mode=rt.compile_mode) if rt.compile else self.teacher
        self.steps_per_epoch = run.data.train.steps_per_epoch
        if cfg.run.max_steps_per_epoch > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.run.max_steps_per_epoch)
        total = max(1, self.stage.epochs * self.steps_per_epoch)
        # λ for every step of the stage, on the device: the step indexes it, so nothing is copied per step.
        kd_cfg = cfg.recipe.kd
        self.kd_lams = [kd_weight(kd_cfg, s / total) if kd_cfg else 0.0 for s in range(total)]  # host copy: logs
        self.kd_weights = torch.tensor(self.kd_lams, dtype=torch.float32, device=rt.device)

    def state_dict(self) -> dict[str, Any]:
        """This stage's part of a checkpoint: optimizer, GradScaler and this rank's partial loss sums (they differ
        per rank; checkpoint.save gathers them, LossMeter.read averages them over ranks)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "optimizer_stage": self.index,
            "scaler": self.scaler.state_dict(),
            "meters": {"interval": self.meter.state_dict(), "epoch": self.epoch_meter.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written during this stage (or at its end). `state["meters"]` holds one entry
        per rank of the run that wrote it; they only matter mid-epoch (an epoch's first step resets the meters)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.run.cfg.run.nonfinite == "skip":
            for group in self.optimizer.param_groups:  # a checkpoint of a "stop" run carries fused=False
                group["fused"] = True
                group["foreach"] = None
        self.scaler.load_state_dict(state["scaler"])
        per_rank = state["meters"]
        env = self.run.env
        if len(per_rank) != env.world_size and state["position"]["step"] > 0:
            logger.info(
                "note: the checkpoint was written by %d processes, this run has %d; this epoch's logged means "
                "continue from rank 0's partial sums",
                len(per_rank),
                env.world_size,
            )
        saved = per_rank[env.rank if len(per_rank) == env.world_size else 0]
        self.meter.load_state_dict(saved["interval"], self.run.rt.device)
        self.epoch_meter.load_state_dict(saved["epoch"], self.run.rt.device)

    @property
    def total_steps(self) -> int:
        return len(self.kd_lams)

    def teacher_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.teacher_fn is None:
            return {}
        with self.run.rt.autocast():
            return self.teacher_fn(self.run.rt.model_input(images))

    def train_step(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        index: int,
        timer: PhaseTimer = NO_TIMER,
        teacher_out: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One optimizer step at step `index` of the stage, without a host sync: the loss terms (device tensors)
        and whether the update was applied. `teacher_out` replaces the teacher's forward (profiling)."""
        images = self.run.rt.model_input(images)
        with timer.phase("teacher_forward"):
            if teacher_out is None:
                teacher_out = self.teacher_outputs(images)
        self.guard.before_forward()
        with timer.phase("student_forward_losses"), self.run.rt.autocast():
            loss, terms, _ = self.step_fn(images, labels, teacher_out, self.kd_weights[index])
        terms = {"loss": loss, **terms}
        self.guard.observe(terms)
        with timer.phase("backward_allreduce" if self.run.env.distributed else "backward"):
            self.scaler.scale(loss).backward()
        with timer.phase("optimizer"):
            applied = self.guard.step(self.optimizer, self.scaler)
            self.optimizer.zero_grad(set_to_none=True)
        return terms, applied

    def train_one_epoch(self, epoch: int, start_step: int) -> dict[str, float]:
        """Steps start_step… of `epoch`; raises Preempted (after a checkpoint) or NonFiniteError at a step end."""
        run, cfg, rt = self.run, self.run.cfg, self.run.rt
        self.model.train()
        if start_step == 0:
            self.meter = LossMeter()
            self.epoch_meter = LossMeter()
        self._checked = run.position.global_step
        speed = Throughput()
        global_batch = run.data.train.batch_size * run.env.world_size
        bar = None
        if run.env.is_main and cfg.run.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                initial=start_step,
                leave=False,
                dynamic_ncols=True,
                desc=f"{self.stage.name} {epoch + 1}/{self.stage.epochs}",
            )
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
                terms, applied = self.train_step(images, labels, index)
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
            run.skipped_steps = self.guard.settle(
                counts,
                f"stage {self.stage.name} epoch {epoch + 1}",
                self._checked + 1,
                global_step,
                run.skipped_steps,
            )
            self._checked = global_step
        if log_now:
            values = self.guard.unmask(self.meter.read(env=run.env))
            record = {
                "stage": self.stage.name,
                "epoch": epoch,
                "step": step + 1,
                "global_step": global_step,
                "lr": lr,
                **({"kd_weight": lam} if self.stage.use_kd else {}),
                "img_s": speed.rate(),
                **values,
            }
            if cfg.run.nonfinite == "skip":
                record["skipped_steps"] = run.skipped_steps
            run.metrics.emit(record)
            if bar is not None:
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{record['img_s']:.0f}")
        if checkpoint_now or preempt:
            self.save()
        if preempt:
            self.stop_for_preemption()

    def save(self) -> None:
        """A checkpoint at the run's position (every rank calls it; rank 0 writes)."""
        ckpt.save(self.run, self.state_dict())

    def stop_for_preemption(self) -> None:
        """After save(): wait for rank 0's checkpoint on every rank, then raise Preempted."""
        run = self.run
        checkpoint = ckpt.checkpoint_path(run.out / "checkpoints", run.position.global_step)
        raise_preempted(run.env, run.signals, checkpoint, run.position)
