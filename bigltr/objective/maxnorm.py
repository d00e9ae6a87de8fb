"""The MaxNorm constraint on the classifier's class rows (projected gradient descent, paper eq. 5).

This module decides WHAT the constraint is (radius, when it applies) and reports whether it binds; the
in-place projection itself is the fused op `bigltr.ops.maxnorm_` (Triton on GPU, vectorised torch on CPU).
The bias is never constrained (as in the official code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bigltr.ops import maxnorm_clipped_
from bigltr.ops.maxnorm import maxnorm_threshold


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().norm(dim=1)


def resolve_radius(stage1_weight: torch.Tensor, mode: str, value: float) -> float:
    """absolute: delta = value; relative: delta = min + value * (max - min) of the stage-1 row norms."""
    if mode == "absolute":
        return float(value)
    if mode == "relative":
        n = row_norms(stage1_weight)
        return float(n.min() + value * (n.max() - n.min()))
    raise ValueError(f"unknown MaxNorm radius mode '{mode}' (relative, absolute)")


@dataclass
class MaxNormStats:
    radius: float
    clipped_rows: int  # rows projected since the last reset (summed over applications)
    applications: int
    norm_min: float
    norm_mean: float
    norm_max: float
    rows_at_radius: int  # rows on the boundary now (within 1e-5 relative): the ones the constraint holds


class MaxNorm:
    """Projects every class row with ||w_c||^tau > radius back to the ball; counts how often it binds.
    `projection`: "exact" (onto the ball, default) or "official" (the official code's scale; bigltr.ops.maxnorm).

    Clip counting reads one scalar per application (a host sync): it is accumulated on device and read only in
    `stats()`, which the engine calls at epoch end.
    """

    def __init__(self, radius: float, tau: float = 1.0, when: str = "step", projection: str = "exact"):
        if when not in ("step", "epoch", "off"):
            raise ValueError(f"MaxNorm when must be step, epoch or off, got '{when}'")
        if projection not in ("exact", "official"):
            raise ValueError(f"MaxNorm projection must be exact or official, got '{projection}'")
        self.radius, self.tau, self.when, self.projection = float(radius), float(tau), when, projection
        self._clipped = None
        self._applications = 0

    @torch.no_grad()
    def apply(self, weight: torch.Tensor, project: Callable = maxnorm_clipped_) -> None:
        """Project in place. `project(weight, radius, tau, projection)` does it the way the weight is stored and
        returns the number of rows it clipped (`Dist.row_projector`; default: a whole weight, or FSDP2's local rows)."""
        over = project(weight, self.radius, self.tau, self.projection)
        self._clipped = over if self._clipped is None else self._clipped + over
        self._applications += 1

    def state_dict(self) -> dict:
        """The counters since the last `stats()` (a resumed epoch reports the projections made before the stop)."""
        return {"clipped": int(self._clipped) if self._clipped is not None else 0, "applications": self._applications}

    def load_state_dict(self, state: dict) -> None:
        self._clipped = state["clipped"] if state["applications"] else None  # an int; device tensors are added
        self._applications = state["applications"]

    def after_step(self, weight: torch.Tensor, project: Callable = maxnorm_clipped_) -> None:
        if self.when == "step":
            self.apply(weight, project)

    def after_epoch(self, weight: torch.Tensor, project: Callable = maxnorm_clipped_) -> None:
        if self.when == "epoch":
            self.apply(weight, project)

    def stats(self, weight: torch.Tensor, reset: bool = True, dist=None) -> MaxNormStats:
        """Clipped-row count and row-norm spread over ALL classes, from the whole `weight`. `dist`: given when each
        rank counted clipped rows of its own rows only (FSDP2, `Dist.rows_sharded`), to sum the counts."""
        n = row_norms(weight)
        clipped = torch.as_tensor(self._clipped if self._clipped is not None else 0, device=n.device).float()
        if dist is not None:
            dist.all_reduce_(clipped, "sum")
        # the same threshold as the projection's test: ||w|| vs radius**(1/tau) (exact), ||w||**tau vs radius
        # (official; identical at tau = 1)
        r, p = maxnorm_threshold(self.radius, self.tau, self.projection)
        at = ((n if p == 1 else n.pow(p)) >= r * (1 - 1e-5)).sum()
        s = MaxNormStats(self.radius, int(clipped), self._applications, float(n.min()), float(n.mean()),
                         float(n.max()), int(at))
        if reset:
            self._clipped, self._applications = None, 0
        return s
