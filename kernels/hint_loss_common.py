"""Shared pieces of the fused hint loss kernels: tile sizes and tuning, how a feature map's (N·H·W, C) rows are
addressed for any layout, grouped program order, and where the kernels may run.

A feature map (N, C, H, W) is read as the matrix X[m, c] with m = (n·H + h)·W + w, whatever its strides: row m lives
at n·s_n + h·s_h + w·s_w and column c at c·s_c. Channels-last makes each row contiguous (the fast path); contiguous
NCHW makes each column contiguous — both are read in place, nothing is copied.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit read TRITON_INTERPRET when these kernels were decorated; read it once, the same way.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# GPU tiles: 16-bit inputs feed bf16/fp16 tensor cores with fp32 accumulators; fp32 inputs use smaller tiles (4-byte
# operands, IEEE dots). BLOCK_M/BLOCK_N also fix the shapes of the partial-sum buffers, so autotuning varies only
# BLOCK_K, GROUP_M, warps and stages: every program writes its own slots and reruns during tuning are harmless.
TILE_16BIT, TILE_FP32 = (128, 128), (64, 64)
STATS_ROWS, STATS_COLS = 64, 64  # Gram and column-sum tiles (small GEMMs, many programs)
SMALL_GEMM_TILE, SMALL_GEMM_K = 64, 32  # the Cs × Cs and Ct × Cs fp32 products of BatchNorm (3×TF32)
INTERPRET_TILE, INTERPRET_K = 32, 16  # tiny tiles so the small test shapes still span several programs
TARGET_PROGRAMS_PER_SM = 2  # split-K programs for the reductions over M (Gram, dW)
MAX_PARTIAL_ELEMENTS = 1 << 24  # 64 MiB of fp32 partial sums at most for a split-K reduction
KIND_CODES = {"half_sq": 0, "mse": 1, "normalized_l2": 2}  # the loss kinds as the kernels' KIND constexpr
NORM_EPS = 1e-12  # fastfit.distill.losses._NORM_EPS: an all-zero map normalizes to zero


# Meta tensors stand for a GPU when the ahead-of-time gate captures the launchers' parameters (no device here):
# these say which one. The gate sets them per target; on CUDA the device's own properties are used.
CAPTURE_SMS = 132  # H100/H200 SXM
CAPTURE_SMEM = 232_448  # sm_90's opt-in shared memory per block (sm_80: 166,912)
CAPTURE_MAJOR = 9  # compute capability major: 9 Hopper (wgmma, operands in shared memory), 8 Ampere (mma.sync)
# fp32 accumulator values per thread before the epilogue spills (ptxas): sm_90's wgmma reads its operands from
# shared memory; sm_80's mma.sync holds them in registers beside the accumulator.
ACC_REGISTERS_PER_THREAD = {9: 64, 8: 32}


def device_limits(device: torch.device) -> tuple[int, int, int]:
    """(streaming multiprocessors, shared memory per block in bytes, capability major) of the device the kernels
    will run on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.shared_memory_per_block_optin, props.major
    return CAPTURE_SMS, CAPTURE_SMEM, CAPTURE_MAJOR


def _gemm_configs() -> list[triton.Config]:
    # 8 warps for the 128×128 16-bit tiles; 4 warps serve the 64×64 fp32 tiles. prune_gemm_configs drops, before
    # any launch, every config whose pipeline does not fit the device's shared memory or whose accumulator would
    # spill (tests/test_kernel_aot.py compiles the survivors for sm_90a and sm_80 and checks them with ptxas).
    return [
        triton.Config({"BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_K": 16, "GROUP_M": 8}, num_warps=4, num_stages=4),
    ]


def gemm_shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, operand_bytes: int) -> int:
    """Shared memory of a pipelined GEMM tile: `stages` buffers of a BLOCK_M × BLOCK_K and a BLOCK_K × BLOCK_N
    operand (each program's M × N output tile, whichever way its operands are laid out)."""
    return stages * block_k * (block_m + block_n) * operand_bytes


def prune_gemm_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune: keep the configs that fit this device (shared memory, accumulator registers)."""
    device = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
    _, smem, major = device_limits(device)
    block_m, block_n = kwargs["BLOCK_M"], kwargs["BLOCK_N"]
    tf32x3 = kwargs["MODE"] == "tf32x3"
    operand_bytes = 4 if tf32x3 else 2
    # 3×TF32 holds head and tail operand fragments; mma.sync (sm_80) keeps them in registers, where ptxas spills
    # them beyond a K step of 16. Smallest K steps otherwise only for 3×TF32 (16-bit tiles want 32 or more).
    k_range = (16, 16) if tf32x3 and major < 9 else (16, 64) if tf32x3 else (32, 64)
    kept = [
        c
        for c in configs
        if gemm_shared_bytes(block_m, block_n, c.kwargs["BLOCK_K"], c.num_stages, operand_bytes) <= smem
        and block_m * block_n <= ACC_REGISTERS_PER_THREAD[min(major, 9)] * 32 * c.num_warps
        and k_range[0] <= c.kwargs["BLOCK_K"] <= k_range[1]
    ]
    if not kept:
        raise ValueError(f"expected a GEMM config that fits {smem} bytes of shared memory, got none for {kwargs}")
    return kept


def tuned(kernel):
    """Autotune the GEMM kernels on a GPU; the interpreter gets one fixed config (several configs fail there)."""
    if INTERPRET:
        return kernel
    return triton.autotune(
        configs=_gemm_configs(), key=["M", "CS", "CT"], prune_configs_by={"early_config_prune": prune_gemm_configs}
    )(kernel)


def tile_for(dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for GEMM operands of `dtype`: 16-bit tiles hold twice the elements of fp32 ones; on
    sm_80 (accumulators and mma.sync operands in registers) 16-bit tiles are half as wide, or the fp32-D epilogue
    of fp16 features spills (ptxas)."""
    if INTERPRET:
        return INTERPRET_TILE, INTERPRET_TILE
    if dtype == torch.float32:
        return TILE_FP32
    return TILE_16BIT if device_limits(device)[2] >= 9 else (TILE_16BIT[0], TILE_16BIT[1] // 2)


def fixed_meta() -> dict[str, int]:
    """The meta-parameters the autotuner picks on a GPU, fixed under the interpreter."""
    return {"BLOCK_K": INTERPRET_K, "GROUP_M": 2} if INTERPRET else {}


def mma_mode(dtype: torch.dtype) -> str:
    """How a GEMM whose operands are `dtype` (or fp32 built from them) runs on tensor cores: "bf16"/"fp16" feed
    16-bit operands to the MMA; "tf32x3" splits each fp32 operand into a TF32 head and tail and sums three TF32
    MMAs (about 22 significant bits, so fp32-accurate products on tensor cores; plain TF32 keeps only 11)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "tf32x3")


def split_rows(m: int, tiles: int, block_rows: int, partial_elements_per_split: int, device: torch.device) -> int:
    """Rows per program for a reduction over M split across programs (written as partials, summed by torch)."""
    if INTERPRET:
        splits = 2
    else:
        sms, _, _ = device_limits(device)
        splits = triton.cdiv(TARGET_PROGRAMS_PER_SM * sms, max(tiles, 1))
        splits = min(splits, max(1, MAX_PARTIAL_ELEMENTS // max(partial_elements_per_split, 1)))
    splits = max(1, min(splits, triton.cdiv(m, block_rows)))
    return triton.cdiv(triton.cdiv(m, splits), block_rows) * block_rows


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset reaches 2³¹. Below that, int32 offsets are exact and much cheaper: int64
    address math on 128×128 tiles spills registers on sm_90 (checked with ptxas), so it is used only when needed."""
    reach = max(
        sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)) for t in tensors
    )
    return reach >= 2**31 - 1


def check_runnable(tensor: torch.Tensor, name: str) -> None:
    # meta: the AOT gate calls the launchers on meta tensors to capture their launch parameters (no kernel runs).
    if tensor.device.type in ("cuda", "meta") or (tensor.device.type == "cpu" and INTERPRET):
        return
    raise ValueError(
        f"expected {name} on a CUDA device (or TRITON_INTERPRET=1 set before triton is imported, to run "
        f"the kernels on the CPU through Triton's interpreter), got a tensor on {tensor.device}"
    )


@triton.jit
def row_offsets(rows, HW, W, stride_n, stride_h, stride_w):
    """Element offsets of feature-map rows m = (n·H + h)·W + w (offsets in the rows' integer type)."""
    n = rows // HW
    p = rows - n * HW
    h = p // W
    return n * stride_n + h * stride_h + (p - h * W) * stride_w


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Map a linear program id onto (tile row, tile column) in groups of GROUP_M tile rows, so programs running
    together share the operand columns they read (L2 reuse, as in the Triton matmul tutorial)."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def output_tile(
    ROWS, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, INDEX_64: tl.constexpr
):
    """This program's tile of a ROWS × COLS output in grouped order: (tiles per column, tile row, row and column
    indices, their in-bounds masks)."""
    num_m = tl.cdiv(ROWS, BLOCK_M)
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(COLS, BLOCK_N), GROUP_M)
    pid_m, pid_n = widen(pid_m, INDEX_64), widen(pid_n, INDEX_64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return num_m, pid_m, pid_n, rows, cols, rows < ROWS, cols < COLS


@triton.jit
def widen(x, INDEX_64: tl.constexpr):
    """Index type for offsets: int64 only when a tensor of the launch spans 2³¹ elements (see needs_int64)."""
    if INDEX_64:
        return x.to(tl.int64)
    else:
        return x


# Last-arrival tickets: a reduction across programs finishes inside the kernel that produced its partials (no torch
# sum, no second launch). One int32 buffer per device, zeros at rest: the program that takes the last ticket of a
# slot resets it, so the next launch (or a CUDA-graph replay) finds zeros again. Kernels on one stream run one after
# another and may share it; ops on concurrent streams must not.
_TICKETS: dict[tuple[str, int | None], torch.Tensor] = {}
TICKET_SLOTS_MIN = 4096


def tickets(device: torch.device, slots: int) -> torch.Tensor:
    """At least `slots` int32 zeros on `device`, allocated once (grown when a launch needs more)."""
    key = (device.type, device.index)
    buffer = _TICKETS.get(key)
    if buffer is None or buffer.numel() < slots:
        # meta (the AOT gate's capture): nothing to zero, and a one-time fill is not part of a launch's cost
        make = torch.empty if device.type == "meta" else torch.zeros
        buffer = make(max(slots, TICKET_SLOTS_MIN), dtype=torch.int32, device=device)
        _TICKETS[key] = buffer
    return buffer


@triton.jit
def last_arrival(ticket_ptr, expected):
    """True in the one program, of the `expected` programs sharing the slot at ticket_ptr, that arrives last; that
    program resets the slot to 0. Its loads after the call see every store the others made before theirs: each
    program's threads meet at a barrier before one acq_rel atomic publishes them (CUTLASS's semaphore pattern)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == expected - 1
    if last:
        tl.store(ticket_ptr, 0)
    return last
