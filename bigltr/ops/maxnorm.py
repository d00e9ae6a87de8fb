"""MaxNorm: in-place projection of each row of a 2-D weight onto an L2 ball (Alshammari et al., CVPR 2022).

The constraint is ||w_c||_2 ** tau <= radius for each row w_c of `weight`. Two rules (`projection`):

* "exact" (default): the Euclidean projection onto that ball, which is {||w_c|| <= radius ** (1/tau)}:
      if ||w_c|| > radius ** (1/tau):   w_c <- w_c * radius ** (1/tau) / ||w_c||
* "official" (ShadeAlsha/LTR-weight-balancing, MaxNorm_via_PGD): the same test, but the scale has tau twice,
      if ||w_c|| ** tau > radius:        w_c <- w_c * radius / ||w_c|| ** (tau * tau)
  which does not land on the ball for tau != 1 (the new norm is radius * ||w_c|| ** (1 - tau*tau)).
Other rows are unchanged, bit for bit. With tau = 1 both rules are the paper's projected-gradient step onto
{w : ||w_c||_2 <= radius} and give the same bits. See docs/maxnorm.md.

Two implementations, with the same semantics:
* "torch": vectorised torch ops (fp32 row norms, per-row scale, one multiply; bf16/fp16 go through one fp32
  copy and are rounded once); any device.
* "triton": one kernel that reads the weight once and writes only the clipped rows (bigltr/ops/maxnorm_triton.py).
  It runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (for tests).
triton is imported only when the Triton path is taken, so this module works without triton installed.

`sgd_maxnorm_` fuses one torch.optim.SGD step with the projection (one kernel on the Triton path).
An FSDP2 DTensor whose rows are whole on each rank (Shard(0), Replicate) is edited through its local shard.
"""
from __future__ import annotations

import math
import numbers
import sys

import torch

_BACKENDS = ("auto", "torch", "triton")
_PROJECTIONS = ("exact", "official")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def maxnorm_(weight: torch.Tensor, radius, *, tau: float = 1.0, projection: str = "exact",
             backend: str = "auto") -> torch.Tensor:
    """Clip, in place, the L2 norm of every row of the 2-D tensor `weight` to `radius` (see module doc).

    Args:
        weight: 2-D floating tensor (fp32, bf16, fp16; fp64 on the torch path), contiguous or a strided view;
            the edit lands in its storage. Any number of rows, 0 included (an empty shard).
        radius: Python number >= 0, or a one-element tensor on the weight's device (never synchronised with
            the host; its sign is then not checked) or on the CPU.
        tau: the constraint is ||w_c|| ** tau <= radius (> 0).
        projection: "exact" (onto the ball) or "official" (the official code's scale r / ||w||**(tau*tau)).
        backend: "auto" (CUDA -> Triton when available, otherwise torch), "torch" or "triton".

    Returns:
        `weight`, edited in place.
    """
    out = weight
    weight = _local_rows(weight, "weight")
    backend = _check_args(weight, radius, tau, backend, projection)
    with torch.no_grad():  # a trainable parameter is edited in place, outside autograd
        if weight.numel() == 0:
            return out
        if backend == "auto":
            backend = "triton" if _auto_wants_triton(weight) else "torch"
        if backend == "triton":
            _maxnorm_via_triton(weight, radius, tau, projection)
        else:
            _maxnorm_torch_(weight, radius, tau, projection)
    return out


def maxnorm_clipped_(weight: torch.Tensor, radius, tau: float = 1.0, projection: str = "exact") -> torch.Tensor:
    """`maxnorm_`, returning how many rows it clipped, as a 0-d tensor on the weight's device (no host sync).
    For an FSDP2 DTensor: this rank's rows."""
    rows = _local_rows(weight, "weight")
    _check_args(rows, radius, tau, "auto", projection)
    with torch.no_grad():
        n = torch.linalg.vector_norm(rows.detach(), dim=1, dtype=torch.float32) if rows.numel() else \
            torch.zeros(rows.shape[0], device=rows.device)
        r, cmp_pow, _ = _rule(_radius_on(rows, radius, torch.float32), tau, projection)
        over = (_norm_pow(n, cmp_pow) > r).sum()
    maxnorm_(weight, radius, tau=tau, projection=projection)
    return over


def maxnorm_threshold(radius, tau: float = 1.0, projection: str = "exact"):
    """(r, p): the rule clips the rows with ||w||**p > r (for reports such as "rows at the radius")."""
    r, cmp_pow, _ = _rule(radius, tau, projection)
    return r, cmp_pow


def _rule(r, tau: float, projection: str):
    """The one place where tau and the projection rule become what the kernels compute: clip the rows with
    ||w|| ** cmp_pow > r_cmp and scale them by r_cmp / ||w|| ** scale_pow. Returns (r_cmp, cmp_pow, scale_pow).

    exact: {||w||**tau <= r} = {||w|| <= r**(1/tau)}, so it is an ordinary norm clamp (powers 1) at the radius
    r**(1/tau): the kernels run their tau = 1 path, and tau = 1 is exactly the plain norm clamp.
    official: the official code's `n = ||w||**tau; if n > r: w *= r / n**tau`. At tau = 1 the two coincide.
    `r` is a float or a 0-d tensor (then r**(1/tau) stays on its device: no host sync)."""
    tau = float(tau)
    if projection == "official":
        return r, tau, tau * tau
    return (r if tau == 1 else r ** (1.0 / tau)), 1.0, 1.0


def _norm_pow(norm: torch.Tensor, p: float) -> torch.Tensor:
    return norm if p == 1 else norm.pow(p)


def _local_rows(t, name: str):
    """A DTensor (FSDP2) whose rows are whole on each rank (Shard(0) or Replicate) is edited through its local
    shard, which FSDP2 keeps in sync with the parameter; rows split across ranks cannot be projected locally.
    The DTensor module is only looked up if already imported, so plain tensors pay nothing."""
    dt_mod = sys.modules.get("torch.distributed.tensor")
    if dt_mod is None or not isinstance(t, dt_mod.DTensor):
        return t
    for p in t.placements:
        if not (p.is_replicate() or p.is_shard(0)):
            raise ValueError(f"maxnorm_: {name} is a DTensor with placements {t.placements}; rows must be whole on "
                             "each rank (Shard(0) or Replicate): a row norm would need a collective")
    return t.to_local()


def _check_args(weight, radius, tau, backend, projection="exact") -> str:
    if projection not in _PROJECTIONS:
        raise ValueError(f"maxnorm_: unknown projection {projection!r}; expected one of {_PROJECTIONS}")
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"maxnorm_: unknown backend {backend!r}; expected one of {_BACKENDS}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"maxnorm_: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"maxnorm_: weight must be 2-D (rows = classes), got {weight.dim()}-D with shape {tuple(weight.shape)}; "
            "reshape it to (rows, -1) first"
        )
    if not weight.is_floating_point():
        raise TypeError(f"maxnorm_: weight must be a floating tensor (fp32, bf16, fp16), got {weight.dtype}")
    if any(st == 0 and n > 1 for st, n in zip(weight.stride(), weight.shape)):
        # an expanded (stride 0) view: several elements share memory, an in-place row edit is ill-defined
        raise ValueError(f"maxnorm_: weight has a zero stride {weight.stride()} (an expanded view); pass a real tensor")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (0 < float(tau) < math.inf):
        raise ValueError(f"maxnorm_: tau must be a finite number > 0, got {tau!r}")

    if isinstance(radius, torch.Tensor):
        if radius.numel() != 1:
            raise ValueError(f"maxnorm_: a tensor radius must have one element, got shape {tuple(radius.shape)}")
        if radius.is_complex() or radius.dtype == torch.bool:
            raise TypeError(f"maxnorm_: radius must be real, got {radius.dtype}")
        if radius.device.type == "cpu":
            # reading a CPU scalar costs no device sync, so it can be checked
            if not float(radius) >= 0:
                raise ValueError(f"maxnorm_: radius must be >= 0, got {float(radius)}")
        elif radius.device != weight.device:
            raise ValueError(f"maxnorm_: radius is on {radius.device} but weight is on {weight.device}")
    elif isinstance(radius, numbers.Real) and not isinstance(radius, bool):
        if not float(radius) >= 0:  # also rejects NaN
            raise ValueError(f"maxnorm_: radius must be >= 0, got {radius!r}")
    else:
        raise TypeError(f"maxnorm_: radius must be a number or a one-element tensor, got {type(radius).__name__}")
    return backend


def _auto_wants_triton(weight: torch.Tensor) -> bool:
    if not weight.is_cuda or weight.dtype not in _TRITON_DTYPES:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _radius_on(weight: torch.Tensor, radius, dtype: torch.dtype):
    """A Python float stays a float; a tensor becomes a 0-d `dtype` tensor on the weight's device.

    A CPU tensor for a CUDA weight is read on the host (no device sync), so that it can go by value."""
    if not isinstance(radius, torch.Tensor):
        return float(radius)
    if radius.device.type == "cpu" and weight.device.type != "cpu":
        return float(radius)
    return radius.reshape(()).to(dtype=dtype)  # async on the device; a no-op when already right


def _maxnorm_torch_(weight: torch.Tensor, radius, tau: float, projection: str) -> torch.Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rule = _rule(_radius_on(weight, radius, acc), tau, projection)
    # bf16/fp16: work on one fp32 copy. Measured on CPU, this beats both vector_norm(dtype=fp32) and an in-place
    # mul_ by an fp32 scale on the half tensor (mixed-dtype kernels are slow there), and it rounds once.
    w_acc = weight if weight.dtype == acc else weight.to(acc)
    norm = torch.linalg.vector_norm(w_acc, ord=2, dim=1)  # fp32 accumulation, no loop over rows
    w_acc.mul_(_scales(norm, *rule).unsqueeze(1))
    if w_acc is not weight:
        weight.copy_(w_acc)  # one rounding fp32 -> half
    return weight


def _scales(norm: torch.Tensor, r, cmp_pow: float, scale_pow: float) -> torch.Tensor:
    """Per-row factor (a `_rule`): r / ||w||**scale_pow where ||w||**cmp_pow > r, else exactly 1.0 (x * 1.0 is
    exact, and so is the round trip half -> fp32 -> half: unclipped rows stay bit for bit). r / n is inf for zero
    rows, but where() discards it."""
    n = _norm_pow(norm, cmp_pow)
    d = n if scale_pow == cmp_pow else _norm_pow(norm, scale_pow)
    return torch.where(n > r, r / d, 1.0)


# ------------------------------------------------------------------------------------------ flat partitions
# DeepSpeed ZeRO keeps weights (fp32 master, ZeRO-3 working copy) as flat 1-D slices of the flattened weight that
# start and end anywhere inside a row. Projecting rows then needs the row norms of the whole weight, which are sums
# of per-slice partial sums of squares: each rank reduces its slice to `num_rows` numbers, one all-reduce adds
# them, and each rank scales its own slice. The alternative, all-gathering the weight, moves num_rows x row_len
# values per step instead of num_rows.

def _row_segments(n: int, start: int, row_len: int):
    """The slice [start, start + n) of a row-major weight, split at row boundaries: (partial segments as
    (row, lo, hi) offsets into the slice, and the block of whole rows as (offset, first_row, end_row))."""
    end = start + n
    lo_row, hi_row = -(-start // row_len), end // row_len  # first whole row, one past the last whole row
    if lo_row > hi_row:  # inside one row
        return [(start // row_len, 0, n)], None
    head, tail = lo_row * row_len - start, end - hi_row * row_len
    parts = ([(lo_row - 1, 0, head)] if head else []) + ([(hi_row, n - tail, n)] if tail else [])
    return parts, ((head, lo_row, hi_row) if hi_row > lo_row else None)


def flat_row_sumsq(flat: torch.Tensor, start: int, num_rows: int, row_len: int) -> torch.Tensor:
    """Per-row sums of squares (fp32; fp64 for fp64) of the elements of a [num_rows, row_len] row-major weight that
    lie in `flat` = weight.view(-1)[start : start + flat.numel()]; 0 for rows the slice does not touch. Summed over
    slices that tile the weight (an all-reduce across ranks), they are the squared row norms."""
    if flat.dim() != 1 or start < 0 or start + flat.numel() > num_rows * row_len:
        raise ValueError(f"flat_row_sumsq: a 1-D slice [{start}, {start + flat.numel()}) of a {num_rows}x{row_len} "
                         f"weight expected, got shape {tuple(flat.shape)}")
    acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_rows, dtype=acc, device=flat.device)
    if flat.numel() == 0:
        return out
    parts, block = _row_segments(flat.numel(), start, row_len)
    for row, a, b in parts:
        out[row] += torch.linalg.vector_norm(flat[a:b], dtype=acc).square()
    if block is not None:
        off, r0, r1 = block
        rows = flat[off:off + (r1 - r0) * row_len].view(r1 - r0, row_len)
        out[r0:r1] = torch.linalg.vector_norm(rows, dim=1, dtype=acc).square()
    return out


def maxnorm_scales(sumsq: torch.Tensor, radius, *, tau: float = 1.0, projection: str = "exact") -> torch.Tensor:
    """The MaxNorm factor of every row from its (all-reduced) sum of squares: the same rule as `maxnorm_` (e.g.
    r**(1/tau) / ||w|| for the rows over the radius with projection="exact"), exactly 1.0 for the others."""
    if projection not in _PROJECTIONS:
        raise ValueError(f"maxnorm_scales: unknown projection {projection!r}; expected one of {_PROJECTIONS}")
    return _scales(sumsq.sqrt(), *_rule(_radius_on(sumsq, radius, sumsq.dtype), tau, projection))


def flat_rows_scale_(flat: torch.Tensor, start: int, row_len: int, scales: torch.Tensor) -> torch.Tensor:
    """Multiply, in place, each element of the slice `flat` (as in `flat_row_sumsq`) by its row's factor."""
    if flat.numel() == 0:
        return flat
    with torch.no_grad():
        parts, block = _row_segments(flat.numel(), start, row_len)
        for row, a, b in parts:
            flat[a:b].mul_(scales[row])  # computed in the factor's precision, rounded once for half slices
        if block is not None:
            off, r0, r1 = block
            flat[off:off + (r1 - r0) * row_len].view(r1 - r0, row_len).mul_(scales[r0:r1].unsqueeze(1))
    return flat


def _triton_module(weight: torch.Tensor):
    """Import the kernel module (and so triton) on first use, with clear errors when it cannot run here."""
    if weight.dtype not in _TRITON_DTYPES:
        raise TypeError(
            f"maxnorm_: the triton backend supports fp32, bf16 and fp16, got {weight.dtype}; use backend='torch'"
        )
    try:
        from bigltr.ops import maxnorm_triton
    except ImportError as exc:
        raise RuntimeError(f"maxnorm_: backend='triton' needs the triton package ({exc})") from exc
    if weight.device.type == "cpu" and not maxnorm_triton.INTERPRETED:
        raise RuntimeError(
            "maxnorm_: backend='triton' on a CPU tensor runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (or use backend='torch' / a CUDA tensor)"
        )
    return maxnorm_triton


def _maxnorm_via_triton(weight: torch.Tensor, radius, tau: float, projection: str) -> torch.Tensor:
    _triton_module(weight).maxnorm_triton_(weight, *_rule(_radius_on(weight, radius, torch.float32), tau, projection))
    _bump_version(weight)
    return weight


def _bump_version(t: torch.Tensor) -> None:
    # the kernel writes through a raw pointer: tell autograd the tensor changed, as an in-place torch op would
    # (so a graph that saved it for backward raises instead of silently using the new values)
    bump = getattr(torch.autograd.graph, "increment_version", None)
    if bump is not None:
        bump(t)


def sgd_maxnorm_(
    weight: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None = None,
    *,
    lr: float,
    radius,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    first_step: bool = False,
    tau: float = 1.0,
    projection: str = "exact",
    backend: str = "auto",
) -> torch.Tensor:
    """One torch.optim.SGD step on `weight` followed by `maxnorm_`, fused into one pass on the Triton path.

    Same update as torch.optim.SGD (maximize=False): d = grad + weight_decay * w; with momentum,
    buf = d on the first step (`first_step=True`, the buffer's old content is ignored) else
    buf = momentum * buf + (1 - dampening) * d, and d = d + momentum * buf (nesterov) or buf; w = w - lr * d.
    The arithmetic is fp32 with one rounding to the weight's dtype, then the MaxNorm projection is applied to
    that rounded weight: the result equals `maxnorm_(w_after_sgd, radius, tau=tau, projection=projection)`.
    `momentum_buffer` (needed when momentum != 0, same shape as weight) is updated in place. Returns `weight`.
    """
    out = weight
    weight, grad = _local_rows(weight, "weight"), _local_rows(grad, "grad")
    if momentum_buffer is not None:
        momentum_buffer = _local_rows(momentum_buffer, "momentum_buffer")
    backend = _check_args(weight, radius, tau, backend, projection)
    for name, t in (("grad", grad), ("momentum_buffer", momentum_buffer)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != weight.shape or t.device != weight.device:
            raise ValueError(f"sgd_maxnorm_: {name} must be a tensor of the weight's shape {tuple(weight.shape)} "
                             f"on {weight.device}")
        if not t.is_floating_point():
            raise TypeError(f"sgd_maxnorm_: {name} must be floating, got {t.dtype}")
    if momentum != 0 and momentum_buffer is None:
        raise ValueError("sgd_maxnorm_: momentum != 0 needs a momentum_buffer")
    if lr < 0 or momentum < 0 or weight_decay < 0:
        raise ValueError(
            f"sgd_maxnorm_: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}"
        )
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("sgd_maxnorm_: nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 first_step=first_step)
    with torch.no_grad():
        if weight.numel() == 0:
            return out
        if backend == "auto":
            backend = "triton" if _auto_wants_triton(weight) else "torch"
        if backend == "triton":
            maxnorm_triton = _triton_module(weight)
            buf = momentum_buffer if momentum != 0 else None
            r, cmp_pow, scale_pow = _rule(_radius_on(weight, radius, torch.float32), tau, projection)
            maxnorm_triton.sgd_maxnorm_triton_(weight, grad, buf, r, cmp_pow=cmp_pow, scale_pow=scale_pow, **hyper)
            _bump_version(weight)
            if buf is not None:
                _bump_version(buf)
        else:
            _sgd_torch_(weight, grad, momentum_buffer, **hyper)
            _maxnorm_torch_(weight, radius, tau, projection)
    return out


def _sgd_torch_(weight, grad, buf, *, lr, weight_decay, momentum, dampening, nesterov, first_step) -> None:
    # torch.optim.SGD's single-tensor update, in place; bf16/fp16 tensors go through fp32 copies (one rounding)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(acc)  # weight itself when already fp32
    d = grad.to(acc)  # never modified in place: it may be grad itself
    if weight_decay != 0:
        d = d.add(w, alpha=weight_decay)
    if momentum != 0:
        b = buf.to(acc)
        if first_step:
            b.copy_(d)
        else:
            b.mul_(momentum).add_(d, alpha=1.0 - dampening)
        if b is not buf:
            buf.copy_(b)
        d = d.add(b, alpha=momentum) if nesterov else b
    w.add_(d, alpha=-lr)
    if w is not weight:
        weight.copy_(w)
