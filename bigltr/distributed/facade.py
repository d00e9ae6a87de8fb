"""`Dist`: what the stages see of the distributed runtime.

Rank, world size, device, the few collectives the engine uses (`all_reduce_`, `gather_objects`, `all_gather_rows`,
`barrier`: torch.distributed's, the same under every backend), and every backend-specific operation delegated to the
backend object chosen once, when the `Dist` is made (`ddp.py`, `fsdp2.py`, `deepspeed.py`, behind
`backend.Backend`). The engine never asks which backend runs.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from bigltr.distributed.backend import WHAT, Backend
from bigltr.distributed.ddp import DDPBackend
from bigltr.distributed.deepspeed import DeepSpeedBackend
from bigltr.distributed.fsdp2 import FSDP2Backend
from bigltr.distributed.launch import BACKENDS, DistError, init_process_group
from bigltr.distributed.trainable import Trainable


def _choose_backend(name: str, rank: int, world_size: int, device: torch.device, zero_stage: int,
                    zero3_persistence_threshold: int) -> Backend:
    if world_size == 1:  # nothing to wrap, every collective a no-op, whatever the backend
        return DDPBackend(device, distributed=False)
    if name == "ddp":
        return DDPBackend(device, distributed=True)
    if name == "fsdp2":
        return FSDP2Backend()
    if name == "deepspeed":
        return DeepSpeedBackend(rank, device, zero_stage, zero3_persistence_threshold)
    raise DistError(f"dist.backend={name} is not one of {', '.join(BACKENDS)}")


class Dist:
    def __init__(self, backend: str, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None, zero_stage: int = 2, zero3_persistence_threshold: int = 100000):
        self.backend, self.rank, self.world_size, self.local_rank = backend, rank, world_size, local_rank
        self.device = device or torch.device("cpu")
        self._impl: Backend = _choose_backend(backend, rank, world_size, self.device, zero_stage,
                                              zero3_persistence_threshold)

    # ------------------------------------------------------------------------------------------ set-up
    @classmethod
    def setup(cls, backend: str, device_pref: str = "auto", expect_world_size: int = 0,
              timeout_s: float = 600.0, zero_stage: int = 2, zero3_persistence_threshold: int = 100000,
              amp: str = "none", accum_steps: int = 1) -> "Dist":
        rank, world, local_rank, device = init_process_group(backend, device_pref, expect_world_size, timeout_s,
                                                             zero_stage, amp, accum_steps)
        d = cls(backend, rank, world, local_rank, device, zero_stage, zero3_persistence_threshold)
        d._impl.join(timeout_s)
        return d

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        return f"{self.world_size} process(es) ({self._impl.name}, {dist.get_backend()})"

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            # every rank is done with the group before it goes: a rank that tears it down while another is still in
            # a collective can abort that rank, and a later group on the same store could read stale addresses
            dist.barrier()
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def checkpoint_format(self) -> str:
        """How `save_train_state` writes: "dcp" (one process, DDP, FSDP2: interchangeable) or "deepspeed"."""
        return self._impl.checkpoint_format

    @property
    def checkpoint_reshards(self) -> bool:
        """True when this format's checkpoints load on another world size at an epoch end (DCP); DeepSpeed's
        per-rank optimizer partitions do not."""
        return self._impl.checkpoint_reshards

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage this run's partitions (and its checkpoints) follow; None unless DeepSpeed runs."""
        return self._impl.zero_stage

    @property
    def rows_sharded(self) -> bool:
        """True when the projector's clipped-row count covers only this rank's rows (FSDP2): the counts are summed
        over ranks."""
        return self._impl.rows_sharded

    # ------------------------------------------------------------------------------------------ training
    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *, what: str,
                scaler=None, accum_steps: int = 1, micro_batch_size: int = 1) -> Trainable:
        """Wrap `module` for training: `what="model"` (stage 1's whole network: backbone and classifier) or
        `what="classifier"` (stage 2's classifier alone).

        `make_optimizer` is called after sharding (FSDP2's optimizer must see the DTensor parameters) and before
        DeepSpeed takes it over. The returned Trainable's `optimizer` is the torch optimizer: schedulers use it.
        """
        if what not in WHAT:
            raise ValueError(f"prepare(what={what!r}): must be one of {', '.join(WHAT)}")
        return self._impl.prepare(module, make_optimizer, what=what, scaler=scaler, accum_steps=accum_steps,
                                  micro_batch_size=micro_batch_size)

    @property
    def row_projector(self) -> Callable:
        """`project(weight, radius, tau, projection) -> rows clipped`: MaxNorm on the classifier as this backend
        stores it (`projection`: the rule of `bigltr.ops.maxnorm_`). DDP / one process: the weight; FSDP2: this
        rank's whole rows, no communication, the count is this rank's; DeepSpeed: partial row sums of the flat
        master partitions, one all-reduce, each rank scales its slices (`deepspeed.py`)."""
        return self._impl.row_projector

    # ------------------------------------------------------------------------------------------ state
    def full_state_dict(self, model: nn.Module) -> dict:
        """The whole model's state on every rank (a collective under FSDP2 and ZeRO-3: call it on all ranks)."""
        return self._impl.full_state_dict(model)

    def save_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        """Model and optimizer, sharded: each rank writes its own part (collective). DCP for one process, DDP and
        FSDP2; DeepSpeed's own engine format for ZeRO."""
        self._impl.save_train_state(directory, model, trainer)

    def verify_train_state(self, directory: Path) -> None:
        """Raise CheckpointError unless the model/optimizer part of a resume folder is complete and safe to load
        (no rank collective: every rank checks the same files)."""
        self._impl.verify_train_state(directory)

    def load_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        """The caller has checked that the checkpoint's format is this backend's (`checkpoint_format`)."""
        self._impl.load_train_state(directory, model, trainer)

    # ------------------------------------------------------------------------------------------ collectives
    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN,
                                   "max": dist.ReduceOp.MAX}[op])
        return t

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_gather_rows(self, t: torch.Tensor, out: torch.Tensor | None = None, *,
                        budget_bytes: int = 256 << 20) -> torch.Tensor:
        """Every rank's `t` (`[n_r, ...]`: n_r may differ, the other dims must agree) concatenated along dim 0 in rank
        order, on every rank (collective). Written into `out` (a contiguous `[sum n_r, ...]` tensor of t's dtype on
        any device, e.g. a memory-mapped file) or a new CPU tensor. Sent as bytes (any dtype over gloo or NCCL;
        NCCL through this rank's device) in rounds that receive at most `budget_bytes` per rank, so gathering a
        large feature cache needs no second copy of it in flight."""
        sizes = [int(s) for s in self.gather_objects(int(t.shape[0]))]
        total, row_elems = sum(sizes), math.prod(t.shape[1:])
        if out is None:
            out = torch.empty((total, *t.shape[1:]), dtype=t.dtype)
        if tuple(out.shape) != (total, *t.shape[1:]) or out.dtype != t.dtype or not out.is_contiguous():
            raise ValueError(f"all_gather_rows: out must be a contiguous {t.dtype} tensor of shape "
                             f"{(total, *t.shape[1:])}, got {out.dtype} {tuple(out.shape)}")
        src = t.contiguous().reshape(t.shape[0], row_elems).view(torch.uint8)  # [n_r, row bytes]
        dst = out.view(total, row_elems).view(torch.uint8)
        if not self.distributed:
            dst.copy_(src)
            return out
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        row_bytes = max(1, src.shape[1])
        chunk = max(1, budget_bytes // (self.world_size * row_bytes))
        offsets = [sum(sizes[:r]) for r in range(self.world_size)]
        for off in range(0, max(sizes), chunk):
            m = min(chunk, max(sizes) - off)
            send = torch.zeros((m, src.shape[1]), dtype=torch.uint8, device=comm)
            k = min(max(sizes[self.rank] - off, 0), m)
            send[:k] = src[off:off + k]
            recv = [torch.empty_like(send) for _ in range(self.world_size)]
            dist.all_gather(recv, send)
            for r, part in enumerate(recv):
                k = min(max(sizes[r] - off, 0), m)
                dst[offsets[r] + off:offsets[r] + off + k] = part[:k].to(dst.device)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
