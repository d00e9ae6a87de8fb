"""Distributed runtime: the process group, the backend's model wrapping, and the few collectives the engine uses.

Everything backend-specific lives here, behind `Dist`; the engine never asks which backend runs.

- world size 1: nothing is wrapped, every collective is a no-op.
- `ddp`: DistributedDataParallel; stage 2 wraps only the classifier (the frozen backbone needs no communication).
- `fsdp2`: `torch.distributed.fsdp.fully_shard` per backbone block, then the backbone, then the classifier, as
  separate units (torchtitan's per-block-then-parent pattern). The classifier weight becomes a DTensor sharded
  on dim 0, so each rank owns whole class rows and MaxNorm runs on its local rows with no gather. The backbone and
  classifier are separate units because stage 2 and evaluation call them one at a time.

The process group is created here from the launcher's environment (torchrun, `accelerate launch`, srun): gloo on
CPU, NCCL on CUDA, with a collective timeout (`dist.timeout_s`) so the survivors of a dead rank exit instead of
hanging. Because the group is made here from WORLD_SIZE/RANK, `accelerate launch --multi_gpu` on CPU forms one job
with or without ACCELERATE_USE_CPU; `accelerate launch --cpu --num_processes 2` silently starts ONE process, which
`dist.world_size=2` turns into a start-up error.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger("bigltr")


class DistError(RuntimeError):
    """The launch does not match the config (world size, backend, distributed type)."""


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


class Dist:
    def __init__(self, backend: str, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | None = None):
        self.backend, self.rank, self.world_size, self.local_rank = backend, rank, world_size, local_rank
        self.device = device or torch.device("cpu")

    # ------------------------------------------------------------------------------------------ set-up
    @classmethod
    def setup(cls, backend: str, device_pref: str = "auto", expect_world_size: int = 0,
              timeout_s: float = 600.0) -> "Dist":
        world = _env_int("WORLD_SIZE", 1)
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise DistError("device=cuda requested but no CUDA device is available")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if expect_world_size and expect_world_size != world:
            raise DistError(
                f"dist.world_size={expect_world_size} but the launcher started {world} process(es). Known silent "
                f"failures: `accelerate launch --cpu --num_processes 2` runs ONE process; on CPU use "
                f"`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2` or torchrun.")
        if backend not in ("ddp", "fsdp2"):
            raise DistError(f"dist.backend={backend} is not available in this build (ddp, fsdp2)")
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return cls(backend, rank, world, local_rank, device)

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        return f"{self.world_size} process(es) ({self.backend}, {dist.get_backend()})"

    def shutdown(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------------------------------ models
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Stage 1: returns the module to call for training (the unwrapped `model` keeps its attributes)."""
        if not self.distributed:
            return model
        if self.backend == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model.backbone):
            fully_shard(block)
        fully_shard(model.backbone)
        fully_shard(model.classifier)
        return model

    def wrap_classifier(self, model: nn.Module) -> nn.Module:
        """Stage 2: only the classifier trains; returns the module to call for it."""
        if not self.distributed:
            return model.classifier
        if self.backend == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model.classifier, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.classifier)
        return model.classifier

    @staticmethod
    def local_rows(weight: torch.Tensor) -> torch.Tensor:
        """The class rows this rank owns (the whole weight unless it is a row-sharded DTensor)."""
        return weight.to_local() if hasattr(weight, "to_local") else weight

    def full_state_dict(self, model: nn.Module) -> dict:
        """The whole model's state on every rank (a collective under FSDP2: call it on all ranks)."""
        if self.distributed and self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def full_optim_state_dict(self, model: nn.Module, optimizer) -> dict:
        """The optimizer's whole state (gathered from FSDP2 shards; a collective there)."""
        if self.distributed and self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        return optimizer.state_dict()

    def load_full_optim_state_dict(self, model: nn.Module, optimizer, state: dict) -> None:
        if self.distributed and self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

    def load_full_state_dict(self, model: nn.Module, state: dict) -> None:
        """Load a full (unsharded) state dict into a possibly wrapped model."""
        if self.distributed and self.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state)

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

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """FSDP units inside a backbone: the children of every nn.Sequential (ResNet stages' blocks, ViT blocks)."""
    blocks = []
    for m in backbone.modules():
        if isinstance(m, nn.Sequential):
            blocks += [c for c in m.children() if any(p.numel() for p in c.parameters())
                       and not isinstance(c, nn.Sequential)]
    return blocks
