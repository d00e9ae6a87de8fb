"""Triton kernel for the MaxNorm row projection (see bigltr/ops/maxnorm.py for the public op).

This module imports triton at import time; bigltr.ops.maxnorm imports it lazily, only when the Triton
path is taken.

Design (memory bound): the floor is one read of the weight plus a write of only the rows that change.
* One program owns BLOCK_M whole rows, so the row norm never needs a cross-program reduction.
* Rows that fit in one BLOCK_N chunk (the common case, e.g. D=2048) are loaded once, kept in registers,
  and stored back with a mask that is false for unclipped rows: one read, a write of clipped rows only.
* Longer rows are read in BLOCK_N chunks to accumulate the sum of squares (fp32), then a second pass
  re-reads and rewrites only the clipped rows (the masked load of an unclipped row issues no memory
  traffic, and a block with no clipped row skips the pass entirely).
* Strides are passed explicitly, so column slices and transposed views are edited in their own storage.
* The radius is either a Python float passed by value, or a pointer to a 0-d fp32 tensor on the device
  (no host sync); the choice is a constexpr so each variant compiles to straight-line code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_clip_scale(ss, r, TAU: tl.constexpr):
    """From the fp32 sum of squares per row, return (clip mask, scale) with scale = r / ||w||**TAU."""
    if TAU == 1.0:
        # correctly rounded sqrt/div: a row whose norm is exactly the radius compares equal, like torch
        n = tl.sqrt_rn(ss)
    elif TAU == 2.0:
        n = ss
    else:
        # ||w||**tau = ss**(tau/2); zero rows (and padding rows) get n = 0 without evaluating log2(0)
        pos = ss > 0.0
        n = tl.where(pos, tl.exp2((0.5 * TAU) * tl.log2(tl.where(pos, ss, 1.0))), 0.0)
    clip = n > r
    # the inner where keeps zero rows away from r / 0 (they are not clipped, but avoid inf in registers)
    denom = tl.where(clip, n, 1.0)
    scale = tl.where(clip, tl.div_rn(tl.zeros_like(denom) + r, denom), 1.0)
    return clip, scale


@triton.jit
def _cast_out(y, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 `y` to the weight's dtype, to nearest even.

    Triton's interpreter (3.8) truncates fp32 -> bf16 instead of rounding, so under TRITON_INTERPRET=1 the
    rounding is done here on the bits, giving the same result as the GPU's cvt.rn (and as torch). Finite values
    only, which is all this kernel stores (clipped rows are finite: NaN rows are never clipped)."""
    if SOFT_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(out_ty)


@triton.jit
def _maxnorm_kernel(
    w_ptr,
    r_ptr,
    r_val,
    M,
    N,
    stride_m,
    stride_n,
    TAU: tl.constexpr,
    RADIUS_IS_PTR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # 64-bit offsets: M * stride_m can exceed 2**31 for big or transposed weights
    row_base = w_ptr + rows.to(tl.int64)[:, None] * stride_m
    cols = tl.arange(0, BLOCK_N)
    if RADIUS_IS_PTR:
        r = tl.load(r_ptr).to(tl.float32)
    else:
        r = r_val

    if ONE_CHUNK:
        # whole rows in registers: one read, masked write of clipped rows only
        mask = row_ok[:, None] & (cols < N)[None, :]
        ptrs = row_base + cols.to(tl.int64)[None, :] * stride_n
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ss = tl.sum(x * x, axis=1)
        clip, scale = _row_clip_scale(ss, r, TAU)
        y = x * scale[:, None]
        tl.store(ptrs, _cast_out(y, w_ptr.dtype.element_ty, SOFT_BF16), mask=mask & clip[:, None])
    else:
        # pass 1: sum of squares in fp32, accumulated element-wise and reduced once at the end
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            x = tl.load(row_base + c.to(tl.int64)[None, :] * stride_n, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        ss = tl.sum(acc, axis=1)
        clip, scale = _row_clip_scale(ss, r, TAU)
        # pass 2: only clipped rows are re-read and rewritten; skip it when none is clipped
        n_clip = tl.sum(clip.to(tl.int32), axis=0)
        if n_clip > 0:
            row_sel = row_ok & clip
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_sel[:, None] & (c < N)[None, :]
                ptrs = row_base + c.to(tl.int64)[None, :] * stride_n
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                tl.store(ptrs, _cast_out(x * scale[:, None], w_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def _is_interpreted(fn) -> bool:
    # triton.jit returns an InterpretedFunction when TRITON_INTERPRET was set at decoration (import) time;
    # checking the object itself is more reliable than re-reading the environment variable later.
    return type(fn).__name__ == "InterpretedFunction"


INTERPRETED: bool = _is_interpreted(_maxnorm_kernel)


def _pick_config(M: int, N: int, stride_m: int, stride_n: int) -> tuple[int, int, int]:
    """Return (BLOCK_M, BLOCK_N, num_warps) from simple heuristics on the shape and layout."""
    np2 = triton.next_power_of_2
    if INTERPRETED:
        # the interpreter runs each program as numpy calls: few, large programs are much faster
        block_n = min(np2(N), 512)
        block_m = max(1, min(np2(M), 256, 65536 // block_n))
        return block_m, block_n, 4
    if stride_m == 1 and stride_n != 1:
        # rows run across memory (e.g. a transposed view): tile so that the BLOCK_M axis, which is the
        # contiguous one, gives coalesced loads; rows are then looped in short chunks
        block_m = min(np2(M), 64)
        block_n = min(np2(N), 64)
    else:
        # keep a whole row in registers when it fits (up to 4096 elements), about 4K elements per program
        block_n = min(np2(N), 4096)
        block_m = max(1, min(np2(M), 4096 // block_n, 64))
    elems = block_m * block_n
    num_warps = 1 if elems <= 256 else 2 if elems <= 512 else 4 if elems <= 2048 else 8
    return block_m, block_n, num_warps


def maxnorm_triton_(weight: torch.Tensor, radius, tau: float) -> torch.Tensor:
    """Launch the kernel on a validated 2-D floating weight. `radius` is a Python float or a 0-d fp32
    tensor on the weight's device. Checks are done by the caller (bigltr.ops.maxnorm.maxnorm_)."""
    M, N = weight.shape
    if M == 0 or N == 0:
        return weight
    block_m, block_n, num_warps = _pick_config(M, N, weight.stride(0), weight.stride(1))
    if isinstance(radius, torch.Tensor):
        r_ptr, r_val, radius_is_ptr = radius, 0.0, True
    else:
        # r_ptr is never read when RADIUS_IS_PTR is False; any valid pointer will do
        r_ptr, r_val, radius_is_ptr = weight, float(radius), False
    grid = (triton.cdiv(M, block_m),)
    _maxnorm_kernel[grid](
        weight,
        r_ptr,
        r_val,
        M,
        N,
        weight.stride(0),
        weight.stride(1),
        TAU=float(tau),
        RADIUS_IS_PTR=radius_is_ptr,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        ONE_CHUNK=N <= block_n,
        SOFT_BF16=INTERPRETED and weight.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    return weight
