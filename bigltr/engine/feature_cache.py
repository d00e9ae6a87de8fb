"""Stage-2 feature cache: run the frozen backbone once per view, then train the classifier on stored features.

Stage 2 trains only a linear layer on a frozen backbone; the reference code still runs the whole backbone over
the whole dataset every epoch. Here the backbone (eval mode, so BatchNorm statistics are fixed) computes the
features of every training image for V views once:
- "center": the evaluation transform;
- "center_flip": that view and its horizontal flip (V = 2);
- "augment": `num_aug` draws of the training transform (V = num_aug).
Each epoch then visits every image once, in a (seed, epoch)-seeded order, with one of its V views drawn at
random, in batches of `batch_size` (last partial batch dropped, like the training loader). With
stage2.sampler=class_balanced (cRT, LWS) an epoch is instead one global class-balanced sequence over the samples in
key order, the same on 1 process and on W ranks: each rank caches its own part, then `gather` gives every rank every
rank's rows, and rank r takes positions r, r+W, ... (`balanced_order`; docs/baselines.md).

The cache yields `(features [B, D], labels [B], None)` batches so the ordinary training loop runs unchanged with
`forward = model.classifier`. Storage: host memory or a file on local disk (numpy memmap), in bf16/fp16/fp32,
after a size check against available memory or free disk space that fails with a clear message.

`EvalFeatures` does the same for a validation/test split (centre view, plus its flip for eval.tta_flip): it
records the batches the split's eval loader yields (same samples, order, keys, and the padding repeats of short
ranks) and replays them, so `evaluate` gives on it what it gives on the images, without the backbone.

Where the arrays live (memory, or one folder per cached split on disk, built atomically and checked when reused):
bigltr.engine.feature_store.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from bigltr.atomic import write_json_atomic
from bigltr.data.errors import DataError
from bigltr.engine.feature_store import (DTYPES, check_space, storage, entry_name, new_build_dir, publish, prune, meta_extra, load_entry, trim, as_numpy)

log = logging.getLogger("bigltr")

class FeatureCache:
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int,
                 keys: list[str] | None = None):
        self.features, self.labels = features, labels  # [V, N, D], [N]
        self.keys = keys  # the samples' __key__ per row (None: unknown); class_balanced orders the samples by it
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.num_samples = labels.shape[0]
        self.per_epoch = self.num_samples
        # training samples the cache lacks (corrupt images skipped, samples lost to short shards when it was built):
        # missing from every epoch, so stage 2 reports them and applies data.max_skip_fraction to them every epoch
        # (bigltr.engine.loop.data_losses), the rule stage 1 applies to its loader
        self.epoch_skipped = self.epoch_lost = 0
        # "shuffle": each sample once per epoch; "class_balanced" (cRT, LWS): a class uniformly, then one of its
        # samples (bigltr.data.balanced), over the rows held here: after `gather` (several ranks) every rank holds
        # every rank's rows and takes its positions of the one global sequence
        self.sampler = "shuffle"
        self.rank, self.world_size, self.balance_seed = 0, 1, seed
        self._balanced = None  # (storage row of each sample in key order or None, the sampler over those samples)
        self.location, self.directory = "memory", None  # where `gather` puts every rank's rows (disk: a private file)

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
        return self.per_epoch // (self.world_size * self.batch_size)

    def to(self, device: torch.device) -> "FeatureCache":
        self.features, self.labels = self.features.to(device), self.labels.to(device)
        return self

    def __iter__(self):
        if self.sampler == "class_balanced":
            yield from self._balanced_batches()
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        views = torch.randint(self.num_views, (self.num_samples,), generator=g)
        device = self.features.device
        order, views = order.to(device), views.to(device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.features[views[idx], idx], self.labels[idx], None

    # ---------------------------------------------------------------------------------- class-balanced sampling
    def balanced_order(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage rows, views) of this rank's class-balanced draws of `epoch` (default: the current one), the
        `len(self) * batch_size` of them that its batches take, on the CPU.

        The epoch's global sequence is ClassBalancedSampler(labels of the samples in key order, seed, N)
        .global_indices(epoch) (N: the samples held; after `gather`, all ranks'), a function of (seed, epoch) and
        the set of samples alone; each sample's view is drawn once per epoch from (seed, epoch), as the shuffle
        stream draws it. Rank r takes positions r, r + W, ... of the first len(self) * W * batch_size draws, so
        global step k is draws [k G, (k+1) G) (G = the global batch) on 1 process and on W alike, ranks are
        disjoint, and a resumed epoch skips to the same draws. Keys unknown (a cache built without them): the
        samples in row order."""
        from bigltr.data.balanced import ClassBalancedSampler

        if self._balanced is None:
            rows = None
            if self.keys is not None:
                if len(self.keys) != self.num_samples:
                    raise ValueError(f"feature cache: {len(self.keys)} keys for {self.num_samples} rows")
                order = sorted(range(self.num_samples), key=self.keys.__getitem__)
                if len(set(self.keys)) != len(self.keys):
                    log.warning("feature cache: sample keys are not unique; the class-balanced order of equal keys "
                                "follows the rows, so it may differ between world sizes")
                if order != list(range(self.num_samples)):
                    rows = torch.tensor(order, dtype=torch.long)
            labels = self.labels.cpu() if rows is None else self.labels.cpu()[rows]
            self._balanced = rows, ClassBalancedSampler(labels, seed=self.balance_seed, num_samples=self.per_epoch)
        rows, sampler = self._balanced
        e = self.epoch if epoch is None else int(epoch)
        g = torch.Generator().manual_seed(self.balance_seed * 1_000_003 + e)
        torch.randperm(self.num_samples, generator=g)  # the shuffle stream's draw: then the same views as it
        views = torch.randint(self.num_views, (self.num_samples,), generator=g)
        taken = len(self) * self.world_size * self.batch_size
        pos = sampler.global_indices(e)[:taken][self.rank::self.world_size]  # samples, in key order
        return (pos if rows is None else rows[pos]), views[pos]

    def _balanced_batches(self):
        rows, views = self.balanced_order()
        device = self.features.device
        rows, views = rows.to(device), views.to(device)
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = rows[batch]
            yield self.features[views[batch], idx], self.labels[idx], None

    def gather(self, dist, *, seed: int) -> None:
        """Hold every rank's cached rows on every rank (collective), for class-balanced sampling over the whole
        training set: rank order, the sample keys with them; `seed` must be the same on every rank (the run's).

        Memory: the whole cache on every rank, V x N x D x (2 or 4 bytes) (iNaturalist 2018: 437,513 x 2048 in bf16
        = 1.7 GiB per view), in memory or, with stage2.cache.location=disk, in a private file next to this rank's
        cache (unlinked at once: it lives while mapped). Sent in rounds of at most 256 MiB per rank."""
        if self.keys is None:
            raise ValueError("feature cache: gathering needs the sample keys (a cache built by FeatureCache.build)")
        parts = dist.gather_objects(self.keys)
        total = sum(len(p) for p in parts)
        shape = (self.num_views, total, self.features.shape[2])
        nbytes = shape[0] * shape[1] * shape[2] * self.features.element_size()
        location, directory = self.location, self.directory
        check_space(nbytes, location, directory)
        tmp = new_build_dir(directory, "gathered") if location == "disk" else None
        try:
            store, _ = storage(shape, self.features.dtype, location, tmp)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # the mapping stays valid; nothing is left behind
        for v in range(self.num_views):
            dist.all_gather_rows(self.features[v].cpu(), store[v])
        labels = dist.all_gather_rows(self.labels.cpu())
        self.features, self.labels, self.keys = store, labels, [k for p in parts for k in p]
        self.num_samples = self.per_epoch = total
        self.rank, self.world_size, self.balance_seed = dist.rank, dist.world_size, int(seed)
        self._balanced = None
        log.info(f"feature cache: gathered every rank's rows for class-balanced sampling: {self.num_views} view(s) x "
                 f"{total} samples ({nbytes / 2**20:.1f} MiB per rank, {location})")

    @classmethod
    def load(cls, entry: Path, key: dict, *, batch_size: int, seed: int) -> "FeatureCache | None":
        """The complete disk cache in folder `entry` if it was written for the same key (checkpoint, data, views,
        dtype), else None."""
        loaded = load_entry(entry, key, with_index=True)
        if loaded is None:
            return None
        feats, labels, index, meta = loaded
        log.info(f"feature cache: reusing {entry} ({tuple(feats.shape)})")
        out = cls(feats, labels, batch_size=batch_size, seed=seed, keys=list(index["keys"]))
        out.epoch_skipped, out.epoch_lost = int(meta.get("skipped", 0)), int(meta.get("lost", 0))
        out.location, out.directory = "disk", entry.parent
        return out

    @classmethod
    @torch.no_grad()
    def build(cls, backbone: torch.nn.Module, make_loader, *, views: str, num_aug: int, dtype: str,
              location: str, directory: Path | None, device: torch.device, batch_size: int, seed: int,
              amp_ctx, key: dict | None = None) -> "FeatureCache":
        """`make_loader(augment: bool)` returns an unshuffled ShardLoader over the training split.

        On disk (`directory` = the cache directory), the complete cache of the same `key` is reused instead of
        recomputed (stage-2 sweeps over weight decay or the MaxNorm radius share one cache); a new one is built in
        a private folder and renamed into place when complete, so a cache cut off while being built is never used.
        """
        entry = tmp = None
        if location == "disk":
            if key is None:
                raise ValueError("a disk feature cache needs a key")
            entry = directory / entry_name("train", key)
            cached = cls.load(entry, key, batch_size=batch_size, seed=seed)
            if cached is not None:
                return cached
        backbone.eval()
        passes = ["center"] if views == "center" else ["center"] if views == "center_flip" else ["augment"] * num_aug
        flip = views == "center_flip"
        num_views = 2 if flip else len(passes)
        first = make_loader(augment=passes[0] == "augment")
        n, feat_dim = first.num_samples, backbone.num_features
        torch_dtype = DTYPES[dtype]
        nbytes = num_views * n * feat_dim * torch.finfo(torch_dtype).bits // 8
        check_space(nbytes, location, directory)
        tmp = new_build_dir(directory, "train") if location == "disk" else None
        try:
            store, labels, keys, skipped, lost = cls._compute(backbone, make_loader, first, passes, flip,
                                                              (num_views, n, feat_dim), torch_dtype, location, tmp,
                                                              device, amp_ctx)
            if location == "disk":
                np.save(tmp / "labels.npy", labels.numpy())
                # the samples' keys (class-balanced sampling orders the samples by them; sizes: one block)
                write_json_atomic(tmp / "index.json", {"split": "train", "keys": keys, "sizes": [len(keys)]})
                num_classes = getattr(first, "info", {}).get("num_classes")
                write_json_atomic(tmp / "meta.json", {"key": key, **meta_extra(store, labels, num_classes,
                                                                                 skipped=skipped, lost=lost)})  # last
                if not publish(tmp, entry, key):  # another run built the same cache meanwhile: use that one
                    other = cls.load(entry, key, batch_size=batch_size, seed=seed)
                    if other is not None:
                        return other
                prune(directory, "train", key)
        finally:
            if tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info(f"feature cache: {num_views} view(s) x {store.shape[1]} images x {feat_dim} dims in {dtype} "
                 f"({nbytes / 2**20:.1f} MiB, {location}{f', {entry}' if entry else ''})"
                 + (f"; {skipped} corrupt sample(s) skipped, {lost} lost to short shards" if skipped or lost else ""))
        out = cls(store, labels, batch_size=batch_size, seed=seed, keys=keys)
        out.epoch_skipped, out.epoch_lost = skipped, lost
        out.location, out.directory = location, directory
        return out

    @staticmethod
    def _compute(backbone, make_loader, first, passes, flip, shape, torch_dtype, location, tmp, device, amp_ctx):
        """Run the backbone over the training split once per pass; (features [V, N', D], labels [N'], keys [N'],
        skipped, lost).

        N' < N when samples were skipped (corrupt) or lost (short shard): the loader counts them, and stage 2
        applies data.max_skip_fraction to those counts as stage 1 does. Every pass must read the same samples."""
        n = shape[1]
        store, mm = storage(shape, torch_dtype, location, tmp)
        labels = torch.empty(n, dtype=torch.long)
        keys0 = None
        skipped = lost = 0
        for p, kind in enumerate(passes):
            loader = first if p == 0 else make_loader(augment=kind == "augment")
            loader.set_epoch(p)  # a different augmentation draw per pass
            pos, keys = 0, []
            for images, y, k in loader:
                b = min(y.shape[0], n - pos)  # past n: the batches a short rank repeats to keep ranks in step
                if b <= 0:
                    continue
                images = images[:b].to(device, non_blocking=True)
                with amp_ctx():
                    f = backbone(images)
                store[p, pos:pos + b] = f.to("cpu", torch_dtype)
                if flip:
                    with amp_ctx():
                        store[1, pos:pos + b] = backbone(torch.flip(images, dims=[3])).to("cpu", torch_dtype)
                labels[pos:pos + b] = y[:b]
                keys += list(k)[:b]
                pos += b
            skipped, lost = int(getattr(loader, "epoch_skipped", 0)), int(getattr(loader, "epoch_lost", 0))
            if pos > n or pos == 0 or (pos < n and skipped + lost == 0):  # a shortfall the loader cannot explain
                raise DataError(f"feature cache pass {p}: expected {n} training samples, read {pos} (corrupt "
                                f"samples skipped: {skipped}, lost to short shards: {lost}); check the shards with "
                                f"`tools/make_shards.py verify`")
            if keys0 is None:
                keys0 = keys
            elif keys != keys0:
                raise RuntimeError("feature cache: training samples came in a different order on a later pass")
        if pos < n:  # keep the rows read
            store, mm = trim(store, mm, pos, tmp), None
            labels = labels[:pos].clone()
        if mm is not None:
            mm.flush()
        return store, labels, keys0, skipped, lost


class EvalFeatures:
    """Backbone features of one evaluation split, replayed in the batches its eval loader yielded.

    Built from `loader` (the split's ordinary eval loader, eval transform): for every batch it keeps the centre
    features, the features of the horizontally flipped images when `flip` (eval.tta_flip), the labels and the
    sample keys, including the batches a short rank repeats to stay in step with the others. Iterating yields
    `((centre [B, D], flipped [B, D] or None), labels [B], keys)`; `evaluate` recognises `yields_features` and
    skips the backbone, so the exact-distributed evaluation (gather by key, de-duplicate) works unchanged and, with
    an fp32 cache, the predictions are those of the online evaluation. `.split` names the split (metrics check
    that every sample of it was evaluated).
    """

    yields_features = True

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, keys: list[str], sizes: list[int],
                 split: str):
        self.features, self.labels, self.keys, self.sizes, self.split = features, labels, keys, sizes, split

    @property
    def flip(self) -> bool:
        return self.features.shape[0] == 2

    def __len__(self) -> int:
        return len(self.sizes)

    def set_epoch(self, epoch: int) -> None:  # the order of an eval split never changes
        pass

    def __iter__(self):
        pos = 0
        for b in self.sizes:
            f = self.features[:, pos:pos + b]
            yield (f[0], f[1] if self.flip else None), self.labels[pos:pos + b], self.keys[pos:pos + b]
            pos += b

    @classmethod
    def load(cls, entry: Path, key: dict) -> "EvalFeatures | None":
        """The complete disk cache in folder `entry` if it was written for the same key, else None."""
        loaded = load_entry(entry, key, with_index=True)
        if loaded is None:
            return None
        feats, labels, index, _ = loaded
        log.info(f"eval feature cache: reusing {entry} ({index['split']}, {tuple(feats.shape)})")
        return cls(feats, labels, index["keys"], index["sizes"], index["split"])

    @classmethod
    @torch.no_grad()
    def build(cls, backbone: torch.nn.Module, loader, *, flip: bool, dtype: str, location: str,
              directory: Path | None, device: torch.device, amp_ctx, key: dict | None = None) -> "EvalFeatures":
        """Features of `loader`'s split (an eval ShardLoader / DaliShardLoader, unshuffled). On disk the complete
        cache of the same `key` in `directory` is reused; a new one is written to a private folder and renamed into
        place (see the module docstring)."""
        split = loader.split
        entry = None
        if location == "disk":
            if key is None:
                raise ValueError("a disk feature cache needs a key")
            entry = directory / entry_name(split, key)
            cached = cls.load(entry, key)
            if cached is not None:
                return cached
        torch_dtype = DTYPES[dtype]
        views = 2 if flip else 1
        bound = views * len(loader) * loader.batch_size * backbone.num_features * torch.finfo(torch_dtype).bits // 8
        check_space(2 * bound if location == "disk" else bound, location, directory)  # on disk: also held in memory
        backbone.eval()
        feats, labels, keys, sizes = [], [], [], []
        for images, y, k in loader:
            images = images.to(device, non_blocking=True)
            with amp_ctx():  # the same calls as evaluate() makes on the images
                f = backbone(images)
                f_flip = backbone(torch.flip(images, dims=[3])) if flip else None
            feats.append(torch.stack([v.to("cpu", torch_dtype) for v in ([f, f_flip] if flip else [f])]))
            labels.append(y.cpu())
            keys += list(k)
            sizes.append(len(k))
        if not feats:
            raise DataError(f"eval feature cache: the {split} loader yielded no batch")
        out = cls(torch.cat(feats, dim=1), torch.cat(labels), keys, sizes, split)
        if location == "disk":
            tmp = new_build_dir(directory, split)
            try:
                with open(tmp / "features.bin", "wb") as fh:  # .npy format, named as the training cache's
                    np.save(fh, as_numpy(out.features), allow_pickle=False)
                np.save(tmp / "labels.npy", out.labels.numpy())
                write_json_atomic(tmp / "index.json", {"split": split, "keys": keys, "sizes": sizes})
                write_json_atomic(tmp / "meta.json", {"key": key, **meta_extra(
                    out.features, out.labels, getattr(loader, "info", {}).get("num_classes"))})  # last
                if publish(tmp, entry, key):
                    prune(directory, split, key)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        log.info(f"eval feature cache: {split}, {views} view(s) x {out.features.shape[1]} samples "
                 f"({len(set(keys))} distinct) x {out.features.shape[2]} dims in {dtype} "
                 f"({out.features.numel() * out.features.element_size() / 2**20:.1f} MiB, {location}"
                 f"{f', {entry}' if entry else ''})")
        return out
