"""Class-balanced draws of single images from the shards: the reader of stage 2's class-balanced sampling on the image
stream (cRT / LWS with ``stage2.features=online``), ``BalancedShardLoader``.

Why a reader of its own: ``ShardLoader`` (and DALI) read each tar shard front to back and can only shuffle within a
buffer, but class-balanced sampling (Kang et al., ICLR 2020: a class uniformly, then one of its images) needs any
single image at any time: at iNaturalist's shape a 2-image class is drawn about T/C = 54 times an epoch while most
head images are never read. Tar members can be read by offset, and the cached shard index (``shard_index``: one
header pass per shard file, the one the trainer's start-up label check already made) gives each sample's key,
label, offset and size, so this reader seeks to each drawn image and decodes only that. webdataset has no random access (its readers are
sequential pipelines); torch's map-style ``Dataset`` + ``DataLoader`` workers do the reading here.

One epoch, the same on 1 process and on W ranks (as the cached-feature path, ``FeatureCache.balanced_order``):

* The usable training samples (image and ``.cls`` present) are put in ``__key__`` order and the
  epoch's global sequence is ``ClassBalancedSampler(their labels, seed, num_samples=N).global_indices(epoch)``
  (``bigltr.data.balanced``): each class drawn floor(T/C) or ceil(T/C) times, T = N rounded up to a multiple of W.
  So the stream draws the same samples as the cached-feature path with the same seed, draw for draw.
* Rank r takes positions r, r+W, ... of the first ``len() x W x B`` draws: disjoint positions, equal batch counts
  (no padding: there is nothing to run out of), and the union of the ranks' batches of step k is the 1-process
  global batch of step k.
* Each draw's augmentation is seeded by (seed, epoch, its position in the global sequence): the same pixels on any
  world size, any ``num_workers``, and when an epoch is re-read after a resume. The process's global RNGs are never
  touched (``num_workers=0`` swaps a state of its own in around each batch, as ``ShardLoader`` does).

Faults (docs/data.md, "Failure behaviour"), nothing lost silently:

* a sample without image or ``.cls`` (and, with ``decode_check=True`` or when the index already holds a decode
  check, one whose image PIL cannot decode): never drawn; counted in ``epoch_skipped`` every epoch (rank 0, since
  every rank indexes every shard), so ``data.max_skip_fraction`` applies as in stage 1; the first reasons are logged
  at start-up;
* a bad label (not an integer, outside ``[0, num_classes)``): DataError at start-up naming shard and key;
* a shard holding fewer samples than ``_info.json`` records (truncated): its missing samples are counted in
  ``epoch_lost`` every epoch (rank 0) and logged at start-up; an unreadable or missing shard file is a DataError;
* an image that fails when drawn (it does not decode, or the file changed after start-up): skipped, logged,
  counted in ``epoch_skipped`` once per draw; the batch is smaller by one; a batch of which no image could be read
  is a DataError.

No decode check by default: the converters decode every image before writing it and ``_info.json`` records each
shard's size, so a sound shard has no undecodable image, and decoding all of iNaturalist's 437k images on every rank
at start-up (the DALI reader's safeguard against its decoders crashing) would cost minutes per rank the first time.

Memory: per sample a label, a shard number, an offset and a size (the keys only until they are sorted): about
40 MB at iNaturalist's 437k images, on every rank.
"""
from __future__ import annotations

import logging
import os
import random
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .balanced import ClassBalancedSampler
from .errors import DataError
from .info import read_info
from .loader import _PROGRAMMING_ERRORS, _decode_image, _describe, _global_rng, _private_rng, stack_batch
from .plan import EpochPlan, Short, sub_seed
from .shard_index import default_index_dir, load_shard_index, sample_label

__all__ = ["BalancedShardLoader"]

_log = logging.getLogger(__name__)


class _Draws(Dataset):
    """This rank's draws of one epoch; item k -> (image tensor, label, key) or, when its image fails, the reason
    (a str). Shard files are opened lazily in the process that reads (a worker), kept open for the epoch."""

    def __init__(self, files: list[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray,
                 labels: np.ndarray, keys: list[str], positions: np.ndarray, *, transform: Callable, seed: int,
                 epoch: int):
        self.files, self.shard, self.offset, self.size = files, shard, offset, size
        self.labels, self.keys, self.positions = labels, keys, positions
        self.transform, self.seed, self.epoch = transform, seed, epoch
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _read(self, k: int) -> bytes:
        i = int(self.shard[k])
        f = self._open.get(i)
        if f is None:
            f = self._open[i] = open(self.files[i], "rb")
        f.seek(int(self.offset[k]))
        return f.read(int(self.size[k]))

    def __getitem__(self, k: int):
        where = f"{self.files[int(self.shard[k])]}: sample {self.keys[k]}"
        try:
            blob = self._read(k)
            if len(blob) != int(self.size[k]):
                return f"{where}: image ends past the end of the file (the shard changed after start-up?)"
            img: Image.Image = _decode_image(blob)
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # OSError (file gone), PIL's many error types for bad bytes
            return f"{where}: {_describe(e)}"
        # seeds the process's RNGs: a worker's own, or (num_workers=0) the private state __iter__ swaps in
        seed = sub_seed(self.seed, self.epoch, int(self.positions[k]))
        torch.random.default_generator.manual_seed(seed)  # CPU generator only (torch.manual_seed seeds CUDA too)
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)
        try:
            x = self.transform(img)
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:  # a transform failing on this image's data (e.g. an odd mode): skip it like a decode error
            return f"{where}: {_describe(e)}"
        return x, int(self.labels[k]), self.keys[k]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _collate(items: list) -> tuple:
    """(images [b, C, H, W] or None, labels [b], keys, reasons of the draws that failed)."""
    good = [it for it in items if not isinstance(it, str)]
    errors = [it for it in items if isinstance(it, str)]
    if not good:
        return None, None, [], errors
    return (stack_batch([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.long),
            [g[2] for g in good], errors)


class BalancedShardLoader(EpochPlan):
    """Iterate ``(images, labels, keys)`` batches of class-balanced draws over one split (module docstring).

    Same attributes as the sequential readers (``EpochPlan``: ``num_samples`` = draws this rank makes per epoch,
    ``len()`` = its batches, ``set_epoch``, the fault counters); ``sampler`` is the ``ClassBalancedSampler`` over the
    usable samples in key order, ``sample_keys`` / ``sample_labels`` those samples. ``index_dir``: the shard-index
    cache (``data.dali_index_dir``; default ``~/.cache/bigltr/dali_index``), shared with the DALI reader and the
    start-up label check. ``decode_check``: decode every image once at start-up (cached with the index) so that
    undecodable ones are never drawn (module docstring).
    """

    short_verb = "holds"

    def __init__(self, root: str | os.PathLike, split: str, *, batch_size: int, transform: Callable, seed: int = 0,
                 num_workers: int = 2, rank: int = 0, world_size: int = 1, index_dir: Optional[str] = None,
                 pin_memory: bool = False, instances: str = "replacement", decode_check: bool = False):
        super().__init__(root, read_info(os.fspath(root)), split, batch_size=batch_size, train=True, seed=seed,
                         num_workers=num_workers, rank=rank, world_size=world_size, drop_last=True)
        self.transform = transform
        self.pin_memory = bool(pin_memory)
        self.index_dir = os.fspath(index_dir) if index_dir else default_index_dir()
        self._index(decode_check)
        self.sampler = ClassBalancedSampler(self.sample_labels, seed=self.seed, rank=self.rank,
                                            world_size=self.world_size, instances=instances)
        self.num_samples = self.sampler.per_rank
        self._len = self.num_samples // self.batch_size
        if self.rank == 0:
            self.logger.info("class-balanced image stream over split '%s' of %s: %d usable samples of %d classes in "
                             "%d shards (%d skipped, %d missing from short shards); %d draws per epoch, %d batch(es) "
                             "of %d per rank", self.split, self.root, len(self.sample_labels),
                             self.sampler.num_classes, len(self._files), self._excluded, self._missing,
                             self.sampler.total, self._len, self.batch_size)

    def _divide(self) -> None:
        """The sequential readers' division of shards among ranks does not apply: set from the index (``__init__``)."""

    def _index(self, decode_check: bool) -> None:
        num_classes = int(self.info["num_classes"])
        keys: list[str] = []
        labels: list[int] = []
        shard: list[int] = []
        offset: list[int] = []
        size: list[int] = []
        reasons: list[str] = []
        self._short: dict[str, Short] = {}
        threads = max(1, self.num_workers)
        for i, path in enumerate(self._files):
            try:
                idx = load_shard_index(path, self.index_dir, decode_check=decode_check, threads=threads)
            except OSError as e:
                raise DataError(f"{path}: cannot read the shard ({_describe(e)}); re-copy it or re-run "
                                f"tools/make_shards.py") from None
            rows, bad = idx["samples"], idx["bad"] or {}
            if len(rows) < self._lengths[i]:
                self._short[path] = (len(rows), self._lengths[i], idx["error"])
            for j, row in enumerate(rows):
                key, _text, _ext, off, n, _member = row
                # a bad label stops the run, as in the other readers
                label, why = sample_label(row, j, bad, f"{path}: sample {key}", num_classes)
                if why is not None:
                    reasons.append(why)
                    continue
                keys.append(key)
                labels.append(label)
                shard.append(i)
                offset.append(off)
                size.append(n)
        if not labels:
            raise DataError(f"split '{self.split}' of {self.root}: no usable sample (all {len(reasons)} skipped"
                            + (f", e.g. {reasons[0]}" if reasons else "") + ")")
        order = np.argsort(np.array(keys), kind="stable")  # key order: the draws do not depend on the shard layout
        if len(set(keys)) != len(keys):
            self.logger.warning("split '%s': sample keys are not unique; equal keys keep the shard order",
                                self.split)
        self.sample_keys = [keys[j] for j in order]
        self.sample_labels = np.asarray(labels, dtype=np.int64)[order]
        self._shard = np.asarray(shard, dtype=np.int32)[order]
        self._offset = np.asarray(offset, dtype=np.int64)[order]
        self._size = np.asarray(size, dtype=np.int64)[order]
        self._excluded = len(reasons)
        self._missing = sum(rec - found for found, rec, _ in self._short.values())
        empty = int(num_classes - np.unique(self.sample_labels).size)
        if self.rank == 0:
            for text in reasons[:5]:
                self.logger.warning("skipping a bad sample (never drawn): %s", text)
            if len(reasons) > 5:
                self.logger.warning("%d more bad samples are never drawn", len(reasons) - 5)
            for url, sh in sorted(self._short.items()):
                self.logger.warning("%s; %d sample(s) missing from every epoch", self._short_message(url, sh),
                                    sh[1] - sh[0])
            if empty:
                self.logger.warning("split '%s': %d class(es) have no usable sample and are never drawn", self.split,
                                    empty)

    # -- one epoch
    def draws(self, epoch: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the epoch's global sequence, samples in key order) of this rank's ``len() x B`` draws."""
        e = self.epoch if epoch is None else int(epoch)
        taken = self._len * self.world_size * self.batch_size
        positions = np.arange(taken)[self.rank::self.world_size]
        samples = self.sampler.global_indices(e).numpy()[:taken][self.rank::self.world_size]
        return positions, samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        positions, s = self.draws()
        ds = _Draws(self._files, self._shard[s], self._offset[s], self._size[s], self.sample_labels[s],
                    [self.sample_keys[j] for j in s], positions, transform=self.transform, seed=self.seed,
                    epoch=self.epoch)
        B = self.batch_size
        batches = [list(range(b * B, (b + 1) * B)) for b in range(self._len)]
        # our own generator: without one iter(DataLoader) draws its base seed from the global torch RNG (the
        # training step's, which resume checkpoints carry); the draws are seeded per position anyway
        loader = DataLoader(ds, batch_sampler=batches, num_workers=min(self.num_workers, max(1, self._len)),
                            collate_fn=_collate, pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0))
        batches_it = iter(loader)
        if loader.num_workers == 0:  # the draws seed the RNGs in this process: give them a state of their own
            batches_it = _private_rng(batches_it, _global_rng())
        failed = 0
        try:
            for b, (x, y, keys, errors) in enumerate(batches_it):
                for text in errors:
                    failed += 1
                    if failed <= 5:
                        self.logger.warning("rank %d: skipping a bad sample: %s", self.rank, text)
                    elif failed == 6:
                        self.logger.warning("rank %d: more bad samples; further messages suppressed", self.rank)
                if x is None:
                    raise DataError(f"rank {self.rank}, epoch {self.epoch}: none of the {B} images of batch {b} "
                                    f"could be read, e.g. {errors[0]}; the shards changed after start-up? check "
                                    f"them with `tools/make_shards.py verify {self.root}`")
                yield x, y, keys
        finally:
            ds.close()
            self._count(failed)

    def _count(self, failed: int) -> None:
        """This epoch's counters: draws that failed, plus (rank 0) the samples that are never drawn."""
        first = self.rank == 0
        self.epoch_skipped = failed + (self._excluded if first else 0)
        self.skipped += self.epoch_skipped
        self.epoch_lost = self._missing if first else 0
        self.lost += self.epoch_lost
        self.lost_shards = sorted(os.path.basename(u) for u in self._short) if first else []
