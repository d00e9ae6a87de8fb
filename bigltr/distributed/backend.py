"""The protocol every backend implements, and the DCP checkpointing that one process, DDP and FSDP2 share.

A backend is chosen once, by `Dist` (world size 1: `DDPBackend` without a wrapper, whatever `dist.backend` says),
and answers every backend-specific question; the stages only see `Dist` and the `Trainable` it returns.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn as nn

from bigltr.checkpoint import dcp_load, dcp_save, verify_dcp
from bigltr.distributed.trainable import Trainable
from bigltr.ops import maxnorm_clipped_

WHAT = ("model", "classifier")  # what `prepare` wraps: stage 1's whole network, or stage 2's classifier


class Backend(Protocol):
    name: str  # for `Dist.describe`: "ddp", "fsdp2", "deepspeed ZeRO-2"
    checkpoint_format: str  # how `save_train_state` writes: "dcp" or "deepspeed"
    checkpoint_reshards: bool  # a checkpoint of this format loads on another world size (at an epoch end)
    zero_stage: int | None  # the ZeRO stage the checkpoint's partitions follow (meta.pt); None: not DeepSpeed
    rows_sharded: bool  # the projector's clipped-row count covers only this rank's rows (summed over ranks)

    def join(self, timeout_s: float) -> None:
        """Called once by `Dist.setup`, after the torch process group exists."""

    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *, what: str,
                scaler, accum_steps: int, micro_batch_size: int) -> Trainable:
        """Wrap `module` (`what`: "model" or "classifier") for training; `make_optimizer` is called when the
        backend needs the optimizer (after sharding, before an engine takes it over)."""

    @property
    def row_projector(self) -> Callable:
        """`project(weight, radius, tau, projection) -> rows clipped`: MaxNorm on the classifier as this backend
        stores it (the maths: `bigltr.ops`)."""

    def full_state_dict(self, model: nn.Module) -> dict:
        """The whole model's state on every rank (a collective where parameters are sharded)."""

    def save_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        """Model and optimizer, sharded: each rank writes its own part (collective)."""

    def verify_train_state(self, directory: Path) -> None:
        """Raise CheckpointError unless the model/optimizer part of a resume folder is complete and safe to load
        (no collective)."""

    def load_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        """Load what `save_train_state` wrote (the caller has checked `checkpoint_format`)."""


def state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class DcpBackend:
    """One process, DDP and FSDP2: torch.distributed.checkpoint (DCP) with `get_state_dict` / `set_state_dict`.

    FSDP2 ranks write their shards; DDP's replicated tensors are written once; DCP reshards on load, so these
    checkpoints are interchangeable (at an epoch end, also across world sizes). MaxNorm runs on the weight as this
    rank holds it (`maxnorm_clipped_`): the whole weight, or FSDP2's whole local rows.
    """
    checkpoint_format = "dcp"
    checkpoint_reshards = True
    zero_stage = None
    rows_sharded = False

    def __init__(self, distributed: bool):
        self.distributed = distributed

    def join(self, timeout_s: float) -> None:
        pass

    @property
    def row_projector(self) -> Callable:
        return maxnorm_clipped_

    def full_state_dict(self, model: nn.Module) -> dict:
        return state_copy(model)

    def save_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        directory = Path(directory)
        model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
        with _quiet_single_process_dcp():
            dcp_save({"model": model_sd, "optim": optim_sd}, directory / self.checkpoint_format,
                     no_dist=not self.distributed)

    def verify_train_state(self, directory: Path) -> None:
        verify_dcp(Path(directory) / self.checkpoint_format)

    def load_train_state(self, directory: Path, model: nn.Module, trainer: Trainable) -> None:
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state_dir = Path(directory) / self.checkpoint_format
        model_sd, optim_sd = get_state_dict(model, trainer.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single_process_dcp():
            dcp_load(state, state_dir, no_dist=not self.distributed)  # never unpickles anything but DCP metadata
        set_state_dict(model, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _quiet_single_process_dcp():
    """DCP warns on every single-process save and load that it is single-process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
