"""What a stage needs to know about the run: config, device, dataset facts, output folder, loaders."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bigltr.atomic import write_json_atomic
from bigltr.config import Config
from bigltr.data.info import read_info
from bigltr.data.loader import ShardLoader, build_transform
from bigltr.distributed import Dist
from bigltr.engine.common import evaluate
from bigltr.metrics import summarize
from bigltr.objective.posthoc import posthoc_classifier


@dataclass
class RunContext:
    cfg: Config
    device: torch.device
    info: dict
    out: Path
    dist: Dist
    stop: object = None  # bigltr.engine.resume.StopFlag, set by the run

    @property
    def class_counts(self) -> list[int]:
        return list(self.info["class_counts"])

    @property
    def num_classes(self) -> int:
        return len(self.info["class_counts"])

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @classmethod
    def create(cls, cfg: Config, dist: Dist) -> "RunContext":
        info = read_info(cfg.data.root)
        for split in ("train", "val", "test"):
            if split not in info["splits"]:
                raise FileNotFoundError(f"{cfg.data.root}/_info.json has no '{split}' split; bigltr needs train, "
                                        f"val (model selection) and test")
        return cls(cfg=cfg, device=dist.device, info=info, out=Path(cfg.out), dist=dist)

    def loader(self, split: str, *, train: bool, batch_size: int, augment: bool | None = None) -> ShardLoader:
        """train: shuffled, drop_last; augment (default = train): the training transform."""
        d = self.cfg.data
        augment = train if augment is None else augment
        tf = build_transform(img_size=d.img_size, in_chans=d.in_chans, mean=tuple(d.mean), std=tuple(d.std),
                             train=augment, aug=d.train_aug if augment else "none")
        return ShardLoader(d.root, split, batch_size=batch_size, transform=tf, train=train, seed=self.cfg.seed,
                           num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                           pin_memory=d.pin_memory and self.device.type == "cuda", rank=self.dist.rank,
                           world_size=self.dist.world_size)

    def evaluate(self, backbone, classifiers: dict, split_loader, amp: str, desc: str) -> dict:
        """Metrics per named classifier on one split (exact under several ranks)."""
        out = evaluate(backbone=backbone, classifiers=classifiers, loader=split_loader, num_classes=self.num_classes,
                       device=self.device, amp=amp, desc=desc, dist=self.dist)
        return {k: self.metrics(*v) for k, v in out.items()}

    def metrics(self, correct: torch.Tensor, total: torch.Tensor) -> dict:
        return summarize(correct, total, self.class_counts, self.cfg.data.many_thr, self.cfg.data.few_thr)

    def final_eval(self, model, batch_size: int, amp: str) -> dict:
        """Val and test metrics of `model` (and of its post-hoc normalised classifier when configured)."""
        ev = self.cfg.eval
        classifiers = {"model": model.classifier}
        if ev.posthoc != "none":
            classifiers["posthoc"] = posthoc_classifier(model.classifier, ev.posthoc, ev.posthoc_tau)
        model.eval()
        res = {}
        for split in ("val", "test"):
            out = evaluate(backbone=model.backbone, classifiers=classifiers,
                           loader=self.loader(split, train=False, batch_size=batch_size), num_classes=self.num_classes,
                           device=self.device, amp=amp, tta_flip=ev.tta_flip, desc=f"eval {split}", dist=self.dist)
            res[split] = self.metrics(*out["model"])
            if "posthoc" in out:
                res.setdefault("posthoc", {"method": ev.posthoc, "tau": ev.posthoc_tau})[split] = \
                    self.metrics(*out["posthoc"])
        return res


def write_json(path: str | os.PathLike, obj) -> None:
    write_json_atomic(path, obj)
