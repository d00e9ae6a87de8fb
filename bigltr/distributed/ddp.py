"""DDP, and the one-process case (world size 1 wraps nothing, whatever `dist.backend` says).

Stage 1 wraps the whole model in DistributedDataParallel; stage 2 only the classifier (the frozen backbone needs no
communication). Every rank holds everything: MaxNorm runs on the weight itself, identically on every rank.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bigltr.distributed.backend import DcpBackend
from bigltr.distributed.trainable import Trainable


class DDPBackend(DcpBackend):
    name = "ddp"

    def __init__(self, device: torch.device, distributed: bool):
        super().__init__(distributed)
        self.device = device

    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *, what: str,
                scaler=None, accum_steps: int = 1, micro_batch_size: int = 1) -> Trainable:
        if not self.distributed:
            return Trainable(module, make_optimizer(), scaler)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return Trainable(nn.parallel.DistributedDataParallel(module, device_ids=ids), make_optimizer(), scaler)
