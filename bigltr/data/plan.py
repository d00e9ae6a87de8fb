"""The epoch plan both shard readers follow (``ShardLoader``: torch workers + webdataset; ``DaliShardLoader``: NVIDIA
DALI): which shards and samples each rank reads, how ranks are kept in step, the per-epoch fault counters, the image
keys of a shard sample and the sub-seed rule. Arithmetic on ``_info.json`` only: no shard is opened, no torch import.

Shards of one epoch, from (seed, epoch, rank, world_size) alone:

* train: all shards permuted by ``numpy.random.default_rng([seed, epoch])`` (the same on every rank), rank ``r``
  takes ``perm[r::world_size]``;
* eval: shards in file order, rank ``r`` takes ``shards[r::world_size]``.

Equal batch counts across ranks (``world_size > 1``): a collective hangs if one rank yields fewer batches.
``len()`` is computed from ``shard_lengths`` and is the same on every rank:

* train: every rank reads at most ``T`` samples, ``T`` = the sum of the ``len(shards) // world_size`` smallest shard
  lengths, a lower bound of what any rank receives in any epoch. Ranks drop the rest of their stream (up to about
  one shard per rank per epoch, different ones each epoch). If that would drop more than 10% of the split (few or
  uneven shards), or there are fewer shards than ranks, the split is divided by sample instead: every rank reads
  all shards and keeps every ``world_size``-th sample (``stride``: ShardLoader of each worker's stream,
  DaliShardLoader of the split in file order).
* eval with ``drop_last=False``: ranks hold different counts; each rank yields ``max_r ceil(n_r / B)`` batches, a
  rank that runs out repeats its last batch (duplicate keys): an exact evaluator keeps one prediction per
  ``__key__``. With ``drop_last=True`` all ranks are truncated to ``min_r floor(n_r / B)``.
* If corrupt samples make a rank run short of ``len()``, it pads with repeats of its last batch (``pad``) and counts
  them in ``padded_batches``. With ``world_size == 1`` nothing is padded: the epoch just ends early.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Iterator, Optional

import numpy as np

from .errors import DataError
from .info import INFO_NAME, split_entry

__all__ = ["EpochPlan", "IMAGE_KEYS", "Short", "sub_seed"]

# The members a shard sample may hold its image under, in order of preference: both readers use the first present.
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")

Short = tuple[int, int, Optional[str]]  # a shard that ended early: (samples found, samples recorded, read error)


def sub_seed(*parts: int, bits: int = 64) -> int:
    """The seed of a sub-stream named by integers (e.g. seed, epoch, rank, worker): the low ``bits`` bits of the first
    64-bit word of ``numpy.random.SeedSequence(parts)``. ``bits=31`` gives the signed 32-bit seeds DALI takes."""
    word = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])
    return word & ((1 << bits) - 1)


class EpochPlan:
    """The plan of one split for one rank (module docstring); a reader subclasses it and iterates the batches.

    Attributes: ``root``, ``split``, ``info`` (parsed ``_info.json``), ``entry`` (the split's entry), ``batch_size``,
    ``train``, ``seed``, ``num_workers``, ``rank``, ``world_size``, ``drop_last`` (default ``train``),
    ``allow_partial``, ``epoch``, ``num_samples`` (samples this rank reads per epoch, before ``drop_last``),
    ``expected_samples`` (the split's ``num_samples``: whole split, all ranks); the fault counters ``skipped`` /
    ``epoch_skipped`` (corrupt samples skipped since construction / in the last epoch), ``lost`` / ``epoch_lost``
    (samples missing because a shard ended early or could not be read) and ``lost_shards`` (their file names, last
    epoch), ``padded_batches`` (batches repeated in the last epoch to keep ranks in step). The per-epoch counters are
    this rank's; sum them over ranks. When the split is divided by sample (every rank reads every shard), lost
    samples are counted on rank 0 only.
    """

    short_verb = "yielded"  # how the short-shard message words the samples the reader found

    def __init__(self, root: str | os.PathLike, info: dict, split: str, *, batch_size: int, train: bool,
                 seed: int = 0, num_workers: int = 2, rank: int = 0, world_size: int = 1,
                 drop_last: Optional[bool] = None, allow_partial: bool = False):
        self.root = os.fspath(root)
        self.info = info
        if any(s not in info["splits"] for s in split.split("+")):  # "train+val": the union (split_entry)
            raise ValueError(f"split '{split}' not in {os.path.join(self.root, INFO_NAME)} "
                             f"(has: {', '.join(info['splits'])})")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not (0 <= int(rank) < int(world_size)):
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.split = split
        self.entry = split_entry(info, split)
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.allow_partial = bool(allow_partial)
        self.expected_samples = int(self.entry["num_samples"])
        self.epoch = 0
        self.skipped = self.epoch_skipped = 0
        self.lost = self.epoch_lost = 0
        self.lost_shards: list[str] = []
        self.padded_batches = 0
        self._files = [os.path.join(self.root, f) for f in self.entry["filenames"]]
        self._lengths = [int(n) for n in self.entry["shard_lengths"]]
        if not self._files or sum(self._lengths) == 0:
            raise ValueError(f"split '{split}' of {self.root} holds no samples")
        self._divide()

    def _divide(self) -> None:
        """Set ``_split_samples``, ``_cap`` (samples a rank takes at most, or None), ``num_samples`` and ``_len``.

        Training reads whole shards per rank, each rank capped at a share every epoch can give (the sum of the
        n_shards // ws smallest shards). When that cap would drop more than 10% of the split (few or uneven shards),
        or there are fewer shards than ranks, split by sample instead: each rank reads every shard and keeps every
        ws-th sample (ws-fold reading, no extra decoding). The converters' default layout (writer.auto_shard_lengths:
        balanced shards, a power-of-two multiple of them) keeps 1, 2, 4, 8 ranks on whole shards, dropping fewer
        samples than there are shards (12,406 in 16 shards: 6).
        """
        n_shards, total, ws, B = len(self._files), sum(self._lengths), self.world_size, self.batch_size
        shard_cap = sum(sorted(self._lengths)[: n_shards // ws]) if self.train and ws > 1 else None
        self._split_samples = ws > n_shards or (shard_cap is not None and shard_cap * ws < 0.9 * total)
        if self.rank == 0 and ws > 1:
            if self._split_samples:
                why = ("fewer shards than ranks" if ws > n_shards else
                       f"whole shards would give each rank only {shard_cap} samples ({total - shard_cap * ws} of "
                       f"{total} dropped per epoch)")
                self.logger.info("split '%s' of %s: %d shard(s) for %d ranks: %s, so every rank reads every shard "
                                 "and keeps one sample in %d (%d-fold reading); to read whole shards, make shards of "
                                 "nearly equal size, ideally a multiple of %d of them (tools/make_shards.py's default "
                                 "--maxcount auto: balanced, a power-of-two count; see docs/data.md, 'Shard size')",
                                 self.split, self.root, n_shards, ws, why, ws, ws, ws)
            elif shard_cap is not None:
                self.logger.info("split '%s' of %s: %d shards for %d ranks: each rank reads whole shards, %d samples "
                                 "per epoch (%d of %d dropped)", self.split, self.root, n_shards, ws, shard_cap,
                                 total - shard_cap * ws, total)
        self._cap: Optional[int] = None
        if self._split_samples:
            nw = max(1, min(self.num_workers, n_shards))
            streams = [sum(self._lengths[w::nw]) for w in range(nw)]  # eval order; train varies per epoch
            per_rank = [sum(len(range(r, L, ws)) for L in streams) for r in range(ws)]
            if self.train:  # shard order changes per epoch, so use a bound that holds for every epoch
                self._cap = max(0, total // ws - nw)
                per_rank = [self._cap] * ws
        elif shard_cap is not None:
            per_rank = [shard_cap] * ws
            self._cap = shard_cap
        else:
            per_rank = [sum(self._lengths[r::ws]) for r in range(ws)]
        self.num_samples = per_rank[self.rank]
        batches = [(n // B) if self.drop_last else math.ceil(n / B) for n in per_rank]
        self._len = min(batches) if self.drop_last else max(batches)

    @property
    def logger(self) -> logging.Logger:
        """The logger of the reader's module: the plan's messages name the reader that logs them."""
        return logging.getLogger(type(self).__module__)

    # -- epoch control
    def set_epoch(self, epoch: int) -> None:
        """Select the order (train only) and random draws of ``epoch``, deterministic for (seed, epoch)."""
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

    @property
    def stride(self) -> Optional[tuple[int, int]]:
        """``(rank, world_size)`` when the split is divided by sample (keep every world_size-th sample from the
        rank-th on), else None."""
        return (self.rank, self.world_size) if self._split_samples else None

    # -- keeping ranks in step
    def pad(self, last, emitted: int) -> Iterator:
        """Repeat batch ``last`` until ``emitted`` reaches ``len()``, counted in ``padded_batches``: with several ranks
        only (one rank's epoch just ends early). No batch at all is a DataError: nothing could be repeated."""
        if self.world_size == 1 or emitted >= self._len:
            return
        if last is None:
            raise DataError(f"rank {self.rank}: split '{self.split}' yielded no usable sample this epoch "
                            f"(all corrupt?); cannot keep {self.world_size} ranks in step")
        self.logger.warning("rank %d: padding %d batch(es) to stay in step with other ranks", self.rank,
                            self._len - emitted)
        for _ in range(self._len - emitted):
            self.padded_batches += 1
            yield last

    # -- faults
    def _short_message(self, url: str, short: Short) -> str:
        found, recorded, error = short
        return (f"{url} {self.short_verb} {found} of {recorded} samples recorded in {INFO_NAME}"
                + (f" (read error: {error})" if error else "")
                + "; the shard is truncated or damaged: re-copy it or re-run tools/make_shards.py "
                  f"(`tools/make_shards.py verify {os.path.dirname(url)}` checks every shard)")

    def short_error(self, short: dict[str, Short]) -> Optional[str]:
        """The DataError text for shards that ended early (``{url: Short}``, the first one named), or None: an eval
        split must be complete unless ``allow_partial``; training goes on and counts the loss."""
        if not short or self.train or self.allow_partial:
            return None
        url, sh = next(iter(short.items()))
        return self._short_message(url, sh) + "; set data.eval_partial=true to evaluate the readable part"

    def count_epoch(self, skipped: int, short: dict[str, Short], *, log: bool = True) -> None:
        """Set the per-epoch counters and add them to the totals: ``skipped`` corrupt samples, ``short`` shards that
        ended early (``{url: Short}``); with ``log``, log one warning per short shard."""
        self.epoch_skipped = skipped
        self.skipped += skipped
        if self._split_samples and self.rank != 0:
            short = {}  # every rank read the same shards: rank 0 counts (and logs) the loss once
        self.epoch_lost = sum(recorded - found for found, recorded, _ in short.values())
        self.lost += self.epoch_lost
        self.lost_shards = sorted(os.path.basename(u) for u in short)
        for url, sh in sorted(short.items()) if log else ():
            self.logger.warning("rank %d, split '%s', epoch %d: %s; %d sample(s) missing from this epoch", self.rank,
                                self.split, self.epoch, self._short_message(url, sh), sh[1] - sh[0])
