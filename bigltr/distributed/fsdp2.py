"""FSDP2: `torch.distributed.fsdp.fully_shard` per backbone block, then the backbone, then the classifier.

The blocks, the backbone and the classifier are separate units (torchtitan's per-block-then-parent pattern) because
stage 2 and evaluation call the backbone and the classifier one at a time. The classifier weight becomes a DTensor
sharded on dim 0, so each rank owns whole class rows and MaxNorm runs on its local rows with no gather; the
clipped-row counts are this rank's (`rows_sharded`). Checkpoints: DCP, each rank its shards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from bigltr.distributed.backend import DcpBackend
from bigltr.distributed.trainable import Trainable


class FSDP2Backend(DcpBackend):
    name = "fsdp2"
    rows_sharded = True

    def __init__(self):
        super().__init__(distributed=True)

    def prepare(self, module: nn.Module, make_optimizer: Callable[[], torch.optim.Optimizer], *, what: str,
                scaler=None, accum_steps: int = 1, micro_batch_size: int = 1) -> Trainable:
        from torch.distributed.fsdp import fully_shard

        if what == "model":  # stage 1: the whole model
            for block in _blocks(module.backbone):
                fully_shard(block)
            fully_shard(module.backbone)
            fully_shard(module.classifier)
        else:
            fully_shard(module)
        return Trainable(module, make_optimizer(), scaler)  # the optimizer sees the DTensor parameters

    def full_state_dict(self, model: nn.Module) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def _blocks(backbone: nn.Module) -> list[nn.Module]:
    """FSDP units inside a backbone: the children of every nn.Sequential (ResNet stages' blocks, ViT blocks)."""
    blocks = []
    for m in backbone.modules():
        if isinstance(m, nn.Sequential):
            blocks += [c for c in m.children() if any(p.numel() for p in c.parameters())
                       and not isinstance(c, nn.Sequential)]
    return blocks
