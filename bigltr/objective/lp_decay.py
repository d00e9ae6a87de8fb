"""Lp-norm weight decay (the paper's open question: weight decay with p != 2).

The penalty (lambda / p) * sum |w|^p has the gradient lambda * sign(w) * |w|^(p-1). Like torch.optim.SGD's
weight_decay (the p = 2 case, gradient lambda * w), it is coupled: added to the gradient before momentum, so
momentum, dampening and Nesterov see it exactly as they see SGD's own decay. p = 1 is the L1 (sparsity) decay, with
sign(0) = 0 so a zero weight stays put; p in (1, 2) decays small weights relatively harder than L2, p > 2 large
ones.

`LpSGD` is torch.optim.SGD with one more param-group key, `wd_p`. A subclass (not a wrapper) because DeepSpeed
wraps a torch optimizer and steps it on its own flat fp32 partitions, re-using the param groups (keys included);
the decay is element-wise, so it is the same on a flat slice, on FSDP2's DTensor shards (pointwise DTensor ops), or
on a whole tensor. Groups with wd_p == 2 are left to SGD's own weight_decay, untouched (bit for bit torch SGD).
"""
from __future__ import annotations

import math

import torch


def lp_decay_grad(w: torch.Tensor, p: float) -> torch.Tensor:
    """d/dw of (1/p) * sum |w|^p = sign(w) * |w|^(p-1) (0 at w = 0 for p = 1: sign(0) = 0)."""
    if p == 1:
        return torch.sign(w)
    if p == 2:
        return w
    return torch.sign(w) * w.abs().pow(p - 1)


def closure_loss(closure):
    """The loss of an optimizer step's `closure` (run with gradients enabled, as torch's optimizers do), or None
    without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_wd_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (1 <= float(p) < math.inf):
        raise ValueError(f"wd_p must be a finite number >= 1, got {p!r}")
    return float(p)


class LpSGD(torch.optim.SGD):
    """torch.optim.SGD whose weight decay is the gradient of (weight_decay / wd_p) * sum |w|^wd_p, per group.

    `wd_p` is a param-group key (default: the constructor's). For a group with wd_p != 2 and weight_decay != 0,
    `step` adds weight_decay * sign(w) |w|^(wd_p-1) to a copy of each gradient and runs SGD's own step with that
    gradient and weight_decay 0 (so SGD's momentum / Nesterov / foreach code does the rest, unchanged); the
    parameters' .grad and the group's weight_decay are restored afterwards. `maximize` is not supported (SGD would
    negate the decay with the gradient)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, wd_p: float = 2.0, **kwargs):
        if kwargs.get("maximize"):
            raise ValueError("LpSGD: maximize=True is not supported")
        self._default_wd_p = check_wd_p(wd_p)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("wd_p", self._default_wd_p)
        check_wd_p(param_group["wd_p"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        # load_state_dict goes through here: a state dict saved by plain SGD has groups without wd_p
        super().__setstate__(state)
        for g in self.param_groups:
            g.setdefault("wd_p", getattr(self, "_default_wd_p", 2.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        saved_wd, saved_grads = [], []
        try:
            for g in self.param_groups:
                if g["wd_p"] == 2 or g["weight_decay"] == 0:
                    continue  # SGD's own coupled L2 decay: exactly torch SGD
                for p in g["params"]:
                    if p.grad is not None:
                        saved_grads.append((p, p.grad))
                        # out of place: the caller's gradient is not modified (torch SGD does not modify it either)
                        p.grad = p.grad.add(lp_decay_grad(p, g["wd_p"]), alpha=g["weight_decay"])
                saved_wd.append((g, g["weight_decay"]))
                g["weight_decay"] = 0.0
            super().step()
        finally:
            for g, wd in saved_wd:
                g["weight_decay"] = wd
            for p, grad in saved_grads:
                p.grad = grad
        return loss
