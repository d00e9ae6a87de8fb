"""What a stage needs to know about the run: config, device, dataset facts, output folder, loaders."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigltr.config import Config
from bigltr.data.info import read_info, split_class_counts
from bigltr.data import check_trainable
from bigltr.data.verify import check_label_counts
from bigltr.data.balanced_stream import BalancedShardLoader
from bigltr.data.dali import DaliShardLoader, resolve_pipeline
from bigltr.data.loader import ShardLoader
from bigltr.data.transforms import build_transform
from bigltr.distributed import Dist
from bigltr.metrics import group_counts
from bigltr.models import check_etf_fits


@dataclass
class RunContext:
    """The run's facts, computed once when it is made (`create`, or the constructor with a read `info`): plain
    fields, so that a stage reads them without calling back into this module."""
    cfg: Config
    device: torch.device
    info: dict
    out: Path
    dist: Dist
    stop: object = None  # bigltr.engine.stop.StopGuard, set by the run
    # the split(s) trained on: "train" (protocol holdout), or the union the data lists as its official training
    # set (protocol refit: "train+val" when val was held out of train, else "train")
    train_split: str = field(init=False)
    has_val: bool = field(init=False)  # a validation split that is not trained on (per-epoch validation, reported val)
    class_counts: list[int] = field(init=False)  # training images per class of what is trained on (loss weights)
    group_counts: list[int] = field(init=False)  # what defines Many / Medium / Few: the official training counts
    num_classes: int = field(init=False)
    is_main: bool = field(init=False)

    def __post_init__(self):
        self.is_main = self.dist.is_main
        self.train_split = "train"
        if self.cfg.protocol == "refit":
            self.train_split = "+".join(self.info.get("official_train_splits") or ["train"])
        splits = self.info.get("splits", {})
        self.has_val = "val" in splits and "val" not in self.train_split.split("+")
        self.class_counts = split_class_counts(self.info, self.train_split)
        self.group_counts = group_counts(self.info)
        self.num_classes = len(self.info["class_counts"])

    @classmethod
    def create(cls, cfg: Config, dist: Dist) -> "RunContext":
        info = read_info(cfg.data.root)
        # a model that cannot hold the configured classifier stops here, before the shards are scanned or read
        check_etf_fits(cfg, len(info["class_counts"]))
        check_trainable(info)  # every class needs a training image: found now, not after stage 1
        # the train shards' labels must match class_hist/class_counts (loss weights, groups): cached tar-header scan
        check_label_counts(cfg.data.root, info, index_dir=cfg.data.dali_index_dir or None)
        for split in ("train", "test"):
            if split not in info["splits"]:
                raise FileNotFoundError(f"{cfg.data.root}/_info.json has no '{split}' split; bigltr needs train and "
                                        f"test (and val, to select under protocol=holdout)")
        if cfg.protocol == "holdout" and "val" not in info["splits"]:
            raise FileNotFoundError(f"{cfg.data.root}/_info.json has no 'val' split, which protocol=holdout selects "
                                    f"the best epoch on; use protocol=refit (fixed schedule, last epoch kept) or "
                                    f"convert with a validation hold-out (--val-per-class)")
        return cls(cfg=cfg, device=dist.device, info=info, out=Path(cfg.out), dist=dist)

    def loader(self, split: str, *, train: bool, batch_size: int, augment: bool | None = None,
               balanced: bool = False) -> ShardLoader:
        """train: shuffled, drop_last; augment (default = train): the training transform. balanced: class-balanced
        draws of single images (BalancedShardLoader, the torch reader: DALI reads shards front to back only)."""
        d = self.cfg.data
        augment = train if augment is None else augment
        if not balanced and resolve_pipeline(d.pipeline, self.device.type) == "dali":  # same shards, order, transforms
            return DaliShardLoader(d.root, split, batch_size=batch_size, train=train, img_size=d.img_size,
                                   in_chans=d.in_chans, mean=tuple(d.mean), std=tuple(d.std),
                                   aug=d.train_aug if augment else "none", augment=augment, seed=self.cfg.seed,
                                   num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, rank=self.dist.rank,
                                   world_size=self.dist.world_size, allow_partial=d.eval_partial and split != "train",
                                   device=self.device, index_dir=d.dali_index_dir or None)
        tf = build_transform(img_size=d.img_size, in_chans=d.in_chans, mean=tuple(d.mean), std=tuple(d.std),
                             train=augment, aug=d.train_aug if augment else "none")
        if balanced:
            return BalancedShardLoader(d.root, split, batch_size=batch_size, transform=tf, seed=self.cfg.seed,
                                       num_workers=d.num_workers, rank=self.dist.rank, world_size=self.dist.world_size,
                                       index_dir=d.dali_index_dir or None,
                                       pin_memory=d.pin_memory and self.device.type == "cuda")
        return ShardLoader(d.root, split, batch_size=batch_size, transform=tf, train=train, seed=self.cfg.seed,
                           num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                           pin_memory=d.pin_memory and self.device.type == "cuda", rank=self.dist.rank,
                           world_size=self.dist.world_size, allow_partial=d.eval_partial and split != "train")
