"""One-stage weight balancing (Hasegawa & Sato, "Exploring weight balancing on long-tailed recognition problem",
ICLR 2024, sec. 5 and their public code github.com/HN410/Exploring-Weight-Balancing-on-Long-Tailed-Recognition-Problem).

Their analysis splits two-stage weight balancing (WB) into (1) WD + CE raising the Fisher discriminant ratio of the
features and (2) WD + class-balanced loss acting as an implicit *multiplicative* logit adjustment, and proposes a
one-stage replacement:

    train backbone + fixed simplex-ETF classifier with CE + weight decay + a feature-norm regulariser,
    then predict with the multiplicative logit adjustment logits * pi_y^(-tau) (post-hoc, no training).

What their code does (read from its files; ours is written independently):
- The classifier (utils/model_units.py: `get_standard_etf`, `get_general_etf`, `ETFClassifier`): row y is
  m_y = sqrt(C/(C-1)) * U (e_y - 1/C) with U the first C columns of a random D x D orthogonal matrix
  (scipy `ortho_group`), so rows have unit norm and pairwise cosine -1/(C-1). It is stored as direction x norm
  (`weight_vec` x `weight_norm`, norm 1 for every class with the default etf_norm_rate = 1); neither is trained
  (utils/network_arch_resnet.py: `ResnetEncoder.__init_trained_params_list__` only adds the fc bias, and the norm
  only if train_etf_norm, False in jsons/*/first.json). No temperature or logit scale. It HAS a bias, trained,
  initialised U(-1/D, 1/D), and not weight-decayed (utils/regularizers.py: `calc_decayed_labels` selects no fc
  class when use_etf and not train_etf_norm, so the fc weight and bias get no decay).
- The feature regulariser (utils/regularizers.py: `set_features_regularization`): loss += lambda_f *
  mean_i ||h_i||_2^2 / 2, h_i the penultimate feature of sample i (the pooled backbone output that enters the
  classifier, before it), mean over the batch. lambda_f = 0.01 (`optim.features_regularization`).
- Weight decay (utils/regularizers.py: `set_weight_decay`): loss += wd * sum ||theta||^2 / 2 over every trained
  backbone parameter (conv, BN weight and bias), i.e. coupled L2 with SGD; wd = 5e-3.
- Defaults (jsons/Cifar100/first.json, jsons/Cifar10/first.json): ResNet-34, SGD momentum 0.9, lr 0.01, cosine
  annealing to 0 over 320 epochs, batch 64, WD 5e-3, lambda_f 1e-2, plain CE; then (jsons/*/second.json, 0
  epochs) `mla` with tau 0.65 on CIFAR-100-LT and tau 1.6 on CIFAR-10-LT (IF 100).

Ours: `simplex_etf` builds the same geometry for any D >= C-1 (their construction needs D >= C; the simplex spans
C-1 dimensions, so D = C-1 is enough), deterministically from a seed (float64 QR of a seeded Gaussian matrix with
the signs fixed, not scipy's global RNG). `ETFClassifier` keeps the ETF in a buffer named `weight` (so code
reading `classifier.weight` works, and no optimizer or weight decay ever sees it) and a trainable bias
(zeros at init, theirs is U(-1/D, 1/D); exclude it from weight decay to match them).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def helmert_basis(num_classes: int) -> torch.Tensor:
    """[C, C-1] float64, orthonormal columns spanning the vectors of R^C whose entries sum to zero."""
    c = num_classes
    h = torch.zeros(c, c - 1, dtype=torch.float64)
    for k in range(1, c):  # column k-1: (1, ..., 1, -k, 0, ...) / sqrt(k (k+1)), k ones
        h[:k, k - 1] = 1.0
        h[k, k - 1] = -float(k)
        h[:, k - 1] /= math.sqrt(k * (k + 1))
    return h


def random_orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """[rows, cols] float64 with orthonormal columns, Haar-distributed, a function of the seed only."""
    g = np.random.default_rng(seed)
    a = torch.from_numpy(g.standard_normal((rows, cols)))
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d  # sign fix: makes the QR factor unique, hence Haar and deterministic


def simplex_etf(num_classes: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A simplex equiangular tight frame: [C, D], unit rows, <m_i, m_j> = -1/(C-1) for i != j.

    Gram matrix M M^T = C/(C-1) (I - 11^T/C). Needs C >= 2 and D >= C-1. Built in float64 then cast.
    """
    c, d = int(num_classes), int(dim)
    if c < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got {c}")
    if d < c - 1:
        raise ValueError(f"a simplex ETF of {c} classes needs feature dimension >= {c - 1} (num_classes - 1), "
                         f"got feature dimension {d}")
    base = math.sqrt(c / (c - 1)) * helmert_basis(c)  # [C, C-1], Gram C/(C-1) (I - 11^T/C)
    u = random_orthonormal(d, c - 1, seed)  # [D, C-1]: embeds the simplex in R^D, randomly rotated
    return (base @ u.T).to(dtype)


def etf_gram(num_classes: int) -> torch.Tensor:
    """The analytic Gram matrix of a unit simplex ETF, float64: 1 on the diagonal, -1/(C-1) elsewhere."""
    c = num_classes
    return torch.full((c, c), -1.0 / (c - 1), dtype=torch.float64).fill_diagonal_(1.0)


class ETFClassifier(nn.Module):
    """Fixed simplex-ETF linear classifier: logits = x @ M^T + b, M from `simplex_etf` (a buffer, never trained).

    `bias=True` (their setting): a trainable per-class bias initialised to zero; keep it out of weight decay.
    `scale` multiplies the (unit) rows; 1.0 is theirs (no temperature). `as_linear()` returns the equivalent
    nn.Linear, e.g. for `posthoc_classifier(..., "mla", tau, class_counts)` or for a checkpoint read as a Linear.
    """

    def __init__(self, in_features: int, num_classes: int, seed: int = 0, bias: bool = True, scale: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(num_classes)
        self.seed, self.scale = int(seed), float(scale)
        self.register_buffer("weight", simplex_etf(num_classes, in_features, seed) * self.scale)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype),
                                    None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def as_linear(self) -> nn.Linear:
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.out_features}, seed={self.seed}, "
                f"bias={self.bias is not None}, scale={self.scale:g}")


def feature_norm_penalty(features: torch.Tensor, weight: float) -> torch.Tensor:
    """Hasegawa & Sato's feature regulariser: weight * mean_i ||h_i||_2^2 / 2 over the batch (features [B, D]),
    computed in float32 (or the input's wider dtype). Add it to the loss with the penultimate features, the
    classifier's input; their weight (lambda_f) is 0.01."""
    f = features if features.dtype == torch.float64 else features.float()
    return weight * 0.5 * f.pow(2).sum(dim=1).mean()


class OneStageWBLoss(nn.Module):
    """CE(logits, y) + feature_norm_penalty(features, feature_weight): the one-stage objective without weight
    decay (WD stays in the optimizer, as in stage 1). forward(logits, target, features)."""

    def __init__(self, feature_weight: float = 0.01):
        super().__init__()
        if feature_weight < 0:
            raise ValueError(f"feature regulariser weight must be >= 0, got {feature_weight}")
        self.feature_weight = float(feature_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits.float(), target)
        return ce + feature_norm_penalty(features, self.feature_weight)


def class_mean_cosines(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       center: bool = False) -> torch.Tensor:
    """Pairwise cosines of the class means of `features`, [C, C] float64; a diagnostic for the ETF geometry
    (neural collapse: off-diagonal -> -1/(C-1)). `center=True` subtracts the mean of the class means first (the
    neural-collapse convention; needed when features are non-negative, e.g. after a ReLU)."""
    f = features.double()
    means = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, device=f.device)
    means.index_add_(0, labels, f)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(f)
    means = means / counts[:, None]
    if center:
        means = means - means.mean(dim=0, keepdim=True)
    unit = means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


class FeaturePenalizedLoss(nn.Module):
    """`loss(logits, y) + feature_norm_penalty(h, weight)`, h being the classifier's input in the same forward pass
    (the pooled features): a forward pre-hook on `classifier` keeps it, so the model is called and wrapped (DDP,
    FSDP2, DeepSpeed) exactly as without the penalty. Stage 1 of one-stage weight balancing (`stage1.feature_reg`)."""

    def __init__(self, loss: nn.Module, classifier: nn.Module, weight: float):
        super().__init__()
        if weight < 0:
            raise ValueError(f"feature regulariser weight must be >= 0, got {weight}")
        self.loss, self.weight, self._features = loss, float(weight), None
        classifier.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self._features = args[0]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError("FeaturePenalizedLoss: the classifier has not run in this forward pass")
        h, self._features = self._features, None
        return self.loss(logits, target) + feature_norm_penalty(h, self.weight)
