"""A pass over the device, and how it is watched: mixed precision (autocast, the fp16 GradScaler), peak memory, and
the progress bar of training and evaluation passes. (Which device: bigltr.distributed.resolve_device.)"""
from __future__ import annotations

import contextlib
import sys

import torch
from tqdm import tqdm


def autocast(device: torch.device, amp: str):
    """The autocast context of `amp` (none | bf16 | fp16) on `device`."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise RuntimeError("amp=fp16 needs a CUDA device; use amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def peak_memory_mib(device: torch.device) -> float:
    """Peak RSS of this process on CPU; peak allocated device memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress(iterable, total: int, desc: str):
    """A bar on a terminal; in logs (CI, Slurm) the per-epoch lines say enough."""
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
