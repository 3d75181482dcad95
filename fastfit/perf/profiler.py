"""Throughput profiling: what one training step costs and where the time goes, in one run on one device.

Sections (each reported as images/second and as a ratio to the naive baseline):
  naive         fp32, eager, NCHW, reference losses, plain SGD, torchvision CPU DataLoader — the usual starting point
  end_to_end    fastfit as configured, from JPEG files to updated weights
  compute_only  the same step on one batch that stays on the device (no loading)
  teacher_only  the teacher's forward alone;  student_only  the student's step with fixed teacher outputs
  loader_only   the input pipeline alone
plus the loader-wait fraction of end-to-end steps, a per-phase breakdown from CUDA events (wall clock on CPU),
peak memory, first-step (compile) time, an ablation table (each speed switch flipped in turn and the loader
thread counts swept: the measurements behind `auto`) and optionally a torch.profiler trace.
Timed windows sync only at their edges.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastfit.config import Config, config_from_dict
from fastfit.data.auto import cpus_per_rank, dali_importable, resolve_backend, resolve_dali_threads, resolve_workers
from fastfit.dist import DistEnv, cleanup_distributed, setup_distributed
from fastfit.engine.meters import PhaseTimer
from fastfit.engine.run_state import Run
from fastfit.engine.runtime import resolve_runtime
from fastfit.engine.setup import setup_run
from fastfit.engine.stage_runner import StageRunner
from fastfit.errors import ConfigError
from fastfit.perf.measure import environment, format_table, write_results

logger = logging.getLogger(__name__)

SECTIONS = ("naive", "end_to_end", "compute_only", "teacher_only", "student_only", "loader_only")

# The switches the ablation flips one at a time: name → (overrides that turn it off, overrides that turn it on).
# A switch that is on is timed without it; one that `auto` left off is timed with it, so the choice `auto` makes on
# each device type rests on a measurement either way.
SWITCHES: dict[str, tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]] = {
    "bf16 autocast": ({"run": {"amp": "off"}}, {"run": {"amp": "bf16"}}),
    "channels-last": ({"run": {"channels_last": False}}, {"run": {"channels_last": True}}),
    "torch.compile": ({"run": {"compile": False}}, {"run": {"compile": True}}),
    "CUDA graphs": ({"run": {"cuda_graphs": False}}, {"run": {"compile": True, "cuda_graphs": True}}),
    "fused Triton losses": ({"run": {"fused_kernels": False}}, {"run": {"fused_kernels": True}}),
    "fused optimizer": ({"optim": {"fused": False}}, {"optim": {"fused": True}}),
    "DALI": ({"data": {"backend": "torchvision"}}, {"data": {"backend": "dali"}}),
}
# The loader thread counts the ablation sweeps, each with the backend that reads it.
SWEEPS = {"dali_threads": "dali", "workers": "torchvision"}
LOADER_THREADS = "loader threads"
ABLATIONS = (*SWITCHES, LOADER_THREADS)
NAIVE = {
    "run": {"amp": "off", "channels_last": False, "compile": False, "cuda_graphs": False, "fused_kernels": False},
    "optim": {"fused": False},
    "data": {"backend": "torchvision"},
}


def with_overrides(cfg: Config, changes: dict[str, dict[str, Any]]) -> Config:
    tree = copy.deepcopy(cfg.to_dict())
    for section, values in changes.items():
        for key, value in values.items():
            if key in tree[section]:
                tree[section][key] = value
    return config_from_dict(tree)


def _effective(cfg: Config, env: DistEnv) -> tuple:
    """What a config actually runs with on this device ("auto" resolved), to tell whether a switch changes anything."""
    backend = resolve_backend(cfg.data, env)
    threads = resolve_dali_threads(cfg.data) if backend == "dali" else resolve_workers(cfg.data)
    return resolve_runtime(cfg, env.device), backend, threads


def _unavailable(switch: str, cfg: Config, env: DistEnv) -> str | None:
    """Why a switch cannot be turned on here, or None."""
    if switch == "CUDA graphs" and env.device.type != "cuda":
        return "needs CUDA"
    if switch == "DALI" and not dali_importable():
        return "DALI is not installed"
    try:
        resolve_runtime(cfg, env.device)
    except ConfigError as err:
        return f"not available on this device ({err})"
    return None


def _sweep_values() -> list[int]:
    share = cpus_per_rank()
    return sorted({1, max(1, share // 2), share, min(2 * share, 16)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: the edges of a timed window


def _timed(fn: Callable[[int], Any], steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step over the window, seconds of the first call)."""
    _sync(device)
    start = time.perf_counter()
    fn(0)
    _sync(device)
    first = time.perf_counter() - start
    for i in range(1, warmup):
        fn(i)
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    _sync(device)
    return (time.perf_counter() - start) / steps, first


class Profiler:
    """Measures one config's sections on the current device; `stage` picks the recipe stage to profile."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        steps: int,
        warmup: int,
        stage: int | None = None,
    ):
        self.cfg = cfg
        self.env = env
        self.steps = steps
        self.warmup = warmup
        self.stage = stage
        self._built: tuple[Config, Run, StageRunner] | None = None

    def _build(self, cfg: Config) -> tuple[Run, StageRunner]:
        """The run and stage for `cfg`; sections of one config share them, so it is compiled once."""
        if self._built is not None and self._built[0] == cfg:
            return self._built[1], self._built[2]
        self._built = None  # let the previous config's modules and loaders go before building the next
        run = setup_run(cfg, self.env)
        index = len(run.stages) - 1 if self.stage is None else self.stage
        if not 0 <= index < len(run.stages):
            raise ConfigError(
                f"--stage {self.stage}: recipe {cfg.recipe.name} has {len(run.stages)} stage(s); give --stage 0"
                f"{f' to {len(run.stages) - 1}' if len(run.stages) > 1 else ''} or leave it out for the last"
            )
        self._built = (cfg, run, StageRunner(run, index))
        return run, self._built[2]

    def _batches(self, run: Run):
        """An endless stream of training batches, epoch after epoch."""
        epoch = 0
        while True:
            yield from run.data.train.epoch(epoch)
            epoch += 1

    def end_to_end(self, cfg: Config) -> dict[str, Any]:
        run, runner = self._build(cfg)
        batches = self._batches(run)
        window_start = max(1, self.warmup)
        wait = [0.0]

        def step(i: int) -> None:
            t0 = time.perf_counter()
            images, labels = next(batches)
            if i >= window_start:  # host time blocked on the loader, inside the timed window only
                wait[0] += time.perf_counter() - t0
            runner.train_step(images, labels, i % runner.total_steps)

        per_step, first = self._run_window(step, run)
        return {
            **self._rate(run, per_step),
            "first_step_s": first,
            "loader_wait_fraction": min(1.0, wait[0] / (per_step * self.steps)),
            **self._memory(run),
        }

    def compute_only(self, cfg: Config, phases: bool = True) -> dict[str, Any]:
        run, runner = self._build(cfg)
        images, labels = next(self._batches(run))
        per_step, first = self._run_window(lambda i: runner.train_step(images, labels, i % runner.total_steps), run)
        result = {**self._rate(run, per_step), "first_step_s": first, **self._memory(run)}
        if phases:
            timer = PhaseTimer(run.rt.device, enabled=True)
            for i in range(min(self.steps, 20)):
                runner.train_step(images, labels, i % runner.total_steps, timer=timer)
            result["phases_ms"] = timer.summary()
        return result

    def teacher_only(self, cfg: Config) -> dict[str, Any] | None:
        run, runner = self._build(cfg)
        if runner.teacher_fn is None:
            return None
        images, _ = next(self._batches(run))

        def forward(_i: int) -> None:
            with run.rt.autocast():
                runner.teacher_fn(images)

        per_step, first = self._run_window(forward, run)
        return {**self._rate(run, per_step), "first_step_s": first}

    def student_only(self, cfg: Config) -> dict[str, Any]:
        run, runner = self._build(cfg)
        images, labels = next(self._batches(run))
        fixed = runner.teacher_outputs(images)
        per_step, first = self._run_window(
            lambda i: runner.train_step(images, labels, i % runner.total_steps, teacher_out=fixed), run
        )
        return {**self._rate(run, per_step), "first_step_s": first}

    def loader_only(self, cfg: Config) -> dict[str, Any]:
        run, _ = self._build(cfg)
        batches = self._batches(run)
        per_step, first = self._run_window(lambda _i: next(batches), run)
        return {**self._rate(run, per_step), "first_step_s": first}

    def _run_window(self, fn: Callable[[int], Any], run: Run) -> tuple[float, float]:
        return _timed(fn, self.steps, max(1, self.warmup), run.rt.device)

    def _rate(self, run: Run, per_step: float) -> dict[str, float]:
        global_batch = run.data.train.batch_size * self.env.world_size
        return {"img_s": global_batch / per_step, "step_ms": per_step * 1e3}

    def _memory(self, run: Run) -> dict[str, float]:
        if run.rt.device.type != "cuda":
            return {}
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(run.rt.device) / 2**30}

    def trace(self, cfg: Config, steps: int, folder: Path) -> Path:
        """A torch.profiler trace of `steps` end-to-end steps, for TensorBoard's profiler plugin or Perfetto."""
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        run, runner = self._build(cfg)
        batches = self._batches(run)
        for i in range(max(1, self.warmup)):
            runner.train_step(*next(batches), i % runner.total_steps)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.rt.device.type == "cuda" else [])
        folder.mkdir(parents=True, exist_ok=True)
        # The TensorBoard handler writes a Chrome-trace JSON (also opens in Perfetto / chrome://tracing).
        with profile(activities=activities, on_trace_ready=tensorboard_trace_handler(str(folder))):
            for i in range(steps):
                runner.train_step(*next(batches), i % runner.total_steps)
        return max(folder.glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)


def profile_throughput(
    cfg: Config,
    steps: int = 50,
    warmup: int = 10,
    sections: tuple[str, ...] = SECTIONS,
    ablate: bool | tuple[str, ...] = False,
    trace_steps: int = 0,
    stage: int | None = None,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    env = setup_distributed(cfg.run.device)
    try:
        return _profile(cfg, env, steps, warmup, sections, ablate, trace_steps, stage, json_path)
    finally:
        cleanup_distributed()


def _profile(
    cfg: Config,
    env: DistEnv,
    steps: int,
    warmup: int,
    sections: tuple[str, ...],
    ablate: bool | tuple[str, ...],
    trace_steps: int,
    stage: int | None,
    json_path: str | Path | None,
) -> dict[str, Any]:
    profiler = Profiler(cfg, env, steps, warmup, stage)
    measures = {
        "naive": lambda: profiler.end_to_end(with_overrides(cfg, NAIVE)),
        "end_to_end": lambda: profiler.end_to_end(cfg),
        "compute_only": lambda: profiler.compute_only(cfg),
        "teacher_only": lambda: profiler.teacher_only(cfg),
        "student_only": lambda: profiler.student_only(cfg),
        "loader_only": lambda: profiler.loader_only(cfg),
    }
    results: dict[str, Any] = {}
    for name in sections:
        logger.info("measuring %s …", name)
        results[name] = measures[name]()
    report: dict[str, Any] = {
        "config": cfg.to_dict(),
        "steps": steps,
        "warmup": warmup,
        "world_size": env.world_size,
        "device": str(env.device),
        "sections": results,
    }
    naive = (results.get("naive") or {}).get("img_s")
    for value in results.values():
        if value and naive:
            value["x_naive"] = value["img_s"] / naive
    parts = [results.get(n) for n in ("teacher_only", "student_only")]
    if all(parts):
        report["sum_of_parts_img_s"] = 1.0 / sum(1.0 / p["img_s"] for p in parts)
    if ablate:
        only = None if ablate is True else set(ablate)
        report["ablation"] = _ablate(cfg, env, profiler, (results.get("end_to_end") or {}).get("img_s"), only)
    if trace_steps:
        report["trace"] = str(profiler.trace(cfg, trace_steps, Path(cfg.run.output_dir) / "profile_trace"))
    report["gpu"] = environment().get("gpu")
    report["end_to_end_img_s"] = (results.get("end_to_end") or {}).get("img_s")
    report["compute_only_img_s"] = (results.get("compute_only") or {}).get("img_s")
    report["naive_img_s"] = naive
    if env.is_main:
        logger.info("%s", format_report(report))
        if json_path:
            write_results(json_path, report)
            logger.info("wrote %s", json_path)
    return report


def _ablate(
    cfg: Config, env: DistEnv, profiler: Profiler, end_to_end: float | None, only: set[str] | None
) -> list[dict[str, Any]]:
    """End to end with each switch flipped in turn, then the loader thread counts (`only`: a subset of
    ABLATIONS); img/s also as a ratio to the configured run's end to end (measured in the same process)."""
    rows: list[dict[str, Any]] = []

    def measure(variant: str, changed: Config) -> None:
        logger.info("ablation: %s …", variant)
        row = {"variant": variant, **profiler.end_to_end(changed)}
        if end_to_end:
            row["x_end_to_end"] = row["img_s"] / end_to_end
        rows.append(row)

    for switch, (off, on) in SWITCHES.items():
        if only is not None and switch not in only:
            continue
        without = with_overrides(cfg, off)
        if _effective(without, env) != _effective(cfg, env):
            measure(f"without {switch}", without)
            continue
        with_it = with_overrides(cfg, on)
        why = _unavailable(switch, with_it, env)
        if why:
            rows.append({"variant": f"with {switch}", "note": why})
        elif _effective(with_it, env) == _effective(cfg, env):
            rows.append({"variant": f"with {switch}", "note": "no effect in this config on this device"})
        else:
            measure(f"with {switch}", with_it)
    for key, backend in SWEEPS.items():
        if (only is not None and LOADER_THREADS not in only) or (backend == "dali" and not dali_importable()):
            continue
        chosen = _effective(with_overrides(cfg, {"data": {"backend": backend}}), env)[2]
        for value in _sweep_values():
            variant = with_overrides(cfg, {"data": {"backend": backend, key: value}})
            mark = " (auto's choice)" if value == chosen else ""
            measure(f"{backend} data.{key}={value}{mark}", variant)
    return rows


def format_report(report: dict[str, Any]) -> str:
    rows = [
        {"section": name, **{k: v for k, v in value.items() if not isinstance(v, dict)}}
        for name, value in report["sections"].items()
        if value
    ]
    text = [
        format_table(
            rows, ["section", "img_s", "x_naive", "step_ms", "loader_wait_fraction", "first_step_s", "peak_mem_gb"]
        )
    ]
    if "sum_of_parts_img_s" in report:
        text.append(f"sum of parts (teacher forward + student step): {report['sum_of_parts_img_s']:,.1f} img/s")
    phases = (report["sections"].get("compute_only") or {}).get("phases_ms")
    if phases:
        text.append("per-phase (ms/step): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    if report.get("ablation"):
        text.append(
            format_table(
                report["ablation"],
                ["variant", "img_s", "x_end_to_end", "step_ms", "loader_wait_fraction", "first_step_s", "note"],
            )
        )
    return "\n".join(text)
