"""CIFAR-style ResNets, registered with timm's model registry.

timm has no CIFAR ResNet (its `resnet32ts` is an ImageNet-style 16.6M model), so these two are written here:
- `resnet32_cifar`: He et al. (2016) CIFAR ResNet-32, 3 stages x 5 basic blocks, widths 16/32/64, parameter-free
  zero-padding shortcuts ("option A", as in the LDAM-DRW code the paper's CIFAR numbers build on), ~0.46M params.
- `resnet34_cifar`: what the official weight-balancing code actually trains: a ResNet-34 (3-4-6-3 basic blocks,
  widths 64-512) with a 3x3 stride-1 stem and no max-pool. Built from timm's own ResNet with the stem swapped.

Both follow timm's classifier interface (num_classes=0 -> pooled features, `num_features`, `reset_classifier`),
so `timm.create_model(name, num_classes=0)` works for them exactly as for any timm backbone. They are built through
timm's `build_model_with_cfg`, so timm's own weight loading works for them as well: no hub weights exist, but a
`bigltr-export` folder loads with `timm.create_model("local-dir:FOLDER", pretrained=True)` (after
`import bigltr.models`, which registers the names).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option A: subsample spatially, zero-pad channels
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 32, num_classes: int = 100, in_chans: int = 3, widths=(16, 32, 64),
                 drop_rate: float = 0.0, global_pool: str = "avg"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if global_pool != "avg":
            raise ValueError(f"CIFAR ResNet pools by averaging only (global_pool='avg'), got {global_pool!r}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.num_features = cin
        self.drop_rate = drop_rate
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def reset_classifier(self, num_classes: int, global_pool: str = "avg"):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self):
        return self.fc

    def forward_features(self, x):
        return self.blocks(F.relu(self.bn1(self.conv1(x))))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        if self.drop_rate:
            x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class CifarResNet34(ResNet):
    """What the official code trains on CIFAR: timm's ResNet-34 with a 3x3 stride-1 stem and no max-pool
    (torchvision resnet34 edited the same way)."""

    def __init__(self, in_chans: int = 3, **kwargs):
        super().__init__(block=BasicBlock, layers=(3, 4, 6, 3), in_chans=in_chans, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()


def _cfg(**kw):
    return {"num_classes": 100, "input_size": (3, 32, 32), "mean": (0.5071, 0.4865, 0.4409),
            "std": (0.2673, 0.2564, 0.2762), "interpolation": "bilinear", "crop_pct": 1.0, "first_conv": "conv1",
            "classifier": "fc", **kw}


# No weights are published: the cfgs describe the input and the layer names (first_conv, classifier) that timm's
# loader needs to load a bigltr-export folder.
default_cfgs = generate_default_cfgs({"resnet32_cifar": _cfg(), "resnet34_cifar": _cfg()})


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, "resnet32_cifar", pretrained, depth=32, **kwargs)


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(CifarResNet34, "resnet34_cifar", pretrained, **kwargs)
