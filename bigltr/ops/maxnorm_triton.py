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
def _norm_pow(ss, P: tl.constexpr):
    """||w||**P per row from its fp32 sum of squares."""
    if P == 1.0:
        # correctly rounded sqrt/div: a row whose norm is exactly the radius compares equal, like torch
        n = tl.sqrt_rn(ss)
    elif P == 2.0:
        n = ss
    else:
        # ||w||**P = ss**(P/2); zero rows (and padding rows) get n = 0 without evaluating log2(0)
        pos = ss > 0.0
        n = tl.where(pos, tl.exp2((0.5 * P) * tl.log2(tl.where(pos, ss, 1.0))), 0.0)
    return n


@triton.jit
def _row_clip_scale(ss, r, CMP_POW: tl.constexpr, SCALE_POW: tl.constexpr):
    """From the fp32 sum of squares per row, return (clip mask, scale): clip = ||w||**CMP_POW > r and
    scale = r / ||w||**SCALE_POW (bigltr.ops.maxnorm._rule chooses r and the powers: 1, 1 for the exact
    projection, tau, tau*tau for the official code's rule)."""
    n = _norm_pow(ss, CMP_POW)
    clip = n > r
    if SCALE_POW != CMP_POW:
        n = _norm_pow(ss, SCALE_POW)
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
def _rescale_rows(row_base, stride_n, N, row_sel, scale, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Pass 2 of the long-row path of both kernels: the rows selected by `row_sel` (the clipped ones) re-read in
    BLOCK_N chunks from `row_base` (a [BLOCK_M, 1] block of row pointers), multiplied by `scale` and stored (the
    masked load of an unselected row issues no memory traffic)."""
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        mask = row_sel[:, None] & (c < N)[None, :]
        ptrs = row_base + c.to(tl.int64)[None, :] * stride_n
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, _cast_out(x * scale[:, None], out_ty, SOFT_BF16), mask=mask)


@triton.jit
def _maxnorm_kernel(
    w_ptr,
    r_ptr,
    r_val,
    M,
    N,
    stride_m,
    stride_n,
    CMP_POW: tl.constexpr,
    SCALE_POW: tl.constexpr,
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
        clip, scale = _row_clip_scale(ss, r, CMP_POW, SCALE_POW)
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
        clip, scale = _row_clip_scale(ss, r, CMP_POW, SCALE_POW)
        # pass 2: only clipped rows are re-read and rewritten; skip it when none is clipped
        n_clip = tl.sum(clip.to(tl.int32), axis=0)
        if n_clip > 0:
            _rescale_rows(row_base, stride_n, N, row_ok & clip, scale, w_ptr.dtype.element_ty, SOFT_BF16, BLOCK_N)


@triton.jit
def _sgd_update(w, g, b, lr, wd, mom, damp, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr,
                FIRST_STEP: tl.constexpr, NESTEROV: tl.constexpr):
    """torch.optim.SGD's update in fp32: returns (new weight, new momentum buffer)."""
    d = g
    if HAS_WD:
        d = d + wd * w
    if HAS_MOM:
        if FIRST_STEP:
            b = d  # torch initialises the buffer with the first gradient, without dampening
        else:
            b = mom * b + (1.0 - damp) * d
        if NESTEROV:
            d = d + mom * b
        else:
            d = b
    return w - lr * d, b


@triton.jit
def _sgd_chunk(w_ptr, g_ptr, b_ptr, rows64, c64, mask, stride_wm, stride_wn, stride_gm, stride_gn, stride_bm,
               stride_bn, lr, wd, mom, damp, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, FIRST_STEP: tl.constexpr,
               NESTEROV: tl.constexpr, SOFT_BF16_W: tl.constexpr, SOFT_BF16_B: tl.constexpr):
    """The SGD step on one [rows64, c64] chunk: reads the weight, the gradient and (after the first step) the
    momentum buffer, stores the new buffer, and returns (the new weight rounded to its dtype, not stored yet; the
    chunk's weight pointers)."""
    w_ptrs = w_ptr + rows64 * stride_wm + c64 * stride_wn
    b_ptrs = b_ptr + rows64 * stride_bm + c64 * stride_bn
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows64 * stride_gm + c64 * stride_gn, mask=mask, other=0.0).to(tl.float32)
    b = tl.zeros_like(w)
    if HAS_MOM:
        if not FIRST_STEP:
            b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    w_new, b = _sgd_update(w, g, b, lr, wd, mom, damp, HAS_WD, HAS_MOM, FIRST_STEP, NESTEROV)
    if HAS_MOM:
        tl.store(b_ptrs, _cast_out(b, b_ptr.dtype.element_ty, SOFT_BF16_B), mask=mask)
    return _cast_out(w_new, w_ptr.dtype.element_ty, SOFT_BF16_W), w_ptrs


@triton.jit
def _sgd_maxnorm_kernel(
    w_ptr, g_ptr, b_ptr, r_ptr, r_val, lr, wd, mom, damp,
    M, N,
    stride_wm, stride_wn, stride_gm, stride_gn, stride_bm, stride_bn,
    CMP_POW: tl.constexpr,
    SCALE_POW: tl.constexpr,
    RADIUS_IS_PTR: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_MOM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    SOFT_BF16_W: tl.constexpr,
    SOFT_BF16_B: tl.constexpr,
):
    """One SGD step then the MaxNorm projection of the updated rows. The new weight is rounded to its dtype
    before its norm is taken, so the result equals `SGD step (fp32 math, one rounding)` then `maxnorm_`."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)
    if RADIUS_IS_PTR:
        r = tl.load(r_ptr).to(tl.float32)
    else:
        r = r_val
    w_ty = w_ptr.dtype.element_ty

    if ONE_CHUNK:
        mask = row_ok[:, None] & (cols < N)[None, :]
        w_q, w_ptrs = _sgd_chunk(w_ptr, g_ptr, b_ptr, rows64, cols.to(tl.int64)[None, :], mask, stride_wm, stride_wn,
                                 stride_gm, stride_gn, stride_bm, stride_bn, lr, wd, mom, damp, HAS_WD, HAS_MOM,
                                 FIRST_STEP, NESTEROV, SOFT_BF16_W, SOFT_BF16_B)
        w_r = w_q.to(tl.float32)  # exact for fp32
        ss = tl.sum(w_r * w_r, axis=1)
        clip, scale = _row_clip_scale(ss, r, CMP_POW, SCALE_POW)
        tl.store(w_ptrs, _cast_out(w_r * scale[:, None], w_ty, SOFT_BF16_W), mask=mask)
    else:
        # pass 1: update and store every chunk, accumulating the squared new weights
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_ok[:, None] & (c < N)[None, :]
            w_q, w_ptrs = _sgd_chunk(w_ptr, g_ptr, b_ptr, rows64, c.to(tl.int64)[None, :], mask, stride_wm,
                                     stride_wn, stride_gm, stride_gn, stride_bm, stride_bn, lr, wd, mom, damp, HAS_WD,
                                     HAS_MOM, FIRST_STEP, NESTEROV, SOFT_BF16_W, SOFT_BF16_B)
            tl.store(w_ptrs, w_q, mask=mask)
            w_r = w_q.to(tl.float32)
            acc += w_r * w_r
        ss = tl.sum(acc, axis=1)
        clip, scale = _row_clip_scale(ss, r, CMP_POW, SCALE_POW)
        # pass 2: rescale the clipped rows only. This program wrote them in pass 1; the barrier makes those
        # global stores visible to every thread of the block whatever the layout puts each element on.
        n_clip = tl.sum(clip.to(tl.int32), axis=0)
        tl.debug_barrier()
        if n_clip > 0:
            _rescale_rows(w_ptr + rows64 * stride_wm, stride_wn, N, row_ok & clip, scale, w_ty, SOFT_BF16_W, BLOCK_N)


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


def _launch(kernel, weight: torch.Tensor, radius, cmp_pow: float, scale_pow: float, **args) -> torch.Tensor:
    """Launch `kernel` (either kernel above) on BLOCK_M-row blocks of the 2-D `weight` with what both take alike:
    the weight, its shape, the radius (a Python float by value, or a 0-d fp32 tensor on the weight's device by
    pointer), the rule's powers and the tiling; `args` are the kernel's other arguments, by name. An empty weight
    launches nothing."""
    M, N = weight.shape
    if M == 0 or N == 0:
        return weight
    block_m, block_n, num_warps = _pick_config(M, N, weight.stride(0), weight.stride(1))
    if isinstance(radius, torch.Tensor):
        r_ptr, r_val, radius_is_ptr = radius, 0.0, True
    else:
        # r_ptr is never read when RADIUS_IS_PTR is False; any valid pointer will do
        r_ptr, r_val, radius_is_ptr = weight, float(radius), False
    kernel[(triton.cdiv(M, block_m),)](
        w_ptr=weight, r_ptr=r_ptr, r_val=r_val, M=M, N=N, CMP_POW=float(cmp_pow), SCALE_POW=float(scale_pow),
        RADIUS_IS_PTR=radius_is_ptr, BLOCK_M=block_m, BLOCK_N=block_n, ONE_CHUNK=N <= block_n, num_warps=num_warps,
        **args)
    return weight


def maxnorm_triton_(weight: torch.Tensor, radius, cmp_pow: float, scale_pow: float) -> torch.Tensor:
    """Launch the kernel on a validated 2-D floating weight: rows with ||w||**cmp_pow > radius are scaled by
    radius / ||w||**scale_pow. `radius` is a Python float or a 0-d fp32 tensor on the weight's device. Checks
    and the choice of rule are done by the caller (bigltr.ops.maxnorm.maxnorm_)."""
    return _launch(_maxnorm_kernel, weight, radius, cmp_pow, scale_pow, stride_m=weight.stride(0),
                   stride_n=weight.stride(1), SOFT_BF16=INTERPRETED and weight.dtype == torch.bfloat16)


def sgd_maxnorm_triton_(weight, grad, buf, radius, *, cmp_pow, scale_pow, lr, weight_decay, momentum, dampening,
                        nesterov, first_step) -> torch.Tensor:
    """Launch the fused SGD + MaxNorm kernel on validated tensors (see bigltr.ops.maxnorm.sgd_maxnorm_).
    `buf` may be None when momentum == 0."""
    has_mom = momentum != 0
    b = buf if has_mom else weight  # never read or written without momentum
    return _launch(_sgd_maxnorm_kernel, weight, radius, cmp_pow, scale_pow, g_ptr=grad, b_ptr=b, lr=float(lr),
                   wd=float(weight_decay), mom=float(momentum), damp=float(dampening), stride_wm=weight.stride(0),
                   stride_wn=weight.stride(1), stride_gm=grad.stride(0), stride_gn=grad.stride(1),
                   stride_bm=b.stride(0), stride_bn=b.stride(1), HAS_WD=weight_decay != 0, HAS_MOM=has_mom,
                   FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov),
                   SOFT_BF16_W=INTERPRETED and weight.dtype == torch.bfloat16,
                   SOFT_BF16_B=INTERPRETED and b.dtype == torch.bfloat16)
