"""What a stage needs to know about the run: config, device, dataset facts, output folder, loaders."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bigltr.config import Config
from bigltr.data.errors import DataError
from bigltr.data.info import read_info, split_class_counts, split_entry
from bigltr.data import check_trainable
from bigltr.data.verify import check_label_counts
from bigltr.data.dali import DaliShardLoader, resolve_pipeline
from bigltr.data.loader import ShardLoader
from bigltr.data.transforms import build_transform
from bigltr.distributed import Dist
from bigltr.metrics import group_counts


@dataclass
class RunContext:
    cfg: Config
    device: torch.device
    info: dict
    out: Path
    dist: Dist
    stop: object = None  # bigltr.engine.stop.StopGuard, set by the run

    @property
    def train_split(self) -> str:
        """The split(s) trained on: "train" (protocol holdout), or the union the data lists as its official training
        set (protocol refit: "train+val" when val was held out of train, else "train")."""
        if self.cfg.protocol == "refit":
            return "+".join(self.info.get("official_train_splits") or ["train"])
        return "train"

    @property
    def has_val(self) -> bool:
        """Whether a validation split exists that is not trained on (per-epoch validation, reported val)."""
        return "val" in self.info["splits"] and "val" not in self.train_split.split("+")

    @property
    def class_counts(self) -> list[int]:
        """Training images per class of what is trained on (the class-balanced loss weights)."""
        return split_class_counts(self.info, self.train_split)

    @property
    def group_counts(self) -> list[int]:
        """The counts that define Many / Medium / Few (bigltr.metrics.group_counts: the official training counts)."""
        return group_counts(self.info)

    @property
    def num_classes(self) -> int:
        return len(self.info["class_counts"])

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @classmethod
    def create(cls, cfg: Config, dist: Dist) -> "RunContext":
        info = read_info(cfg.data.root)
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

    def loader(self, split: str, *, train: bool, batch_size: int, augment: bool | None = None) -> ShardLoader:
        """train: shuffled, drop_last; augment (default = train): the training transform."""
        d = self.cfg.data
        augment = train if augment is None else augment
        if resolve_pipeline(d.pipeline, self.device.type) == "dali":  # same shards, order rules and transforms
            return DaliShardLoader(d.root, split, batch_size=batch_size, train=train, img_size=d.img_size,
                                   in_chans=d.in_chans, mean=tuple(d.mean), std=tuple(d.std),
                                   aug=d.train_aug if augment else "none", augment=augment, seed=self.cfg.seed,
                                   num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer, rank=self.dist.rank,
                                   world_size=self.dist.world_size, allow_partial=d.eval_partial and split != "train",
                                   device=self.device, index_dir=d.dali_index_dir or None)
        tf = build_transform(img_size=d.img_size, in_chans=d.in_chans, mean=tuple(d.mean), std=tuple(d.std),
                             train=augment, aug=d.train_aug if augment else "none")
        return ShardLoader(d.root, split, batch_size=batch_size, transform=tf, train=train, seed=self.cfg.seed,
                           num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                           pin_memory=d.pin_memory and self.device.type == "cuda", rank=self.dist.rank,
                           world_size=self.dist.world_size, allow_partial=d.eval_partial and split != "train")

    def data_losses(self, loader) -> dict:
        """Training samples skipped as corrupt or lost to a shard that ended early in the last epoch, summed over
        ranks. More than `data.max_skip_fraction` of the split stops the run (on every rank alike)."""
        local = torch.tensor([int(getattr(loader, "epoch_skipped", 0)), int(getattr(loader, "epoch_lost", 0))],
                             dtype=torch.long, device=self.device)
        skipped, lost = (int(v) for v in self.dist.all_reduce_(local, "sum").tolist())
        split = getattr(loader, "split", "train")
        total = split_entry(self.info, split)["num_samples"]
        limit = self.cfg.data.max_skip_fraction
        if skipped + lost > limit * total:
            raise DataError(f"{split} split of {self.cfg.data.root}: {skipped} corrupt sample(s) skipped and {lost} "
                            f"lost to shards that ended early in one epoch, {skipped + lost} of {total} > "
                            f"data.max_skip_fraction={limit}; check the shards with `tools/make_shards.py verify "
                            f"{self.cfg.data.root}`")
        return {"skipped": skipped, "lost": lost}
