"""Stage losses: plain cross-entropy and the class-balanced loss of Cui et al. (2019).

Effective-number weights: w_c = (1 - beta) / (1 - beta ** n_c), normalised so that sum_c w_c = C.
Two class-balanced variants:
- `cb_ce` (default, the paper's intent): softmax cross-entropy with per-sample weight w_y,
  mean over the batch of w_y * CE_i (the reduction of Cui et al.'s reference code).
- `cb_official_bce` (the weight-balancing code): binary cross-entropy between the softmax probabilities and
  one-hot targets, each sample's row weighted by w_y, averaged over batch x classes.

Prior-corrected losses (standard long-tailed baselines; pi_y = n_y / sum_c n_c, the training prior):
- `la_ce`, logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 10):
  softmax cross-entropy on f_y(x) + tau * log pi_y. Only the loss sees the offset: predict with the plain logits
  f(x). tau = 1 is the paper's default (Fisher-consistent for the balanced error).
- `balanced_softmax` (Ren et al., "Balanced meta-softmax for long-tailed visual recognition", NeurIPS 2020,
  eq. 4): softmax cross-entropy on f_y(x) + log n_y. Since log n_y = log pi_y + log N and a softmax is unchanged by
  adding the same constant to every logit, this is exactly `la_ce` with tau = 1, and is implemented as such.
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


def log_prior(class_counts: Sequence[int]) -> torch.Tensor:
    """log pi_y = log(n_y / sum_c n_c) in float64; every class needs at least one training sample."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.numel() == 0:
        raise ValueError("the class prior needs at least one class")
    if (counts <= 0).any():
        bad = [i for i, c in enumerate(class_counts) if c <= 0]
        raise ValueError(f"the class prior log(pi) needs every class to have training images; empty classes: {bad}")
    return torch.log(counts / counts.sum())


class LogitAdjustedCE(nn.Module):
    """Logit-adjusted softmax cross-entropy (Menon et al., ICLR 2021): CE(f(x) + tau * log pi, y).

    The offset tau * log pi_y lowers the logits of frequent classes less than those of rare ones *during training*,
    so the network learns to give rare classes a larger margin; at test time predict with the plain logits f(x)
    (this module is the loss only, the model is unchanged). `tau = 1` with counts n_y is the balanced softmax of
    Ren et al. (NeurIPS 2020), see `BalancedSoftmaxCE`. The offset is a float32 buffer (moves with `.to(device)`,
    saved in the state dict), computed in float64 from the counts.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0):
        super().__init__()
        if tau < 0:
            raise ValueError(f"logit adjustment tau must be >= 0, got {tau}")
        self.tau = float(tau)
        self.register_buffer("offset", (self.tau * log_prior(class_counts)).to(torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float() + self.offset, target)

    def extra_repr(self) -> str:
        return f"num_classes={self.offset.numel()}, tau={self.tau:g}"


class BalancedSoftmaxCE(LogitAdjustedCE):
    """Balanced softmax (Ren et al., NeurIPS 2020): CE(f(x) + log n, y), i.e. `LogitAdjustedCE` with tau = 1
    (log n_y and log pi_y differ by the class-independent log N, which the softmax ignores)."""

    def __init__(self, class_counts: Sequence[int]):
        super().__init__(class_counts, tau=1.0)


LOSSES = ("ce", "cb_ce", "cb_official_bce", "la_ce", "balanced_softmax")


def build_loss(name: str, class_counts: Sequence[int], beta: float = 0.9999, la_tau: float = 1.0) -> nn.Module:
    """`la_tau` is used by `la_ce` only (`balanced_softmax` is `la_ce` with tau fixed to 1)."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "la_ce":
        return LogitAdjustedCE(class_counts, la_tau)
    if name == "balanced_softmax":
        return BalancedSoftmaxCE(class_counts)
    weights = class_balanced_weights(class_counts, beta)
    if name == "cb_ce":
        return CBCrossEntropy(weights)
    if name == "cb_official_bce":
        return CBOfficialBCE(weights)
    raise ValueError(f"unknown loss '{name}' ({', '.join(LOSSES)})")
