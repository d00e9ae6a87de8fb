"""`Trainable`: what a stage trains, as the backend runs it (returned by `Dist.prepare`)."""
from __future__ import annotations

import torch
import torch.nn as nn


class Trainable:
    """What a stage trains, as the backend runs it: `trainable(x)`, `backward(loss, boundary)`, `step()`.

    `boundary` says whether this backward closes a gradient-accumulation group (the next call is `step()`):
    DeepSpeed reduces gradients only then (its subclass is `bigltr.distributed.deepspeed.EngineTrainable`). The loss
    arrives already divided by the accumulation steps.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scaler=None,
                 inner: nn.Module | None = None):
        self.module, self.optimizer, self.scaler = module, optimizer, scaler
        self.inner = inner if inner is not None else getattr(module, "module", module)  # the unwrapped module

    def __call__(self, x):
        return self.module(x)

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        """Optimizer step, then gradients cleared."""
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
