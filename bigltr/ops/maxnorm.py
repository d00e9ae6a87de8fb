"""MaxNorm: in-place projection of each row of a 2-D weight onto an L2 ball (Alshammari et al., CVPR 2022).

For each row w_c of `weight`:

    if ||w_c||_2 ** tau > radius:   w_c <- w_c * radius / ||w_c||_2 ** tau
    else:                           w_c unchanged (bit for bit)

With tau = 1 this is the paper's projected-gradient step onto {w : ||w_c||_2 <= radius}. See docs/maxnorm.md
for how this relates to the official code for tau != 1.

Two implementations, with the same semantics:
* "torch": vectorised torch ops (fp32 row norms, per-row scale, one in-place multiply); any device.
* "triton": one kernel that reads the weight once and writes only the clipped rows (bigltr/ops/maxnorm_triton.py).
  It runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (for tests).
triton is imported only when the Triton path is taken, so this module works without triton installed.
"""
from __future__ import annotations

import math
import numbers

import torch

_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def maxnorm_(weight: torch.Tensor, radius, *, tau: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Clip, in place, the L2 norm of every row of the 2-D tensor `weight` to `radius` (see module doc).

    Args:
        weight: 2-D floating tensor (fp32, bf16, fp16; fp64 on the torch path), contiguous or a strided view;
            the edit lands in its storage. Any number of rows, 0 included (an empty shard).
        radius: Python number >= 0, or a one-element tensor on the weight's device (never synchronised with
            the host; its sign is then not checked) or on the CPU.
        tau: exponent applied to the row norm before the comparison and in the scale (> 0).
        backend: "auto" (CUDA -> Triton when available, otherwise torch), "torch" or "triton".

    Returns:
        `weight`, edited in place.
    """
    backend = _check_args(weight, radius, tau, backend)
    with torch.no_grad():  # a trainable parameter is edited in place, outside autograd
        if weight.numel() == 0:
            return weight
        if backend == "auto":
            backend = "triton" if _auto_wants_triton(weight) else "torch"
        if backend == "triton":
            return _maxnorm_via_triton(weight, radius, tau)
        return _maxnorm_torch_(weight, radius, tau)


def _check_args(weight, radius, tau, backend) -> str:
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


def _maxnorm_torch_(weight: torch.Tensor, radius, tau: float) -> torch.Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    r = _radius_on(weight, radius, acc)
    # bf16/fp16: work on one fp32 copy. Measured on CPU, this beats both vector_norm(dtype=fp32) and an in-place
    # mul_ by an fp32 scale on the half tensor (mixed-dtype kernels are slow there), and it rounds once.
    w_acc = weight if weight.dtype == acc else weight.to(acc)
    norm = torch.linalg.vector_norm(w_acc, ord=2, dim=1)  # fp32 accumulation, no loop over rows
    n = norm if tau == 1 else norm.pow(float(tau))
    clip = n > r
    # unclipped rows get exactly 1.0: x * 1.0 is exact (and so is the round trip half -> fp32 -> half), so those
    # rows are unchanged bit for bit. r / n is inf for zero rows, but where() discards it.
    scale = torch.where(clip, r / n, 1.0)
    w_acc.mul_(scale.unsqueeze(1))
    if w_acc is not weight:
        weight.copy_(w_acc)  # one rounding fp32 -> half
    return weight


def _maxnorm_via_triton(weight: torch.Tensor, radius, tau: float) -> torch.Tensor:
    if weight.dtype not in _TRITON_DTYPES:
        raise TypeError(f"maxnorm_: the triton backend supports fp32, bf16 and fp16, got {weight.dtype}; use backend='torch'")
    try:
        from bigltr.ops import maxnorm_triton
    except ImportError as exc:
        raise RuntimeError(f"maxnorm_: backend='triton' needs the triton package ({exc})") from exc
    if weight.device.type == "cpu" and not maxnorm_triton.INTERPRETED:
        raise RuntimeError(
            "maxnorm_: backend='triton' on a CPU tensor runs only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (or use backend='torch' / a CUDA tensor)"
        )
    return maxnorm_triton.maxnorm_triton_(weight, _radius_on(weight, radius, torch.float32), tau)
