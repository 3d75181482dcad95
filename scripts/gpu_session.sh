#!/usr/bin/env bash
# Everything a GPU session (one H100/H200, 15 minutes of device time) checks and times, in one run of about
# 9 minutes, from a source checkout (no install needed). Results land in $OUT:
#   session.log          everything printed, with each part's exit code and duration
#   bench_kernels.json   fused KD / hint ops vs eager and torch.compile at the real shapes (CUDA events)
#   gpu_check_dali.json  DALI 'mixed' vs 'cpu' on the same files and the loader sweep (only if DALI imports)
#   throughput.json      R50 → R18 MMRazor recipe at batch 256 from JPEGs: naive, end to end, compute only, parts
# Each part has its own time limit, so one slow part cannot starve the rest. Copy the JSON files into
# docs/results/ afterwards (they record the card, versions and commit).
#
#   OUT=/tmp/out bash scripts/gpu_session.sh                 # DALI on PYTHONPATH first, if wanted
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastfit-gpu-session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SYNTH=${SYNTH:-/tmp/fastfit-synth}

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  start=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || echo "(no git metadata)"

  # 1. Correctness of both fused ops on CUDA (the same tests CI runs through the interpreter), real shapes included.
  part kernel-tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kd_kernel.py tests/test_hint_kernel.py

  # 2. Microbenchmarks at the issue's shapes: KD 256/8192 × 1000/21843; hint layer4 and layer3 at batch 256, bf16.
  part kernel-bench 150 python3 scripts/bench_kernels.py --json "$OUT/bench_kernels.json"

  # 3. ImageNet-like JPEGs (about 500×375, ~80 KB): 50 steps of 256 images, 1000 classes.
  part synth 90 python3 -m fastfit.cli data synth "$SYNTH" --n 12800 --classes 1000 --val 1000 --workers 16

  # 4. DALI, when it was carried in: mixed vs cpu pixels on the val path, then the loader sweep.
  if python3 -c "import nvidia.dali" 2>/dev/null; then
    part dali 100 python3 scripts/gpu_check_dali.py --root "$SYNTH" --out "$OUT"
  else
    echo "== dali: not importable here, skipped (put an unpacked DALI install on PYTHONPATH to include it)"
  fi

  # 5. Throughput of the headline recipe, every section in one run (the teacher is random: no downloads there).
  part profile 240 python3 scripts/profile_throughput.py --config fitnets_r50_r18_in1k "data.root=\"$SYNTH\"" \
      'model.teacher_weights=""' data.workers=12 'run.output_dir="/tmp/fastfit-profile"' run.progress=false \
      --steps 30 --warmup 10 --json "$OUT/throughput.json"
} 2>&1 | tee "$OUT/session.log"
