"""The one training loop every entry point uses: setup → (per stage) train_one_epoch → evaluate → save.

Reproducibility by construction: data order and augmentation are functions of (seed, epoch, index), and the
global RNG (dropout) is reseeded from (seed, rank, global step) before every step, so a run resumed from any
checkpoint — an epoch boundary or mid-epoch — continues exactly as the uninterrupted run would have. Mid-epoch
checkpoints also hold the partial loss meters, so logged means and epoch summaries match the uninterrupted run.

Losing nothing (docs/reliability.md): a preemption signal stops the run after the step with a checkpoint (exit
code 75); non-finite losses stop the run or are skipped (run.nonfinite); run.checkpoint_every_steps adds mid-epoch
checkpoints; a torchrun restart resumes from the newest checkpoint; a fresh run sets an earlier run's checkpoints
aside instead of mixing with them; a folder holds one live run (run_lock) and one line of checkpoints (lineage).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastfit.config import Config
from fastfit.dist import (
    DistEnv,
    cleanup_distributed,
    control_barrier,
    is_peer_failure,
    is_peer_timeout,
    restart_count,
    setup_distributed,
    unresponsive_ranks,
)
from fastfit.engine import checkpoint as ckpt
from fastfit.engine.evaluate import evaluate
from fastfit.engine.lineage import continue_lineage
from fastfit.engine.preemption import StopSignals
from fastfit.engine.run_lock import RunFolderLock
from fastfit.engine.run_state import Position, Run
from fastfit.engine.setup import restore, setup_run, start_fresh, write_config
from fastfit.engine.stage_runner import StageRunner
from fastfit.errors import PeerFailure, PeerUnresponsive, Preempted

logger = logging.getLogger(__name__)


def train(cfg: Config, resume: str | None = None) -> dict[str, Any]:
    """Train a config under the current torchrun environment (or as a single process).

    Args:
        cfg: the resolved config (fastfit.config.load_config).
        resume: None for a fresh run; "auto" for the newest checkpoint in run.output_dir (a fresh run if there is
            none); or a checkpoint file or run folder. Under a torchrun restart (--max-restarts) the run resumes
            from the newest checkpoint even when this is None.

    Returns:
        The run summary (also written to run.output_dir/summary.json): parameters, teacher and final metrics, the
        per-epoch history, wall time, world size and data backend.

    Raises:
        FastfitError: a bad config, dataset, model or checkpoint (the message names it and the fix).
        Preempted: a preemption signal stopped the run after writing a checkpoint (the CLI exits with code 75).
        NonFiniteError: a loss became NaN/Inf under run.nonfinite = "stop".
        PeerFailure: this rank stopped because another process of the run failed first.
    """
    env = setup_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    graceful = False
    # One live run per folder: rank 0 writes it, so its lock is the run's (released by the kernel if it dies).
    lock = RunFolderLock(cfg.run.output_dir) if env.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        with StopSignals(cfg.run.preemption_signals) as signals:
            run = setup_run(cfg, env)
            run.signals = signals
            if resume is None and restart_count() > 0:
                resume = "auto"
                logger.info("torchrun restart %d: resuming from the newest checkpoint in %s", restart_count(), run.out)
            # None only for no --resume, or "auto" with no checkpoint yet; a missing file or folder raises.
            path = ckpt.resolve_resume(resume, run.out / "checkpoints") if resume else None
            if path is not None:
                changes = restore(run, path)
                control_barrier(env)  # every rank has read the checkpoint before rank 0 moves any file
                continue_lineage(run, path, changes)
            else:
                start_fresh(run)
            write_config(run)  # only now: a refused resume leaves the run's config.toml as it was
            summary = fit(run)
        graceful = True
        return summary
    except Preempted:
        graceful = True  # every rank stopped at the same step, past the same barrier
        raise
    except Exception as err:
        if env.distributed and is_peer_timeout(err):
            raise _unresponsive(env, cfg.run.collective_timeout_s) from err
        if env.distributed and is_peer_failure(err):
            # Give the launcher time to see the process that failed first (its error is the root cause to report);
            # torchrun stops this one meanwhile. Our signal handlers are already restored, so that ends it at once.
            time.sleep(5.0)
            raise PeerFailure(
                f"rank {env.rank} stopped because another process of the run failed first; its error "
                "is the one to read (torchrun prints it as the root cause)"
            ) from err
        raise
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed(graceful)


def _unresponsive(env: DistEnv, timeout_s: float) -> PeerUnresponsive:
    """The error for a collective that timed out, naming the ranks that did not answer the roll call after it."""
    missing = unresponsive_ranks(env, wait_s=min(timeout_s, 5.0))  # ranks in the same collective time out together
    waited = f"rank {env.rank} waited {timeout_s:g} s (run.collective_timeout_s) in a collective"
    if missing is None:
        return PeerUnresponsive(
            f"{waited} and the rendezvous store did not answer either: the process hosting it (rank 0, unless "
            "torchrun's agent hosts it) has stopped responding; inspect it (e.g. py-spy dump --pid PID)"
        )
    if not missing:
        return PeerUnresponsive(
            f"{waited} that every rank answered a roll call after: the ranks waited in different collectives; "
            "report this with every rank's log"
        )
    ranks = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
    return PeerUnresponsive(
        f"{ranks} stopped responding: {waited} that it never joined; it is stopped, hung or far slower than the "
        f"others — inspect it (e.g. py-spy dump --pid PID), or raise run.collective_timeout_s if its steps, "
        "evaluations or checkpoint writes are just that slow"
    )


def fit(run: Run) -> dict[str, Any]:
    """Train every remaining stage from run.position; returns the run summary (also written as summary.json)."""
    started = time.perf_counter()
    run.metrics.open()
    try:
        teacher_metrics = None
        if run.teacher is not None and run.cfg.model.teacher_weights:
            teacher_metrics = evaluate(run.teacher, run.data.val, run.rt, run.env)
            top1, top5 = teacher_metrics["top1"], teacher_metrics["top5"]
            logger.info("teacher %s: top-1 %.2f  top-5 %.2f", run.cfg.model.teacher, top1, top5)
        for index in range(run.position.stage, len(run.stages)):
            _train_stage(run, index)
        ckpt.export_student(run)
        summary = _summary(run, teacher_metrics, time.perf_counter() - started)
        if run.env.is_main:
            (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        run.metrics.close()


def _train_stage(run: Run, index: int) -> None:
    """The remaining epochs of stage `index`: train, evaluate, log, checkpoint — and stop when a rank was asked to."""
    runner = StageRunner(run, index)
    if run.restored is not None:
        if run.restored["optimizer_stage"] == index:
            runner.load_state_dict(run.restored)
        # A checkpoint at a stage boundary holds the finished stage's optimizer: the next stage starts afresh.
        run.restored = None
    stage = runner.stage
    first_epoch = run.position.epoch if run.position.stage == index else 0
    for epoch in range(first_epoch, stage.epochs):
        start_step = run.position.step if (run.position.stage, run.position.epoch) == (index, epoch) else 0
        run.position = Position(index, epoch, start_step, run.position.global_step)
        record: dict[str, Any] = {"stage": stage.name, "epoch": epoch + 1, **runner.train_one_epoch(epoch, start_step)}
        if not stage.truncated and ((epoch + 1) % run.cfg.run.eval_every == 0 or epoch + 1 == stage.epochs):
            record.update(evaluate(run.student, run.data.val, run.rt, run.env))
        run.history.append(record)
        done_stage = epoch + 1 == stage.epochs
        if done_stage:
            run.position = Position(index + 1, 0, 0, run.position.global_step)
        else:
            run.position = Position(index, epoch + 1, 0, run.position.global_step)
        # Logged before the checkpoint: a crash in between re-runs the epoch, and resuming drops the line.
        run.metrics.emit({"global_step": run.position.global_step, **record})
        runner.save()
        logger.info(_describe(record))
        finished = done_stage and index + 1 == len(run.stages)
        if not finished and runner.agreement.agree()[0]:  # a signal during evaluation or the save
            runner.stop_for_preemption()


def _summary(run: Run, teacher_metrics: dict[str, float] | None, wall_seconds: float) -> dict[str, Any]:
    cfg = run.cfg
    return {
        "student": cfg.model.student,
        "teacher": cfg.model.teacher or None,
        "recipe": cfg.recipe.name,
        "student_params": sum(p.numel() for p in run.student.parameters()),
        "teacher_params": sum(p.numel() for p in run.teacher.parameters()) if run.teacher is not None else None,
        "teacher_metrics": teacher_metrics,
        "final": next((h for h in reversed(run.history) if "top1" in h), None),
        "history": run.history,
        "wall_seconds": wall_seconds,
        "world_size": run.env.world_size,
        "backend": run.data.backend,
    }


def _describe(record: dict[str, Any]) -> str:
    parts = [
        f"{record['stage']} epoch {record['epoch']}",
        f"loss {record.get('train_loss', float('nan')):.4f}",
        f"{record['train_img_s']:.0f} img/s",
    ]
    if "top1" in record:
        parts.append(f"top-1 {record['top1']:.2f} top-5 {record['top5']:.2f}")
    return "  ".join(parts)
