"""Stage-2 feature cache: run the frozen backbone once per view, then train the classifier on stored features.

Stage 2 trains only a linear layer on a frozen backbone; the reference code still runs the whole backbone over
the whole dataset every epoch. Here the backbone (eval mode, so BatchNorm statistics are fixed) computes the
features of every training image for V views once:
- "center": the evaluation transform;
- "center_flip": that view and its horizontal flip (V = 2);
- "augment": `num_aug` draws of the training transform (V = num_aug).
Each epoch then visits every image once, in a (seed, epoch)-seeded order, with one of its V views drawn at
random, in batches of `batch_size` (last partial batch dropped, like the training loader).

The cache yields `(features [B, D], labels [B], None)` batches so the ordinary training loop runs unchanged with
`forward = model.classifier`. Storage: host memory or a file on local disk (numpy memmap), in bf16/fp16/fp32,
after a size check against available memory or free disk space that fails with a clear message.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from bigltr.atomic import write_json_atomic

log = logging.getLogger("bigltr")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_space(nbytes: int, location: str, directory: Path | None) -> None:
    """Refuse a cache that would take more than 80% of what is free, naming the knobs that shrink it."""
    if location == "memory":
        free, where = available_memory_bytes(), "available memory"
    else:
        directory.mkdir(parents=True, exist_ok=True)
        free, where = shutil.disk_usage(directory).free, f"free disk space in {directory}"
    if nbytes > 0.8 * free:
        raise MemoryError(f"stage-2 feature cache needs {nbytes / 2**30:.2f} GiB, more than 80% of the "
                          f"{free / 2**30:.2f} GiB {where}: use fewer views (stage2.cache.views, num_aug), "
                          f"stage2.cache.dtype=bf16, stage2.cache.location=disk with stage2.cache.dir on a larger "
                          f"disk, or stage2.features=online")


def _storage(shape: tuple, dtype: torch.dtype, location: str, directory: Path | None):
    """(tensor, memmap or None)."""
    if location == "memory":
        return torch.empty(shape, dtype=dtype), None
    # numpy has no bfloat16: a 16-bit integer memmap viewed as bf16 holds the same bytes.
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]
    path = directory / "features.bin"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
    t = torch.from_numpy(mm)
    return (t.view(torch.bfloat16) if dtype == torch.bfloat16 else t), mm


class FeatureCache:
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int):
        self.features, self.labels = features, labels  # [V, N, D], [N]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.num_samples = labels.shape[0]
        self.per_epoch = self.num_samples

    @property
    def num_views(self) -> int:
        return self.features.shape[0]

    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def limit(self, n: int) -> None:
        """Visit only n samples per epoch (a random n each epoch): keeps ranks with uneven parts in step."""
        self.per_epoch = min(n, self.labels.shape[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch // self.batch_size

    def to(self, device: torch.device) -> "FeatureCache":
        self.features, self.labels = self.features.to(device), self.labels.to(device)
        return self

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        views = torch.randint(self.num_views, (self.num_samples,), generator=g)
        device = self.features.device
        order, views = order.to(device), views.to(device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[views[idx], idx], self.labels[idx], None

    @classmethod
    def load(cls, directory: Path, key: dict, *, batch_size: int, seed: int) -> "FeatureCache | None":
        """A disk cache written earlier for the same key (checkpoint, data, views, dtype), else None."""
        meta = directory / "meta.json"
        if not meta.is_file() or json.loads(meta.read_text()).get("key") != key:
            return None
        arr = np.load(directory / "features.bin", mmap_mode="r+", allow_pickle=False)
        feats = torch.from_numpy(arr)
        if key["dtype"] == "bf16":
            feats = feats.view(torch.bfloat16)
        labels = torch.from_numpy(np.load(directory / "labels.npy"))
        log.info(f"feature cache: reusing {directory} ({tuple(feats.shape)})")
        return cls(feats, labels, batch_size=batch_size, seed=seed)

    @classmethod
    @torch.no_grad()
    def build(cls, backbone: torch.nn.Module, make_loader, *, views: str, num_aug: int, dtype: str,
              location: str, directory: Path | None, device: torch.device, batch_size: int, seed: int,
              amp_ctx, key: dict | None = None) -> "FeatureCache":
        """`make_loader(augment: bool)` returns an unshuffled ShardLoader over the training split.

        On disk, a cache whose meta.json holds the same `key` is reused instead of recomputed (stage-2 sweeps
        over weight decay or the MaxNorm radius share one cache); meta.json is written last, so a cache cut off
        while being built is never reused.
        """
        if location == "disk" and key is not None:
            cached = cls.load(directory, key, batch_size=batch_size, seed=seed)
            if cached is not None:
                return cached
            (directory / "meta.json").unlink(missing_ok=True)
        backbone.eval()
        passes = ["center"] if views == "center" else ["center"] if views == "center_flip" else ["augment"] * num_aug
        flip = views == "center_flip"
        num_views = 2 if flip else len(passes)
        first = make_loader(augment=passes[0] == "augment")
        n, feat_dim = first.num_samples, backbone.num_features
        torch_dtype = _DTYPES[dtype]
        nbytes = num_views * n * feat_dim * torch.finfo(torch_dtype).bits // 8
        check_space(nbytes, location, directory)
        store, mm = _storage((num_views, n, feat_dim), torch_dtype, location, directory)
        labels = torch.empty(n, dtype=torch.long)
        keys0 = None
        for p, kind in enumerate(passes):
            loader = first if p == 0 else make_loader(augment=kind == "augment")
            loader.set_epoch(p)  # a different augmentation draw per pass
            pos, keys = 0, []
            for images, y, k in loader:
                images = images.to(device, non_blocking=True)
                with amp_ctx():
                    f = backbone(images)
                b = y.shape[0]
                store[p, pos:pos + b] = f.to("cpu", torch_dtype)
                if flip:
                    with amp_ctx():
                        store[1, pos:pos + b] = backbone(torch.flip(images, dims=[3])).to("cpu", torch_dtype)
                labels[pos:pos + b] = y
                keys += list(k)
                pos += b
            if pos != n:
                raise RuntimeError(f"feature cache pass {p}: expected {n} training samples, read {pos} "
                                   f"(corrupt samples skipped: {loader.epoch_skipped})")
            if keys0 is None:
                keys0 = keys
            elif keys != keys0:
                raise RuntimeError("feature cache: training samples came in a different order on a later pass")
        if location == "disk":
            mm.flush()
            np.save(directory / "labels.npy", labels.numpy())
            if key is not None:
                write_json_atomic(directory / "meta.json", {"key": key, "shape": list(store.shape)})
        log.info(f"feature cache: {num_views} view(s) x {n} images x {feat_dim} dims in {dtype} "
                 f"({nbytes / 2**20:.1f} MiB, {location})")
        return cls(store, labels, batch_size=batch_size, seed=seed)
