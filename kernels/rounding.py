"""The roundings the GPU applies, made explicit so that the interpreter (TRITON_INTERPRET=1, the CPU tests) rounds
exactly the same way: one precision path, whichever runs the kernels.

Two gaps of the interpreter are closed here: its fp32 → bf16 cast truncates where the GPU's cvt.rn.bf16.f32 rounds
to nearest even, and its tl.dot computes in numpy's precision whatever the operands or input_precision say (16-bit
dots are even wrong). `cast` and `mma` take EMULATE (true under the interpreter) and apply the GPU's rounding by bit
arithmetic before exact fp32 arithmetic; on the GPU they are a plain cast and a tensor-core MMA.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_tf32(x):
    """fp32 → the nearest TF32 value (10 explicit mantissa bits, ties away from zero), kept in fp32:
    cvt.rna.tf32.f32, which 3×TF32 uses to split its operands."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x):
    """fp32 → the nearest bf16 value (ties to even), kept in fp32: what cvt.rn.bf16.f32 gives."""
    bits = x.to(tl.uint32, bitcast=True)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x.to(DTYPE) rounded to nearest even, as on the GPU (the interpreter alone would truncate to bf16)."""
    if EMULATE:
        if DTYPE == tl.bfloat16:
            x = round_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def mma(a, b, acc, MODE: tl.constexpr, EMULATE: tl.constexpr):
    """acc + a·b on tensor cores, operands rounded as MODE says (see hint_loss_common.mma_mode):
    "bf16"/"fp16"  16-bit operands (fp32 inputs rounded to nearest even), fp32 accumulation;
    "tf32x3"       each fp32 operand split into a TF32 head and a TF32 tail, three TF32 MMAs (tail·head,
                   head·tail, head·head): about 22 significant bits, fp32-class products; plain TF32 keeps 11.
    Under the interpreter (EMULATE) the same roundings are applied explicitly and the products run in fp32, where
    products of those operands are exact."""
    if MODE == "tf32x3":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if EMULATE:
            a_hi = round_tf32(a)
            b_hi = round_tf32(b)
            acc = tl.dot(round_tf32(a - a_hi), b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, round_tf32(b - b_hi), acc, input_precision="ieee")
            return tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        op_ty: tl.constexpr = tl.bfloat16 if MODE == "bf16" else tl.float16
        if EMULATE:
            a = cast(a, op_ty, True).to(tl.float32)
            b = cast(b, op_ty, True).to(tl.float32)
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a.to(op_ty), b.to(op_ty), acc)


@triton.jit
def split16(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 x → (hi, lo) in the 16-bit DTYPE: hi = x rounded to nearest even, lo = (x − hi) rounded again, so
    hi + lo keeps about twice DTYPE's significant bits (bf16: ~16, fp16: ~22); x − hi is exact in fp32."""
    hi = cast(x, DTYPE, EMULATE)
    lo = cast(x - hi.to(tl.float32), DTYPE, EMULATE)
    return hi, lo


@triton.jit
def dot16(a, b, acc, EMULATE: tl.constexpr):
    """acc + a·b for operands already in bf16/fp16: exact products, fp32 accumulation on tensor cores. The
    interpreter's 16-bit dots are wrong, so there the (exactly representable) operands are upcast to fp32 first."""
    if EMULATE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)
