"""One-shot GPU check of the DALI input path: 'mixed' (GPU) against 'cpu' on the same files, the loader contract
on the GPU, and a throughput sweep. Writes OUT/gpu_check_dali.json and exits nonzero if a check fails.

    # on a GPU machine without package access, with a DALI install packed as an xz tar split in DIR/p*/part.N:
    python scripts/gpu_check_dali.py --out /tmp/gpu-check --dali-parts .device-dali
    python scripts/gpu_check_dali.py --out /tmp/gpu-check --root /data/imagenet --steps 50
    python scripts/gpu_check_dali.py --out /tmp/dry --dry --synth 64      # CPU only: 'cpu' stands in for 'mixed'

Checks:
  val_parity      the val pipeline (resize, center crop, normalize) on 'mixed' vs 'cpu': same labels and sample
                  count, max and mean |difference| of the normalized pixels (nvJPEG vs libjpeg-turbo decoding and
                  float16 output make them differ slightly; mean < 0.02 ≈ 1 grey level passes)
  train_contract  one 'mixed' train batch: float16 on the GPU, (B, 3, S, S) channels-last view of NHWC memory,
                  int64 labels on the GPU, finite values, the same batch again for the same epoch
  throughput      bench_loader's sweep: 'mixed' over threads × hw_decoder_load, 'cpu' over threads
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastfit.console import setup_logging

PARITY_MEAN_LIMIT = 0.02  # normalized units: ≈1 grey level of 255 at std 0.225


def ensure_dali(parts_dir: str | None) -> None:
    """Import DALI, unpacking a packed install (an xz tar split in DIR/p*/part.N) onto sys.path first when it is not
    installed."""
    try:
        import nvidia.dali  # noqa: F401

        return
    except ImportError:
        if not parts_dir:
            raise SystemExit(
                "NVIDIA DALI is not importable; pass --dali-parts DIR (a packed install) or pip install fastfit[dali]"
            ) from None
    parts = sorted(glob.glob(os.path.join(parts_dir, "*", "part.*")), key=lambda p: int(p.rsplit(".", 1)[1]))
    if not parts:
        raise SystemExit(f"--dali-parts {parts_dir}: no */part.N files (expected p1/part.0, p2/part.1, …)")
    target = Path(tempfile.mkdtemp(prefix="fastfit-dali-"))
    cat = subprocess.Popen(["cat", *parts], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-xJf", "-", "-C", str(target)], stdin=cat.stdout, check=True)
    cat.wait()
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = f"{target}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # for any child process
    import nvidia.dali  # noqa: F401


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_loader", Path(__file__).with_name("bench_loader.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(device: torch.device):
    from fastfit.dist import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def val_parity(cfg, root: Path, batch: int, gpu: torch.device) -> dict:
    from fastfit.data.dali_backend import build_dali_loaders

    _, gpu_val, _ = build_dali_loaders(cfg, _env(gpu), root, batch_size=batch, seed=0, channels_last=True)
    _, cpu_val, _ = build_dali_loaders(
        cfg, _env(torch.device("cpu")), root, batch_size=batch, seed=0, channels_last=True
    )
    samples, max_diff, total_diff, values, labels_equal = 0, 0.0, 0.0, 0, True
    for (a, la), (b, lb) in zip(gpu_val, cpu_val, strict=True):
        diff = (a.float().cpu() - b).abs()
        labels_equal &= torch.equal(la.cpu(), lb)
        samples += len(la)
        max_diff = max(max_diff, diff.max().item())
        total_diff += diff.sum().item()
        values += diff.numel()
    mean_diff = total_diff / max(1, values)
    ok = labels_equal and samples == gpu_val.num_samples == cpu_val.num_samples and mean_diff < PARITY_MEAN_LIMIT
    return {
        "samples": samples,
        "labels_equal": labels_equal,
        "max_abs_diff": max_diff,
        "mean_abs_diff": mean_diff,
        "mean_limit": PARITY_MEAN_LIMIT,
        "ok": ok,
    }


def train_contract(cfg, root: Path, batch: int, gpu: torch.device) -> dict:
    from fastfit.data.dali_backend import build_dali_loaders

    train, _, _ = build_dali_loaders(cfg, _env(gpu), root, batch_size=batch, seed=0, channels_last=True)
    images, labels = next(train.epoch(0))
    again, _ = next(train.epoch(0))
    expected_dtype = torch.float16 if gpu.type == "cuda" else torch.float32
    checks = {
        "dtype": str(images.dtype) == str(expected_dtype),
        "device": images.device.type == gpu.type and labels.device.type == gpu.type,
        "shape": tuple(images.shape) == (batch, 3, cfg.image_size, cfg.image_size),
        "channels_last": images.is_contiguous(memory_format=torch.channels_last),
        "labels_int64": labels.dtype == torch.int64 and tuple(labels.shape) == (batch,),
        "finite": bool(torch.isfinite(images).all()),
        "normalized_range": bool(images.abs().max() < 10),
        "same_epoch_same_batch": torch.equal(images, again),
    }
    return {"checks": checks, "dtype": str(images.dtype), "device": str(images.device), "ok": all(checks.values())}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check_dali.json")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--root", help="dataset folder holding train/ and val/ class folders")
    source.add_argument(
        "--synth",
        type=int,
        default=None,
        help="else: write this many synthetic train JPEGs; default 8192 (32 steps of 256 per epoch: "
        "the per-epoch pipeline build stays a small share of each timed window), 64 with --dry",
    )
    p.add_argument("--dry", action="store_true", help="no GPU: run every code path with the 'cpu' pipeline")
    p.add_argument(
        "--dali-parts", default=None, help="a packed DALI install (DIR/p*/part.N), unpacked if DALI is not installed"
    )
    p.add_argument("--batch", type=int, default=None, help="default 256 (4 with --dry)")
    p.add_argument("--image-size", type=int, default=None, help="default 224 (8 with --dry)")
    p.add_argument("--val-resize", type=int, default=None, help="default 256 (0 with --dry)")
    p.add_argument("--threads", default="4,8,16")
    p.add_argument("--hw-loads", default="0.65,0.9")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    ensure_dali(args.dali_parts)
    from fastfit.config import DataConfig
    from fastfit.perf.measure import write_results

    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry to exercise the code paths on the CPU")
    gpu = torch.device("cpu") if args.dry else torch.device("cuda", torch.cuda.current_device())
    batch = args.batch or (4 if args.dry else 256)
    size = args.image_size or (8 if args.dry else 224)
    val_resize = args.val_resize if args.val_resize is not None else (0 if args.dry else 256)
    bench = _bench_module()
    if args.root:
        root = Path(args.root).expanduser()
    else:
        from fastfit.data.synth import write_synthetic_imagenet

        root = Path(args.out) / "synth"
        count = args.synth or (64 if args.dry else 8192)
        write_synthetic_imagenet(root, n_train=count, n_classes=16, n_val=max(16, count // 16))
    cfg = DataConfig(root=str(root), image_size=size, val_resize=val_resize, dali_threads=8, workers=0)
    report = {"dry": args.dry, "root": str(root), "batch": batch, "image_size": size, "val_resize": val_resize}
    report["val_parity"] = val_parity(cfg, root, batch, gpu)
    print(f"val parity ({'cpu vs cpu, dry' if args.dry else 'mixed vs cpu'}): {report['val_parity']}", flush=True)
    report["train_contract"] = train_contract(cfg, root, batch, gpu)
    print(f"train contract: {report['train_contract']}", flush=True)
    threads, hw_loads = bench._ints(args.threads), bench._floats(args.hw_loads)
    backends = ["dali-cpu"] if args.dry else ["dali-mixed", "dali-cpu"]
    report["throughput"] = bench.sweep(root, backends, batch, size, args.warmup, args.steps, threads, hw_loads, [])
    path = write_results(Path(args.out) / "gpu_check_dali.json", report)
    ok = report["val_parity"]["ok"] and report["train_contract"]["ok"]
    print(f"{'all checks passed' if ok else 'CHECK FAILED'}; results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
