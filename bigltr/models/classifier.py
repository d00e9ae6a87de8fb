"""The model trained by both stages: `backbone` (any timm model, pooled features) + `classifier` (nn.Linear).

Stage 2 and MaxNorm address the classifier by this one attribute, never by guessing layer names.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn

from bigltr.config import Config, ConfigError
from bigltr.errors import BadInputError
from bigltr.models import cifar_resnet  # noqa: F401  (registry side effect)


class LTModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.num_features, num_classes, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


def build_model(name: str, num_classes: int, *, in_chans: int = 3, pretrained: bool = False,
                drop_rate: float = 0.0) -> LTModel:
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"config key 'model.name': '{name}' is not a timm model; closest: {close}")
    # num_classes=0: timm returns pooled features; the classifier is ours so every backbone looks the same.
    backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans,
                                 drop_rate=drop_rate)
    return LTModel(backbone, num_classes)


def build_checkpoint_model(ckpt: dict, cfg: Config, path) -> LTModel:
    """The LTModel of `cfg` (model.name, data.in_chans) holding the weights of a run's checkpoint `ckpt`
    (bigltr.checkpoint.load_run_checkpoint; `path` names it in errors), in eval mode, on the CPU. Weights that do not
    fit the model: BadInputError."""
    num_classes = int(ckpt["model"]["classifier.weight"].shape[0])
    model = build_model(cfg.model.name, num_classes, in_chans=cfg.data.in_chans, pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise BadInputError(f"{path}: the weights do not fit model.name={cfg.model.name} with data.in_chans="
                            f"{cfg.data.in_chans} and {num_classes} classes: {str(e).splitlines()[0]}") from None
    return model.eval()


def feature_dim(name: str, in_chans: int = 3) -> int:
    """The pooled feature dimension of timm backbone `name` (what the classifier sees), read from the model built
    on the meta device: no weights are allocated or initialised (milliseconds, any model size)."""
    if not timm.is_model(name):
        build_model(name, 1, in_chans=in_chans)  # the ConfigError naming the closest model names
    with torch.device("meta"):
        return int(timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans).num_features)


def check_etf_fits(cfg: Config, num_classes: int) -> None:
    """ConfigError unless `cfg`'s stage-1 classifier can be built for `num_classes` classes: `stage1.classifier=etf`
    (one-stage weight balancing) needs a simplex ETF, i.e. a feature dimension >= num_classes - 1. Cheap (the model
    on the meta device); the trainer calls it before any data is read, bigltr-ablation before any row trains. A
    config without the ETF passes."""
    if cfg.stage1.classifier != "etf":
        return
    dim = feature_dim(cfg.model.name, cfg.data.in_chans)
    if dim >= num_classes - 1:
        return
    raise ConfigError(
        f"config key 'stage1.classifier=etf': a simplex-ETF classifier of {num_classes} classes needs a feature "
        f"dimension >= {num_classes - 1} (num_classes - 1), but model.name={cfg.model.name} has {dim}-dim features; "
        f"use a backbone with a wider feature (>= {num_classes - 1}, e.g. model.name=resnet34_cifar: 512) or another "
        f"classifier (stage1.classifier=linear)")
