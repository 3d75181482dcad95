"""Ahead-of-time gate for the Triton kernels: compile every kernel × every config its launcher can pick at the real
shapes, for Hopper (sm_90a) and Ampere (sm_80), with no GPU, and check what ptxas and the compiled metadata say.

    python -m fastfit.perf.kernel_bench.aot [--json PATH] [--workers 2] [--probe]   # without TRITON_INTERPRET

1. Capture: the ops' launchers run on meta tensors at the real shapes with Triton's launch entry points replaced
   by a recorder (nothing executes), once per target (the launchers read the device's SM count, shared memory and
   capability; for meta tensors kernels.hint_loss_common.CAPTURE_* stand in). Autotuned kernels record the configs
   that survive the launcher's own prune hook: exactly the ones the autotuner could try on that GPU.
2. Compile: Triton's binder turns the recorded arguments into the signature, constexprs and alignment attributes a
   launch would compile with; triton.compile lowers them to PTX and cubin for GPUTarget("cuda", 90 | 80, 32).
   Identical compilations (layer3 and layer4 specialize alike) run once.
3. Check (`problems`): it compiled; ptxas -v reports no spill stores or loads; shared memory within the
   architecture's limit; every kernel with a tt.dot issues tensor-core MMAs (wgmma on sm_90, mma.sync on sm_80) on
   the operand type the data calls for (bf16, f16, or tf32 — 3×TF32 — for fp32 values); the KD kernels load the
   logits in vectors of at least 8 bytes when C % 4 == 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

SMEM_LIMIT = {90: 232_448, 80: 166_912}  # opt-in shared memory per block: sm_90 (H100/H200), sm_80 (A100)
SMS = {90: 132, 80: 108}
ARCHES = (90, 80)
HINT_SHAPES = {"layer3": (256, 256, 1024, 14, 14), "layer4": (256, 512, 2048, 7, 7)}  # N, Cs, Ct, H, W
HINT_DTYPES = ("bfloat16", "float16", "float32")
KD_SHAPES = [(256, 1000, "bfloat16"), (8192, 1000, "float32"), (8192, 21843, "float32")]
MMA_OPERAND = {"bfloat16": "bf16", "float16": "f16", "float32": "tf32"}


@dataclass
class Launch:
    """One kernel launch as a launcher issues it (one autotune config when the kernel is autotuned)."""

    op: str  # e.g. "hint layer3 bfloat16", "kd 8192x1000 float32"
    module: str
    kernel: str
    arch: int
    signature: dict[str, str]
    constexprs: dict[str, Any]  # by argument name
    attrs: dict[str, Any]  # by argument name
    options: dict[str, Any]
    grid: list[int]
    mma_operand: str | None  # the MMA operand type its dots must use
    vector_loads: bool  # a KD kernel with C % 4 == 0: logits must load in ≥ 8-byte vectors
    tensor_bytes: int = 0  # bytes of the distinct tensors it is passed (the plan's HBM model)

    def key(self) -> str:
        return json.dumps(
            [self.module, self.kernel, self.arch, self.signature, self.constexprs, self.attrs, self.options],
            sort_keys=True,
            default=str,
        )


@dataclass
class Compiled:
    launch: Launch
    ok: bool
    error: str = ""
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads, ptxas -v
    shared_bytes: int = 0
    mma: list[str] = field(default_factory=list)  # the distinct MMA instructions in the PTX
    has_dot: bool = False
    load_widths: dict[str, int] = field(default_factory=dict)  # ld.global width in bytes → count
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- capture


def _kernel_name(fn) -> tuple[str, str]:
    inner = fn
    while not hasattr(inner, "src"):
        inner = inner.fn
    return inner.fn.__module__, inner.fn.__name__


@contextlib.contextmanager
def _recording(records: list):
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def jit_run(self, *args, grid, warmup, **kwargs):
        records.append((self, args, kwargs, grid, None))

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        records.append((self.fn, args, kwargs, kwargs.get("grid"), configs))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


FROZEN_OP = "hint layer4 bfloat16 frozen-regressor"  # gate only: the no-weight-gradient backward's kernels


def _hint_calls(n, cs, ct, h, w, dtype, frozen_regressor=False):
    """Forward and backward of the MMRazor connector (1×1 conv + bias, BatchNorm training, ReLU, normalized L2) on
    channels-last features, every gradient wanted: the trainer's call. frozen_regressor: no weight gradient, the
    path whose per-channel gradients run in a kernel of their own."""
    import torch

    from fastfit.kernels import hint_loss as hl
    from fastfit.kernels.hint_loss_stats import feature_moments

    meta = {"device": "meta"}
    student = torch.empty(n, cs, h, w, dtype=dtype, memory_format=torch.channels_last, **meta)
    teacher = torch.empty(n, ct, h, w, dtype=dtype, memory_format=torch.channels_last, **meta)
    weight = torch.empty(ct, cs, 1, 1, **meta)
    bias, gamma, beta, running_mean, running_var = (torch.empty(ct, **meta) for _ in range(5))
    count = torch.empty((), dtype=torch.int64, **meta)
    mean, gram = feature_moments(student)
    params = (weight, bias, gamma, beta)
    w_lp, chan, wg = hl._prepare(
        *params, mean, gram, None, None, running_mean, running_var, count, 0.1, 1e-5, hl.BATCH_STATS, n * h * w, dtype
    )
    _, coef = hl._forward(student, teacher, w_lp, chan, True, "normalized_l2")
    grads = (True, not frozen_regressor, True, True)
    args = (student, teacher, *params, mean, w_lp, chan, wg, coef, hl.BATCH_STATS, True, *grads)
    hl._backward_grads(torch.empty((), **meta), *args)


def _kd_calls(n, c, dtype):
    import torch

    from fastfit.kernels import kd_loss as kd

    s = torch.empty(n, c, dtype=dtype, device="meta")
    t = torch.empty(n, c, dtype=dtype, device="meta")
    y = torch.empty(n, dtype=torch.int64, device="meta")
    kd_out, ce, n_valid, stats = kd._kd_loss_forward(s, t, y, 6.0, "mean", True, "kl", 0.1)
    kd._kd_loss_backward(s, t, y, stats, (kd_out, ce, n_valid), 6.0, "mean", True, 0.1)


def _kd_objective_calls(n, c, dtype):
    """fused_kd_objective as the trainer calls it: the forward writing the gradient, then the check-and-fix
    backward (compiled with its recomputation, whichever path a launch takes)."""
    import torch

    from fastfit.kernels import kd_loss as kd
    from fastfit.kernels import kd_objective as obj

    s = torch.empty(n, c, dtype=dtype, device="meta")
    t = torch.empty(n, c, dtype=dtype, device="meta")
    y = torch.empty(n, dtype=torch.int64, device="meta")
    w = torch.empty((), device="meta")
    config = (6.0, "mean", True, "kl", 0.1)
    _kd, _ce, n_valid, stats, objective, grad = kd._forward(
        s, t, y, *config, kd_weight=w, ce_weight=1.0, emit_grad=True
    )
    obj._objective_backward(grad, s, t, y, stats, objective, w, n_valid, 1.0, 6.0, "mean", True, 0.1, False)


def capture(arch: int) -> list[Launch]:
    """Every launch of the ops at the real shapes on `arch`, autotune configs expanded."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    import fastfit.kernels.hint_loss_common as common

    common.CAPTURE_SMS, common.CAPTURE_SMEM, common.CAPTURE_MAJOR = SMS[arch], SMEM_LIMIT[arch], arch // 10
    backend = make_backend(GPUTarget("cuda", arch, 32))
    jobs = [
        (f"hint {layer} {d}", _hint_calls, (*shape, getattr(torch, d)), d)
        for d in HINT_DTYPES
        for layer, shape in HINT_SHAPES.items()
    ]
    jobs.append((FROZEN_OP, _hint_calls, (*HINT_SHAPES["layer4"], torch.bfloat16, True), "bfloat16"))
    jobs += [(f"kd {n}x{c} {d}", _kd_calls, (n, c, getattr(torch, d)), d) for n, c, d in KD_SHAPES]
    jobs += [(f"kd_objective {n}x{c} {d}", _kd_objective_calls, (n, c, getattr(torch, d)), d) for n, c, d in KD_SHAPES]
    launches: list[Launch] = []
    for op, fn, args, dname in jobs:
        records: list = []
        with _recording(records):
            fn(*args)
        for jit, call_args, kwargs, grid, configs in records:
            names = [p.name for p in jit.params]
            module, name = _kernel_name(jit)
            for config in configs or [None]:
                kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
                if config is not None:
                    kw.update(config.all_kwargs())
                wrapped = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in call_args]
                binder = create_function_from_signature(jit.signature, jit.params, backend)
                bound, specialization, options = binder(*wrapped, **kw)
                options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, specialization, options)
                c = call_args[names.index("C_VEC")] * kw["VEC"] if "C_VEC" in names else None
                launches.append(
                    Launch(
                        op=op,
                        module=module,
                        kernel=name,
                        arch=arch,
                        signature=signature,
                        constexprs={names[k[0]]: _plain(v) for k, v in constexprs.items()},
                        attrs={names[k[0]]: v for k, v in attrs.items()},
                        options={k: options.__dict__[k] for k in ("num_warps", "num_stages")},
                        grid=list(grid(kw) if callable(grid) else grid),
                        mma_operand=_mma_operand(name, dname, kw.get("MODE")),
                        vector_loads=name.startswith("_kd_") and c is not None and c % 4 == 0,
                        tensor_bytes=sum(
                            t.numel() * t.element_size()
                            for t in {id(a): a for a in call_args if isinstance(a, torch.Tensor)}.values()
                        ),
                    )
                )
    return launches


def _plain(value):
    return value.value if hasattr(value, "value") else str(value) if value.__class__.__name__ == "dtype" else value


def _mma_operand(kernel: str, dtype: str, mode: str | None) -> str:
    # Statistics GEMMs run on fp32 values: 3×TF32 for fp32 features; for 16-bit features the moments kernel splits
    # them into bf16 hi + lo, and the small products do when one operand is the bf16 weight (MODE "bf16"). The
    # backward GEMMs of fp16 features read fp32 D (fp16 would underflow), hence 3×TF32 as well.
    if kernel == "_hint_moments_kernel":
        return "tf32" if dtype == "float32" else "bf16"
    if kernel == "_small_gemm_kernel":
        return "bf16" if mode == "bf16" else "tf32"
    if dtype == "float16" and kernel in ("_hint_dx_kernel", "_hint_dw_kernel"):
        return "tf32"
    return MMA_OPERAND[dtype]


# ---------------------------------------------------------------------------------------------------- compile


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_launch(launch: Launch) -> Compiled:
    """Compile one launch for its arch; read registers, spills, shared memory, MMAs and load widths."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    names = [p.name for p in fn.params]
    try:
        source = ASTSource(
            fn=fn,
            signature=launch.signature,
            constexprs={(names.index(k),): v for k, v in launch.constexprs.items()},
            attrs={(names.index(k),): v for k, v in launch.attrs.items()},
        )
        kernel = triton.compile(source, target=GPUTarget("cuda", launch.arch, 32), options=launch.options)
        ptx = kernel.asm["ptx"]
        registers, spills = _ptxas_usage(ptx, launch.arch)
    except Exception as exc:  # a kernel that does not compile is a gate result, reported with its launch
        return Compiled(launch, ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
    return Compiled(
        launch,
        ok=True,
        registers=registers,
        spill_bytes=spills,
        shared_bytes=int(kernel.metadata.shared),
        mma=sorted(set(re.findall(r"\b(wgmma\.mma_async\S*|mma\.sync\S*)", ptx))),
        has_dot="tt.dot" in kernel.asm["ttir"],
        load_widths=_load_widths(ptx),
        seconds=round(time.perf_counter() - start, 2),
    )


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as handle:
            handle.write(ptx)
        gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = max((int(r) for r in re.findall(r"Used (\d+) registers", out)), default=0)
    spills = sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}


def _load_widths(ptx: str) -> dict[str, int]:
    """Global loads by width in bytes: ld.global[.modifiers][.vN].{b,f,u,s}{bits}."""
    counts: dict[str, int] = {}
    for vec, bits in re.findall(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfus](\d+)\s", ptx):
        width = str(int(vec or 1) * _BYTES[bits])
        counts[width] = counts.get(width, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------- check


def problems(result: Compiled) -> list[str]:
    """What the gate rejects in one compiled launch (empty: it passes)."""
    launch = result.launch
    where = f"{launch.op}: {launch.kernel} sm_{launch.arch} {launch.options} {_meta(launch)}"
    if not result.ok:
        return [f"{where}: does not compile: {result.error}"]
    found = []
    if result.spill_bytes:
        found.append(f"{where}: spills {result.spill_bytes} bytes ({result.registers} registers)")
    if result.shared_bytes > SMEM_LIMIT[launch.arch]:
        found.append(f"{where}: needs {result.shared_bytes} B of shared memory > {SMEM_LIMIT[launch.arch]}")
    if result.has_dot:
        instruction = "wgmma.mma_async" if launch.arch == 90 else "mma.sync"
        ops = [m for m in result.mma if m.startswith(instruction)]
        if not ops:
            found.append(f"{where}: its dots use no tensor-core {instruction} (FMA on CUDA cores)")
        elif not all(f".{launch.mma_operand}" in m for m in ops):
            found.append(f"{where}: MMAs {ops} are not on {launch.mma_operand} operands")
    if launch.vector_loads:
        narrow = sum(n for w, n in result.load_widths.items() if int(w) < 8)
        # Scalar loads allowed: per row its label, gathered s_y and 5 statistics, plus grad_outputs and count.
        if narrow > launch.constexprs["ROWS"] * 7 + 4 or not any(int(w) >= 8 for w in result.load_widths):
            found.append(f"{where}: logits loads narrower than 8 bytes: {result.load_widths}")
    return found


def _meta(launch: Launch) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_C", "ROWS", "VEC", "MODE")
    return " ".join(f"{k}={launch.constexprs[k]}" for k in keys if k in launch.constexprs)


def run_gate(workers: int = 2, arches: tuple[int, ...] = ARCHES, extra: list[Launch] | None = None) -> dict:
    """Capture, deduplicate, compile in parallel, check. Returns a JSON-able report."""
    start = time.perf_counter()
    launches = [launch for arch in arches for launch in capture(arch)] + list(extra or [])
    unique: dict[str, Launch] = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(compile_launch, unique.values()))
    by_key = {r.launch.key(): r for r in results}
    rows = []
    for launch in launches:
        result = by_key[launch.key()]
        rows.append({**asdict(result), "launch": asdict(launch), "problems": problems(result)})
    return {
        "compiles": len(unique),
        "launches": len(launches),
        "seconds": round(time.perf_counter() - start, 1),
        "results": rows,
    }


def spilling_probe() -> Launch:
    """A deliberately spilling launch: the hint forward's 128×128 bf16 tile on 2 warps (256 fp32 accumulators per
    thread), which prune_gemm_configs never lets the autotuner pick."""
    launch = next(x for x in capture(90) if x.kernel == "_hint_fwd_kernel" and x.op.endswith("bfloat16"))
    launch.op = "probe: a spilling config"
    launch.options = {"num_warps": 2, "num_stages": 3}
    return launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--probe", action="store_true", help="also compile the deliberately spilling probe")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("expected TRITON_INTERPRET unset: the gate compiles real kernels, not interpreted ones")
    report = run_gate(args.workers, extra=[spilling_probe()] if args.probe else None)
    failures = [p for row in report["results"] if not row["launch"]["op"].startswith("probe") for p in row["problems"]]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1, default=str)
    print(f"{report['compiles']} compiles for {report['launches']} launches in {report['seconds']} s")
    print("\n".join(failures) if failures else "every launch passes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
