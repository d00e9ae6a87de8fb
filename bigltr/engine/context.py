"""What a stage needs to know about the run: config, device, dataset facts, output folder, loaders."""
from __future__ import annotations

import os
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
from bigltr.engine.common import evaluate
from bigltr.metrics import group_counts, summarize
from bigltr.objective.posthoc import posthoc_classifier
from bigltr.results import pack_per_class


@dataclass
class RunContext:
    cfg: Config
    device: torch.device
    info: dict
    out: Path
    dist: Dist
    stop: object = None  # bigltr.engine.resume.StopGuard, set by the run

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

    def evaluate(self, backbone, classifiers: dict, split_loader, amp: str, desc: str) -> dict:
        """Metrics per named classifier on one split (exact under several ranks)."""
        out = evaluate(backbone=backbone, classifiers=classifiers, loader=split_loader, num_classes=self.num_classes,
                       device=self.device, amp=amp, desc=desc, dist=self.dist)
        return {k: self.metrics(*v, split=split_loader.split) for k, v in out.items()}

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

    def metrics(self, correct: torch.Tensor, total: torch.Tensor, split: str | None = None) -> dict:
        """Group accuracies; with `split`, also checks that every sample of the split was evaluated: a partial
        val/test set is an error unless data.eval_partial, and is then reported as "N of M"."""
        m = summarize(correct, total, self.group_counts, self.cfg.data.many_thr, self.cfg.data.few_thr)
        m["per_class"] = pack_per_class(m["per_class"], total)  # arrays, small at 100k classes (bigltr.results)
        if split is None:
            return m
        n, expected = int(total.sum()), int(self.info["splits"][split]["num_samples"])
        m["samples"] = n
        if n < expected:
            if not self.cfg.data.eval_partial:
                raise DataError(f"{split} split of {self.cfg.data.root}: only {n} of {expected} samples could be "
                                f"evaluated (truncated shard or corrupt images); results over a partial {split} set "
                                f"are not comparable. Repair the shards (`tools/make_shards.py verify "
                                f"{self.cfg.data.root}`) or set data.eval_partial=true to report them as "
                                f"'{n} of {expected}'")
            m["expected_samples"] = expected
        return m


    def eval_key(self, amp: str) -> dict:
        """What a per-epoch validation result depends on besides the weights: stored with it in best.pt, so that the
        final evaluation reuses it only when it would compute the same numbers (`reusable_val`)."""
        d = self.cfg.data
        return {"data": os.path.abspath(d.root), "world_size": self.dist.world_size, "amp": amp,
                "eval_partial": d.eval_partial, "many_thr": d.many_thr, "few_thr": d.few_thr}

    def reusable_val(self, ckpt: dict, amp: str) -> dict | None:
        """The validation metrics stored in checkpoint `ckpt` (best.pt) when the final evaluation would measure the
        same numbers again: same weights (they are that checkpoint's), same data and conditions (`eval_key`), and
        a final evaluation that adds nothing to the per-epoch one (no flip-TTA, no post-hoc classifier, which
        both change the val numbers). Else None: the val pass runs."""
        ev = self.cfg.eval
        val = ckpt.get("val")
        if not isinstance(val, dict) or ev.tta_flip or ev.posthoc != "none":
            return None
        return val if ckpt.get("val_key") == self.eval_key(amp) else None

    def final_eval(self, model, batch_size: int, amp: str, features=None, val: dict | None = None) -> dict:
        """Val and test metrics of `model` (and of its post-hoc normalised classifier when configured).
        `features(split)`, when given, returns the split's cached backbone features (EvalFeatures, stage 2 with a
        frozen backbone): only the classifiers then run. `val`: this model's validation metrics, already measured
        (`reusable_val`): the val pass is skipped and they are reported as they are."""
        ev = self.cfg.eval
        classifiers = {"model": model.classifier}
        if ev.posthoc != "none":
            classifiers["posthoc"] = posthoc_classifier(model.classifier, ev.posthoc, ev.posthoc_tau,
                                                        class_counts=self.class_counts)
        model.eval()
        res = {}
        if val is not None:
            if "posthoc" in classifiers:
                raise ValueError("final_eval: a reused val result has no post-hoc metrics; pass val=None")
            res["val"] = val
        for split in ("val", "test") if val is None and self.has_val else ("test",):
            loader = features(split) if features else self.loader(split, train=False, batch_size=batch_size)
            out = evaluate(backbone=model.backbone, classifiers=classifiers, loader=loader,
                           num_classes=self.num_classes, device=self.device, amp=amp, tta_flip=ev.tta_flip,
                           desc=f"eval {split}", dist=self.dist)
            res[split] = self.metrics(*out["model"], split=split)
            if "posthoc" in out:
                res.setdefault("posthoc", {"method": ev.posthoc, "tau": ev.posthoc_tau})[split] = \
                    self.metrics(*out["posthoc"], split=split)
        return res
