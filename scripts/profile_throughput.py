"""Throughput profiling of a training step (same arguments as `fastfit profile`):

    python scripts/profile_throughput.py --config fitnets_r50_r18_in1k data.root=/data/synth --ablate \
        --json docs/results/throughput_h200.json

Reports naive baseline, end-to-end from JPEGs, compute-only, teacher/student alone, loader alone, the loader-wait
fraction, a per-phase breakdown, peak memory and first-step (compile) time; --ablate flips each speed switch
in turn and sweeps the loader thread counts; --trace-steps N writes a torch.profiler trace. Under torchrun,
every rank measures and rank 0 reports.
"""

import sys

from fastfit.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
