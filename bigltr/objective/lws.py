"""Learnable weight scaling, LWS (Kang et al., "Decoupling representation and classifier for long-tailed
recognition", ICLR 2020, sec. 4.2).

The stage-1 classifier is kept and frozen; one scale per class is learned (with class-balanced sampling, see
bigltr.data.balanced) on the frozen backbone's features: logits_y = s_y * (w_y . x + b_y), s initialised to 1.
The bias IS scaled: the paper writes the scaled classifier as f_i * w_i (no bias), and their reference code
(facebookresearch/classifier-balancing, models/TauNormClassifier.py, `DotProduct_Classifier.forward`) computes
`fc(x)` - the frozen nn.Linear, bias included - and multiplies the result by the per-class scales.

`folded()` returns the equivalent plain nn.Linear (row y and b_y times s_y) for evaluation, export or the
post-hoc rules of bigltr.objective.posthoc.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class LearnableWeightScaling(nn.Module):
    """logits = s * linear(x), s [C] a trainable Parameter (init 1), `linear` a frozen deep copy of the input.

    Only `scales` is trainable (the wrapped Linear's parameters have requires_grad False), so an optimizer built
    from `parameters()` filtered by requires_grad, or from `[lws.scales]`, trains s only. The input Linear is
    never modified.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LWS wraps an nn.Linear classifier, got {type(linear).__name__}")
        self.linear = copy.deepcopy(linear)
        self.linear.requires_grad_(False)
        w = self.linear.weight
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=w.device, dtype=w.dtype))

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scales.to(x.dtype)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        out = copy.deepcopy(self.linear)
        out.weight.mul_(self.scales[:, None].to(out.weight.dtype))
        if out.bias is not None:
            out.bias.mul_(self.scales.to(out.bias.dtype))
        out.requires_grad_(True)
        return out
