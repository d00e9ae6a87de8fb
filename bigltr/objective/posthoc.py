"""Post-hoc classifier normalisation used in the paper's ablation rows.

- tau-normalisation (Kang et al., ICLR'20): w_c <- w_c / ||w_c||^tau (tau = 1 gives the L2-normalised classifier).
The bias is dropped, as in the decoupling paper: a normalised classifier compares directions, and the stage-1
bias carries the same frequency prior the normalisation removes.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


@torch.no_grad()
def tau_normalized(classifier: nn.Linear, tau: float) -> nn.Linear:
    out = copy.deepcopy(classifier)
    norms = classifier.weight.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    out.weight.copy_(classifier.weight.float() / norms.pow(tau))
    if out.bias is not None:
        out.bias.zero_()
    return out


def posthoc_classifier(classifier: nn.Linear, method: str, tau: float = 1.0) -> nn.Linear:
    if method == "l2":
        return tau_normalized(classifier, 1.0)
    if method == "tau_norm":
        return tau_normalized(classifier, tau)
    raise ValueError(f"unknown post-hoc method '{method}' (l2, tau_norm)")
