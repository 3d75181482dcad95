"""Loader-only throughput (img/s) of DALI 'mixed', DALI 'cpu' and torchvision over the same image folder, in one run.

    python scripts/bench_loader.py --root /data/imagenet --threads 4,8,16 --hw-loads 0.65,0.9 --workers 8,16
    python scripts/bench_loader.py --synth 4096            # writes a synthetic ImageNet-like folder first

Each configuration builds the training loader exactly as a run would (random-resized-crop, flip, normalize,
per-rank batch), pulls `--warmup` batches (pipeline start, first allocations), then times `--steps` batches
with a device sync only at the window's edges. Batches land on the GPU when there is one (DALI 'cpu' and
torchvision batches are copied there, as the trainer would). 'mixed' runs only with CUDA. Results: a table on
stdout and a JSON (fastfit.perf.measure.write_results) with the environment beside the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fastfit.config import DataConfig
from fastfit.console import setup_logging
from fastfit.dist import DistEnv
from fastfit.perf.measure import format_table, write_results

COLUMNS = ["backend", "threads", "hw_decoder_load", "workers", "batch", "images", "seconds", "img_per_s"]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def batches(train, count: int, first_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`count` consecutive training batches, running into the following epochs when one is not enough."""
    epoch = first_epoch
    while count > 0:
        for batch in train.epoch(epoch):
            yield batch
            count -= 1
            if count == 0:
                return
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: only at the edges of the timed window


def _target() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build(backend: str, root: Path, batch: int, image_size: int, workers: int = 0):
    """The training loader a run would build (rank 0 of 1). DALI loaders are built once per backend: the sweep
    changes their pipeline spec between configurations (pipelines are built per epoch from it), which spares a
    re-listing and re-check of the files for each one."""
    loader_device = _target() if backend in ("dali-mixed", "torchvision") else torch.device("cpu")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=loader_device)
    cfg = DataConfig(root=str(root), image_size=image_size, workers=workers)
    if backend.startswith("dali"):
        from fastfit.data.dali_backend import build_dali_loaders

        return build_dali_loaders(cfg, env, root, batch_size=batch, seed=0, channels_last=True)[0]
    from fastfit.data.torchvision_backend import build_torchvision_loaders

    return build_torchvision_loaders(cfg, env, root, batch_size=batch, seed=0, channels_last=True)[0]


def measure(train, warmup: int, steps: int) -> float:
    """Seconds for `steps` batches after `warmup` untimed ones, delivered to the GPU when there is one."""
    target = _target()
    stream = batches(train, warmup + steps)
    for _ in range(warmup):
        next(stream)
    _sync(target)
    start = time.perf_counter()
    for images, _ in stream:
        images.to(target, non_blocking=True)  # a no-op when the loader already delivers there
    _sync(target)
    return time.perf_counter() - start


def sweep(
    root: Path,
    backends: list[str],
    batch: int,
    image_size: int,
    warmup: int,
    steps: int,
    threads: list[int],
    hw_loads: list[float],
    workers: list[int],
) -> list[dict]:
    rows = []
    for backend in backends:
        if backend == "dali-mixed" and not torch.cuda.is_available():
            print("skipping dali-mixed: no CUDA device")
            continue
        if backend == "torchvision":
            configs = [dict(workers=w) for w in workers]
        else:
            train = build(backend, root, batch, image_size)
            loads = hw_loads if backend == "dali-mixed" else [None]
            configs = [dict(threads=t, hw_decoder_load=h) for t in threads for h in loads]
        for config in configs:
            if backend == "torchvision":
                train = build(backend, root, batch, image_size, workers=config["workers"])
            else:
                train.spec = dataclasses.replace(
                    train.spec, threads=config["threads"], hw_decoder_load=config["hw_decoder_load"] or 0.0
                )
            seconds = measure(train, warmup, steps)
            rows.append(
                {
                    "backend": backend,
                    "threads": config.get("threads"),
                    "hw_decoder_load": config.get("hw_decoder_load"),
                    "workers": config.get("workers"),
                    "batch": batch,
                    "images": steps * batch,
                    "seconds": seconds,
                    "img_per_s": steps * batch / seconds,
                    "device": str(_target()),
                }
            )
            settings = " ".join(f"{k}={v}" for k, v in config.items() if v is not None)
            print(f"  {backend:<11} {settings:<32} {rows[-1]['img_per_s']:>10,.0f} img/s", flush=True)
    return rows


def dataset(args) -> Path:
    if args.root:
        return Path(args.root).expanduser()
    from fastfit.data.synth import write_synthetic_imagenet

    folder = Path(tempfile.mkdtemp(prefix="fastfit-synth-"))
    # Loaders list val/ too: one image per class is enough there.
    summary = write_synthetic_imagenet(folder, n_train=args.synth, n_classes=args.classes, n_val=args.classes)
    print(f"synthetic set: {summary.train_files} JPEGs, {summary.mean_kb:.0f} KB each, in {folder}")
    return folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", help="dataset folder holding train/<class>/<images>")
    source.add_argument("--synth", type=int, help="write this many synthetic training JPEGs to a temp folder")
    p.add_argument("--classes", type=int, default=100, help="classes of the synthetic set")
    p.add_argument("--backends", default="dali-mixed,dali-cpu,torchvision")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=_ints, default=[4, 8, 16], help="DALI threads to sweep")
    p.add_argument("--hw-loads", type=_floats, default=[0.65, 0.9], help="hw_decoder_load values ('mixed' only)")
    p.add_argument("--workers", type=_ints, default=[8, 16], help="torchvision DataLoader workers to sweep")
    p.add_argument("--out", default="docs/results/bench_loader.json")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    setup_logging()
    root = dataset(args)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - {"dali-mixed", "dali-cpu", "torchvision"})
    if unknown:
        raise SystemExit(f"--backends: expected names from dali-mixed, dali-cpu, torchvision, got {unknown[0]!r}")
    rows = sweep(
        root, backends, args.batch, args.image_size, args.warmup, args.steps, args.threads, args.hw_loads, args.workers
    )
    print(format_table(rows, COLUMNS))
    path = write_results(
        args.out,
        {
            "benchmark": "loader",
            "root": str(root),
            "image_size": args.image_size,
            "warmup": args.warmup,
            "steps": args.steps,
            "results": rows,
        },
    )
    print(f"results written to {path}")
    return rows


if __name__ == "__main__":
    main()
