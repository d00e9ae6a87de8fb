"""Learnable weight scaling, LWS (Kang et al., "Decoupling representation and classifier for long-tailed
recognition", ICLR 2020, sec. 4.2).

The stage-1 classifier is kept and frozen; one scale per class is learned (with class-balanced sampling, see
bigltr.data.balanced) on the frozen backbone's features: logits_y = s_y * (w_y . x + b_y), s initialised to 1.
The bias IS scaled: the paper writes the scaled classifier as f_i * w_i (no bias), and their reference code
(facebookresearch/classifier-balancing, models/TauNormClassifier.py, `DotProduct_Classifier.forward`) computes
`fc(x)` - the frozen nn.Linear, bias included - and multiplies the result by the per-class scales.

One class, `LWSClassifier`: a drop-in for the model's nn.Linear head; `folded()` returns the equivalent plain
nn.Linear (row y and b_y times s_y) for evaluation, export or the post-hoc rules of bigltr.objective.posthoc.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class LWSClassifier(nn.Module):
    """LWS as a drop-in for a model's nn.Linear classifier (stage 2 with `stage2.classifier=lws`): logits =
    s * (W x + b), W and b the rows and bias of `linear` (frozen copies, Parameters with requires_grad False), s the
    trainable `scales` [C] (init 1). The only trainable parameter is `scales`.

    Its state_dict is the FOLDED nn.Linear's and nothing else: `weight` = s[:, None] * W and `bias` = s * b (float32
    products), so a model holding it writes last.pt / best.pt with the keys
    of an ordinary LTModel, and its `weight` / `bias` attributes read the same folded tensors (no grad).

    Loading a state dict does NOT change the head: the folded tensors cannot give back the scales exactly. The base
    rows are those given at construction (stage 1's), and the scales come back through `scale_state()` (an object
    with state_dict / load_state_dict: the resume checkpoint's per-rank state); when a folded state was loaded
    first, restoring the scales checks that base x scales reproduces it bit for bit (another stage-1 checkpoint
    would not) and raises RuntimeError otherwise.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LWS wraps an nn.Linear classifier, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.base_weight = nn.Parameter(w.clone(), requires_grad=False)
        self.base_bias = (None if linear.bias is None else
                          nn.Parameter(linear.bias.detach().clone(), requires_grad=False))
        self.scales = nn.Parameter(torch.ones(linear.out_features, device=w.device, dtype=w.dtype))
        self._loaded: dict | None = None  # the folded tensors of the last load_state_dict, checked by restore_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.base_bias is None else self.base_bias.to(x.dtype)
        return nn.functional.linear(x, self.base_weight.to(x.dtype), b) * self.scales.to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The folded rows s_y w_y (detached)."""
        return (self.base_weight * self.scales.detach()[:, None].to(self.base_weight.dtype)).detach()

    @property
    def bias(self) -> torch.Tensor | None:
        """The folded bias s_y b_y (detached), None without a bias."""
        if self.base_bias is None:
            return None
        return (self.base_bias * self.scales.detach().to(self.base_bias.dtype)).detach()

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base_bias is not None,
                        device=self.base_weight.device, dtype=self.base_weight.dtype)
        out.weight.copy_(self.weight)
        if self.base_bias is not None:
            out.bias.copy_(self.bias)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.base_bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ("weight", "bias") if self.base_bias is not None else ("weight",)
        loaded = {}
        for name in names:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            have = getattr(self, f"base_{name}")
            if tuple(state_dict[key].shape) != tuple(have.shape):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(state_dict[key].shape)}"
                                  f", the LWS head holds {tuple(have.shape)}")
                continue
            loaded[name] = state_dict[key].detach().to(have.device, have.dtype).clone()
        if strict:
            unexpected_keys += [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in names]
        self._loaded = loaded or None

    @torch.no_grad()
    def restore_scales(self, scales: torch.Tensor) -> None:
        """Set the scales exactly (a resume); checks them against the folded state loaded before, if any."""
        self.scales.copy_(scales.to(self.scales.device, self.scales.dtype))
        loaded, self._loaded = self._loaded, None
        for name, t in (loaded or {}).items():
            if not torch.equal(getattr(self, name), t):
                raise RuntimeError(f"LWS: the loaded classifier.{name} is not the base rows x the restored scales "
                                   f"(was the run resumed from another stage-1 checkpoint?)")

    def scale_state(self) -> "_ScaleState":
        """state_dict() / load_state_dict() of the scales alone (what a resume checkpoint carries for this head)."""
        return _ScaleState(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.base_bias is not None}"


class _ScaleState:
    def __init__(self, head: LWSClassifier):
        self.head = head

    def state_dict(self) -> dict:
        return {"scales": self.head.scales.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.head.restore_scales(state["scales"])
