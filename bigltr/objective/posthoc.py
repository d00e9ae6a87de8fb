"""Post-hoc classifiers: a trained nn.Linear rewritten, without training, into another nn.Linear.

- `l2` / `tau_norm`, tau-normalisation (Kang et al., "Decoupling representation and classifier for long-tailed
  recognition", ICLR'20): w_c <- w_c / ||w_c||^tau (tau = 1 gives the L2-normalised classifier). The bias is
  dropped, as in the decoupling paper: a normalised classifier compares directions, and the stage-1 bias carries
  the same frequency prior the normalisation removes.
- `la`, post-hoc logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, eq. 9):
  predict argmax_y f_y(x) - tau * log pi_y. As a Linear: same weight, bias b_y - tau * log pi_y (a bias-free
  classifier gets one). tau = 1 is the Bayes-optimal rule for the balanced error under a pure label shift.
- `mla`, multiplicative logit adjustment (Hasegawa & Sato, "Exploring weight balancing on long-tailed recognition
  problem", ICLR 2024, sec. 5; their code: utils/model_units.py, `LogitAdjuster` with use_additive=False, which
  returns logits * exp(-tau * log pi) at train and test time): f_y(x) * pi_y^(-tau). As a Linear: row w_y and bias
  b_y both scaled by pi_y^(-tau). Their default tau: 0.65 on CIFAR-100-LT and 1.6 on CIFAR-10-LT (IF 100,
  jsons/*/second.json). Note a negative logit becomes *more* negative for a rare class: the rule is meant for
  the ETF/WD-trained classifier of their one-stage method, whose logits for the predicted class are positive.

pi_y = n_y / sum_c n_c is the training prior (`class_counts`), computed in float64; the returned Linear keeps the
input's dtype and device, and the input is never modified.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

POSTHOC_METHODS = ("l2", "tau_norm", "la", "mla")


@torch.no_grad()
def tau_normalized(classifier: nn.Linear, tau: float) -> nn.Linear:
    out = copy.deepcopy(classifier)
    norms = classifier.weight.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    out.weight.copy_(classifier.weight.float() / norms.pow(tau))
    if out.bias is not None:
        out.bias.zero_()
    return out


def _log_prior(class_counts: Sequence[int] | None, num_classes: int, method: str) -> torch.Tensor:
    from bigltr.objective.losses import log_prior

    if class_counts is None:
        raise ValueError(f"post-hoc method '{method}' needs the training class counts (class_counts=...)")
    lp = log_prior(class_counts)
    if lp.numel() != num_classes:
        raise ValueError(f"post-hoc method '{method}': {lp.numel()} class counts for a classifier of "
                         f"{num_classes} classes")
    return lp


def _with_bias(classifier: nn.Linear) -> nn.Linear:
    """A copy of `classifier` that has a bias (zeros if it had none), same dtype and device."""
    w = classifier.weight
    out = nn.Linear(classifier.in_features, classifier.out_features, bias=True, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        out.bias.copy_(classifier.bias if classifier.bias is not None else torch.zeros_like(out.bias))
    out.weight.requires_grad_(w.requires_grad)
    return out


@torch.no_grad()
def logit_adjusted(classifier: nn.Linear, class_counts: Sequence[int], tau: float = 1.0) -> nn.Linear:
    """Menon et al. post-hoc rule as a Linear: W x + b - tau * log pi (weight unchanged)."""
    lp = _log_prior(class_counts, classifier.out_features, "la")
    out = _with_bias(classifier)
    out.bias.copy_((out.bias.double() - tau * lp.to(out.bias.device)).to(out.bias.dtype))
    return out


@torch.no_grad()
def multiplicative_logit_adjusted(classifier: nn.Linear, class_counts: Sequence[int], tau: float) -> nn.Linear:
    """Hasegawa & Sato post-hoc rule as a Linear: (W x + b) * pi^(-tau), i.e. row y and b_y times pi_y^(-tau)."""
    lp = _log_prior(class_counts, classifier.out_features, "mla")
    out = copy.deepcopy(classifier)
    scale = torch.exp(-tau * lp).to(out.weight.device)  # pi^(-tau), float64
    out.weight.copy_((out.weight.double() * scale[:, None]).to(out.weight.dtype))
    if out.bias is not None:
        out.bias.copy_((out.bias.double() * scale).to(out.bias.dtype))
    return out


def posthoc_classifier(classifier: nn.Linear, method: str, tau: float = 1.0,
                       class_counts: Sequence[int] | None = None) -> nn.Linear:
    """The post-hoc classifier `method` (one of POSTHOC_METHODS) of a trained Linear.

    `tau`: the exponent of tau_norm, or the strength of la / mla. `class_counts` (per-class training counts, in
    class order) is required by `la` and `mla` and ignored by the others. A fixed-ETF head (bigltr.objective.etf)
    is turned into a Linear first with `ETFClassifier.as_linear()`.
    """
    if method == "l2":
        return tau_normalized(classifier, 1.0)
    if method == "tau_norm":
        return tau_normalized(classifier, tau)
    if method == "la":
        return logit_adjusted(classifier, class_counts, tau)
    if method == "mla":
        return multiplicative_logit_adjusted(classifier, class_counts, tau)
    raise ValueError(f"unknown post-hoc method '{method}' ({', '.join(POSTHOC_METHODS)})")
