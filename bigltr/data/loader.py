"""Streaming reader of bigltr's WebDataset shards for training and evaluation.

Design (one epoch = one ``iter(loader)``):

* The main process decides which shards this rank reads and in which order, from ``_info.json`` alone:
  - train: all shards permuted by ``numpy.random.default_rng([seed, epoch])`` (the same on every rank),
    rank ``r`` takes ``perm[r::world_size]``;
  - eval: shards in file order, rank ``r`` takes ``shards[r::world_size]``.
* A ``torch.utils.data.DataLoader`` runs ``num_workers`` workers; worker ``w`` reads ``rank_shards[w::W]``
  through ``webdataset.WebDataset`` (train: raw samples pass a shuffle buffer seeded by
  ``(seed, epoch, rank, worker)``), decodes, applies the transform and sends chunks of up to
  ``batch_size`` samples. The main process re-batches the chunks into batches of exactly ``batch_size``
  (the last one partial unless ``drop_last``), so no per-worker remainders appear.
* Everything that decides the order depends only on (seed, epoch, rank, world_size, num_workers): the same
  values give the same batches. Random augmentation is seeded per epoch as well through the DataLoader's
  generator when ``num_workers > 0`` (with ``num_workers=0`` it uses the global torch RNG).

Equal batch counts across ranks (``world_size > 1``): a collective hangs if one rank yields fewer batches.
``len(loader)`` is computed from ``shard_lengths`` and is the same on every rank:

* train: every rank reads at most ``T`` samples, ``T`` = the sum of the ``len(shards) // world_size``
  smallest shard lengths, a lower bound of what any rank receives in any epoch. Ranks drop the rest of
  their stream (up to about one shard per rank per epoch, different ones each epoch). If that would drop more
  than 10% of the split (few or uneven shards), or there are fewer shards than ranks, the split is divided by
  sample instead: every rank reads all shards and keeps every ``world_size``-th sample of each worker's stream.
* eval with ``drop_last=False``: ranks hold different counts; each rank yields ``max_r ceil(n_r / B)``
  batches, a rank that runs out repeats its last batch (duplicate keys): an exact evaluator keeps one
  prediction per ``__key__``. With ``drop_last=True`` all ranks are truncated to ``min_r floor(n_r / B)``.
* If corrupt samples make a rank run short of ``len(loader)``, it pads with repeats of its last batch and
  counts them in ``padded_batches``. With ``world_size == 1`` nothing is padded: the epoch just ends early.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .info import read_info

__all__ = ["build_transform", "ShardLoader"]

_log = logging.getLogger(__name__)

IMAGE_KEYS = "png;jpg;jpeg;webp"


# ----------------------------------------------------------------------------------------------- transforms
class _ToMode:
    """Convert a PIL image to a fixed mode ("L" or "RGB")."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class _ResizeIfNeeded:
    """Resize to (size, size) only when the image has another size (no-op for 32x32 CIFAR at 32)."""

    def __init__(self, size: int):
        from torchvision import transforms as T

        self.size = size
        self.resize = T.Resize((size, size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.size == (self.size, self.size) else self.resize(img)

    def __repr__(self) -> str:
        return f"ResizeIfNeeded({self.size})"


def build_transform(
    *,
    img_size: int,
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    aug: str,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor [in_chans, img_size, img_size].

    aug: ``"none"``   (resize to img_size x img_size if needed, to tensor, normalise);
         ``"cifar"``  (``"none"`` plus RandomCrop(img_size, padding=4) and RandomHorizontalFlip when train);
         ``"imagenet"`` (``timm.data.create_transform`` with the given size/mean/std).
    Images are first converted to "L" (in_chans 1) or "RGB" (in_chans 3).
    """
    from torchvision import transforms as T

    if in_chans not in (1, 3):
        raise ValueError(f"build_transform: in_chans must be 1 or 3, got {in_chans}")
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"build_transform: mean and std need {in_chans} values, got {tuple(mean)}, {tuple(std)}")
    if int(img_size) < 1:
        raise ValueError(f"build_transform: img_size must be >= 1, got {img_size}")
    to_mode = _ToMode("L" if in_chans == 1 else "RGB")
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if aug == "imagenet":
        from timm.data import create_transform

        tf = create_transform(input_size=(in_chans, img_size, img_size), is_training=train, mean=mean, std=std)
        return T.Compose([to_mode, tf])
    if aug not in ("none", "cifar"):
        raise ValueError(f"build_transform: aug must be 'none', 'cifar' or 'imagenet', got {aug!r}")
    ops: list = [to_mode, _ResizeIfNeeded(int(img_size))]
    if aug == "cifar" and train:
        ops += [T.RandomCrop(int(img_size), padding=4), T.RandomHorizontalFlip()]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


# ----------------------------------------------------------------------------------------------- worker side
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, RuntimeError, MemoryError)


class _SkipCounter:
    """webdataset exception handler: log, count and skip a bad sample (like ``wds.warn_and_continue``).

    Errors that point at code or configuration rather than data (TypeError, RuntimeError, ...) are raised.
    """

    def __init__(self, where: str):
        self.where = where
        self.count = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, _PROGRAMMING_ERRORS):
            raise exn
        self.count += 1
        if self.count <= 5:
            _log.warning("%s: skipping a bad sample (%s: %s)", self.where, type(exn).__name__, exn)
        elif self.count == 6:
            _log.warning("%s: more bad samples; further messages suppressed", self.where)
        return True


def _decode_image_native(key: str, data: bytes):
    """Decode image bytes into a PIL image in its stored mode (the transform picks L/RGB)."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext not in ("png", "jpg", "jpeg", "webp"):
        return None
    import io

    with io.BytesIO(data) as stream:
        img = Image.open(stream)
        img.load()
    return img


def _buffer_shuffle(src: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """Deterministic reservoir-style shuffle buffer (every sample is yielded exactly once)."""
    buf: list = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        j = rng.randrange(bufsize)
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


def _sub_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


class _EpochStream(IterableDataset):
    """One epoch of one rank: yields chunks ``(images|None, labels|None, keys, worker_id, skipped_so_far)``."""

    def __init__(self, urls: list[str], *, transform: Callable, train: bool, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int, chunk: int, stride: Optional[tuple[int, int]] = None):
        super().__init__()
        self.urls, self.transform, self.train, self.stride = urls, transform, train, stride
        self.shuffle_buffer, self.seed, self.epoch, self.rank, self.chunk = shuffle_buffer, seed, epoch, rank, chunk

    def _apply(self, sample):
        key, img, label = sample
        label = int(label)
        return self.transform(img), label, key

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[wid::nw]
        counter = _SkipCounter(f"rank {self.rank} worker {wid}")
        ds = wds.WebDataset(urls, handler=counter, shardshuffle=False, nodesplitter=None,
                            workersplitter=None, empty_check=False)
        if self.stride is not None:  # sample-level split: every rank reads the shards, keeps every W-th sample
            r, w = self.stride
            ds = ds.compose(lambda src: itertools.islice(src, r, None, w))
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(_sub_seed(self.seed, self.epoch, self.rank, wid))
            bufsize = self.shuffle_buffer
            ds = ds.compose(lambda src: _buffer_shuffle(src, bufsize, rng))
        ds = (ds.decode(_decode_image_native, handler=counter)
                .to_tuple("__key__", IMAGE_KEYS, "cls", handler=counter)
                .map(self._apply, handler=counter))
        xs, ys, ks = [], [], []
        for x, y, k in ds:
            xs.append(x)
            ys.append(y)
            ks.append(k)
            if len(ks) >= self.chunk:
                yield torch.stack(xs), torch.tensor(ys, dtype=torch.long), ks, wid, counter.count
                xs, ys, ks = [], [], []
        if ks:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.long), ks, wid, counter.count
        yield None, None, [], wid, counter.count  # final message: this worker's skip count


# ----------------------------------------------------------------------------------------------- loader
class ShardLoader:
    """Iterate ``(images [B,C,H,W] float, labels [B] long, keys list[str])`` batches over one split.

    ``train=True``: shard order and a ``shuffle_buffer`` sample buffer are shuffled deterministically for
    (seed, epoch); call ``set_epoch(epoch)`` before each epoch (the epoch stays fixed otherwise, so iterating
    twice without it repeats the order). ``train=False``: no shuffling, every sample once.
    ``drop_last`` defaults to ``train``. See the module docstring for how ranks are kept in step.

    Attributes: ``info`` (parsed ``_info.json``), ``num_samples`` (samples this rank reads per epoch, before
    ``drop_last``), ``skipped`` (bad samples skipped since construction), ``epoch_skipped`` (in the last
    epoch), ``padded_batches`` (batches repeated in the last epoch to keep ranks in step).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        transform: Callable[[Image.Image], torch.Tensor],
        train: bool,
        seed: int = 0,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        rank: int = 0,
        world_size: int = 1,
        drop_last: Optional[bool] = None,
        pin_memory: bool = False,
        prefetch_factor: Optional[int] = None,
    ):
        self.root = os.fspath(root)
        self.info = read_info(self.root)
        if split not in self.info["splits"]:
            raise ValueError(
                f"split '{split}' not in {os.path.join(self.root, '_info.json')} "
                f"(has: {', '.join(self.info['splits'])})"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (0 <= int(rank) < int(world_size)):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.split = split
        self.entry = self.info["splits"][split]
        self.batch_size = int(batch_size)
        self.transform = transform
        self.train = bool(train)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.skipped = 0
        self.epoch_skipped = 0
        self.padded_batches = 0

        self._files = [os.path.join(self.root, f) for f in self.entry["filenames"]]
        self._lengths = [int(n) for n in self.entry["shard_lengths"]]
        n_shards = len(self._files)
        if n_shards == 0 or sum(self._lengths) == 0:
            raise ValueError(f"split '{split}' of {self.root} holds no samples")
        ws, B = self.world_size, self.batch_size
        # Fewer shards than ranks: split by sample instead (each rank reads every shard and keeps every
        # ws-th sample of each worker's stream). Costs ws-fold reading, not decoding; fine for small splits.
        # Training reads whole shards per rank, each rank capped at a share every epoch can give (the sum of the
        # n_shards // ws smallest shards). When that cap would drop more than 10% of the split (few or uneven
        # shards), or there are fewer shards than ranks, split by sample instead: each rank reads every shard and
        # keeps every ws-th sample of each worker's stream (ws-fold reading, no extra decoding).
        shard_cap = sum(sorted(self._lengths)[: n_shards // ws]) if self.train and ws > 1 else None
        self._split_samples = ws > n_shards or (shard_cap is not None and shard_cap * ws < 0.9 * sum(self._lengths))
        if self._split_samples:
            nw = max(1, min(self.num_workers, n_shards))
            streams = [sum(self._lengths[w::nw]) for w in range(nw)]  # eval order; train varies per epoch
            per_rank = [sum(len(range(r, L, ws)) for L in streams) for r in range(ws)]
            self._cap = None
            if self.train:  # shard order changes per epoch, so use a bound that holds for every epoch
                cap = max(0, sum(self._lengths) // ws - nw)
                per_rank, self._cap = [cap] * ws, cap
            if self.rank == 0:
                _log.info("split '%s' of %s: %d shard(s) for %d ranks: splitting by sample", split, self.root,
                          n_shards, ws)
        elif shard_cap is not None:
            per_rank = [shard_cap] * ws
            self._cap: Optional[int] = shard_cap
        else:
            per_rank = [sum(self._lengths[r::ws]) for r in range(ws)]
            self._cap = None
        self.num_samples = per_rank[self.rank]
        batches = [(n // B) if self.drop_last else math.ceil(n / B) for n in per_rank]
        self._len = min(batches) if self.drop_last else max(batches)

    # -- epoch control
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch`` (deterministic for (seed, epoch)); no effect on eval order."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def shards_for_epoch(self, epoch: Optional[int] = None) -> list[str]:
        """The shard paths this rank reads in ``epoch`` (default: the current one), in reading order."""
        epoch = self.epoch if epoch is None else int(epoch)
        order = np.arange(len(self._files))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._files))
        if self._split_samples:
            return [self._files[i] for i in order]
        return [self._files[i] for i in order[self.rank::self.world_size]]

    # -- iteration
    def _dataloader(self, urls: list[str]) -> DataLoader:
        stream = _EpochStream(urls, transform=self.transform, train=self.train,
                              shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch,
                              rank=self.rank, chunk=self.batch_size,
                              stride=(self.rank, self.world_size) if self._split_samples else None)
        workers = min(self.num_workers, len(urls))
        kw: dict[str, Any] = {}
        if workers > 0:
            kw["generator"] = torch.Generator().manual_seed(_sub_seed(self.seed, self.epoch, self.rank, 7))
            if self.prefetch_factor is not None:
                kw["prefetch_factor"] = self.prefetch_factor
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          persistent_workers=False, **kw)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        B, target = self.batch_size, self._len
        cap = self._cap
        skips: dict[int, int] = {}
        self.padded_batches = 0
        emitted = 0
        taken = 0  # samples taken from the stream (<= cap)
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        ks: list[str] = []
        pending = 0
        last = None
        loader = self._dataloader(self.shards_for_epoch())
        it = iter(loader)
        try:
            for x, y, keys, wid, skipped in it:
                skips[wid] = skipped
                if x is None:
                    continue
                if cap is not None and taken + len(keys) > cap:
                    n = cap - taken
                    x, y, keys = x[:n], y[:n], keys[:n]
                taken += len(keys)
                xs.append(x)
                ys.append(y)
                ks.extend(keys)
                pending += len(keys)
                while pending >= B and emitted < target:
                    # common case: one whole chunk of exactly B samples -> no copy
                    bx, by = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
                    last = (bx[:B], by[:B], ks[:B])
                    yield last
                    emitted += 1
                    xs, ys, ks = ([bx[B:]], [by[B:]], ks[B:]) if pending > B else ([], [], [])
                    pending -= B
                if emitted >= target or (cap is not None and taken >= cap):
                    break
            if pending and not self.drop_last and emitted < target:
                last = (torch.cat(xs), torch.cat(ys), ks)
                yield last
                emitted += 1
            if self.world_size > 1 and emitted < target:
                if last is None:
                    raise RuntimeError(
                        f"rank {self.rank}: split '{self.split}' yielded no usable sample this epoch "
                        f"(all corrupt?); cannot keep {self.world_size} ranks in step"
                    )
                _log.warning("rank %d: padding %d batch(es) to stay in step with other ranks",
                             self.rank, target - emitted)
                while emitted < target:
                    self.padded_batches += 1
                    yield last
                    emitted += 1
        finally:
            del it
            self.epoch_skipped = sum(skips.values())
            self.skipped += self.epoch_skipped
