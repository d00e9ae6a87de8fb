"""Stage losses: plain cross-entropy and the class-balanced loss of Cui et al. (2019).

Effective-number weights: w_c = (1 - beta) / (1 - beta ** n_c), normalised so that sum_c w_c = C.
Two class-balanced variants:
- `cb_ce` (default, the paper's intent): softmax cross-entropy with per-sample weight w_y,
  mean over the batch of w_y * CE_i (the reduction of Cui et al.'s reference code).
- `cb_official_bce` (the weight-balancing code): binary cross-entropy between the softmax probabilities and
  one-hot targets, each sample's row weighted by w_y, averaged over batch x classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def class_balanced_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if (counts <= 0).any():
        bad = [i for i, c in enumerate(class_counts) if c <= 0]
        raise ValueError(f"class-balanced weights need every class to have training images; empty classes: {bad}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"cb beta must be in (0, 1), got {beta}")
    effective = 1.0 - torch.pow(beta, counts)
    w = (1.0 - beta) / effective
    return (w / w.sum() * len(counts)).to(torch.float32)


class CBCrossEntropy(nn.Module):
    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target, reduction="none")
        return (self.weights[target] * ce).mean()


class CBOfficialBCE(nn.Module):
    """BCE on softmax probabilities vs one-hot, weighted per sample by w_y, mean over batch x classes."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(dim=1)
        onehot = F.one_hot(target, probs.shape[1]).to(probs.dtype)
        w = self.weights[target].unsqueeze(1).expand_as(probs)
        return F.binary_cross_entropy(probs, onehot, weight=w, reduction="mean")


def build_loss(name: str, class_counts: Sequence[int], beta: float = 0.9999) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss()
    weights = class_balanced_weights(class_counts, beta)
    if name == "cb_ce":
        return CBCrossEntropy(weights)
    if name == "cb_official_bce":
        return CBOfficialBCE(weights)
    raise ValueError(f"unknown loss '{name}' (ce, cb_ce, cb_official_bce)")
