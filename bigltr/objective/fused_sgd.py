"""SGD whose step also applies MaxNorm to the constrained weight, in one pass (`bigltr.ops.sgd_maxnorm_`).

Same update as torch.optim.SGD (momentum, dampening, nesterov, weight decay; the momentum buffer is initialised to
the first step's gradient); `wd_p` != 2 makes the decay Lp, as `bigltr.objective.lp_decay.LpSGD`. A param group
with `radius` set (and `tau`, `projection`, as `bigltr.ops.maxnorm_`) is projected row-wise after its update
(paper eq. 5); groups without (the bias) are plain SGD. On GPU the constrained weight's update and projection are
one Triton kernel: the weight, gradient and buffer are read once and written once, where SGD.step + maxnorm_ read
the weight twice and launch several kernels (measured 2.6-2.8x faster on an H100, docs/maxnorm.md).
"""
from __future__ import annotations

import torch

from bigltr.objective.lp_decay import check_wd_p, closure_loss, lp_decay_grad
from bigltr.ops import sgd_maxnorm_


class SGDMaxNorm(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, radius: float | None = None, tau: float = 1.0, projection: str = "exact",
                 wd_p: float = 2.0):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, dampening=dampening, nesterov=nesterov,
                        radius=radius, tau=tau, projection=projection, wd_p=check_wd_p(wd_p))
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        # load_state_dict goes through here: groups saved before `projection` / `wd_p` existed get their defaults
        super().__setstate__(state)
        for g in self.param_groups:
            g.setdefault("projection", "exact")
            g.setdefault("wd_p", 2.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                first = "momentum_buffer" not in state
                buf = None
                if g["momentum"] != 0:
                    if first:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                grad, wd = p.grad, g["weight_decay"]
                if wd and g["wd_p"] != 2:
                    # Lp decay (bigltr.objective.lp_decay): added to the gradient before momentum, as the kernel
                    # adds the L2 one; one extra elementwise pass, the update + projection stay fused
                    grad, wd = grad.add(lp_decay_grad(p, g["wd_p"]), alpha=wd), 0.0
                if g["radius"] is not None:
                    sgd_maxnorm_(p, grad, buf, lr=g["lr"], radius=g["radius"], momentum=g["momentum"],
                                 weight_decay=wd, dampening=g["dampening"], nesterov=g["nesterov"],
                                 first_step=first, tau=g["tau"], projection=g["projection"])
                    continue
                d = grad.add(p, alpha=wd) if wd else grad
                if buf is not None:
                    if first:
                        buf.copy_(d)
                    else:
                        buf.mul_(g["momentum"]).add_(d, alpha=1 - g["dampening"])
                    d = d.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
                p.add_(d, alpha=-g["lr"])
        return loss
