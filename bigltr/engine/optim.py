"""The optimiser and its schedule: parameter groups for weight decay, SGD (L2 or Lp decay), the per-step cosine."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, scope: str) -> list[dict]:
    """scope 'all': decay every trainable parameter (official code); 'no_norm_bias': skip 1-D params (timm)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if scope == "all" or weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    if scope != "no_norm_bias":
        raise ValueError(f"unknown weight-decay scope '{scope}' (all, no_norm_bias)")
    decay = [p for _, p in params if p.ndim > 1]
    no_decay = [p for _, p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_sgd(groups: list[dict], lr: float, momentum: float, wd_p: float = 2.0) -> torch.optim.SGD:
    """SGD with coupled weight decay. wd_p = 2: torch.optim.SGD itself (its own L2 decay, bit for bit);
    otherwise LpSGD, whose decay is the gradient of (weight_decay / wd_p) * sum |w|^wd_p."""
    if wd_p == 2:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    from bigltr.objective.lp_decay import LpSGD

    return LpSGD(groups, lr=lr, momentum=momentum, wd_p=wd_p)


def cosine_schedule(optimizer, total_steps: int, warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine from the base LR to 0, after an optional linear warm-up (stepped after every update)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
