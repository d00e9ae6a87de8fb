"""Class-balanced sampling for classifier retraining (cRT) and learnable weight scaling (LWS): Kang et al.,
"Decoupling representation and classifier for long-tailed recognition", ICLR 2020, sec. 3 ("class-balanced
sampling": p_j = 1/C, i.e. pick a class uniformly, then an instance of it uniformly).

`ClassBalancedSampler(labels, ...)` yields sample indices (into `labels`, e.g. a feature cache's rows) for one
epoch and one rank:

- Classes come from a *shuffled balanced cycle*: the epoch's T draws are ceil(T/C) random permutations of the C
  classes laid end to end, cut at T. Every class is drawn floor(T/C) or ceil(T/C) times (exactly T mod C classes
  get the extra draw), and any window of C consecutive draws aligned on a cycle holds every class once. The
  reference code of Kang et al. (classifier-balancing, data/ClassAwareSampler.py) draws classes the same way
  (a class cycle reshuffled after each pass).
- The instance of each draw is uniform over that class's samples, with replacement (`instances="replacement"`,
  the definition above), or taken from a per-class cycle of random permutations (`instances="cycle"`: the
  reference code's behaviour; a class drawn k <= n_c times gets k distinct samples).
- The epoch's global sequence depends only on (seed, epoch) (numpy PCG64 seeded with [seed, epoch]); its length
  is T = num_samples (default: len(labels)) rounded up to a multiple of world_size, and rank r takes positions
  r, r + W, r + 2W, ...: ranks get disjoint positions and equal counts (T / W each). The class-count property
  above holds for the global sequence of T draws.
- Resuming: the order is a pure function of (seed, epoch, rank, world_size), so skipping the first k batches of
  an epoch (or `set_epoch(epoch, start=k * batch_size)`) resumes exactly.

Every rank must hold the same `labels` (the global label array; indices are global). A class with no sample is
never drawn (C counts the classes present) unless `num_classes` is given, which then must match (a class of
`num_classes` absent from `labels` raises ValueError: a balanced sampler cannot draw it).
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

INSTANCE_MODES = ("replacement", "cycle")


class ClassBalancedSampler(torch.utils.data.Sampler):
    def __init__(self, labels: torch.Tensor | Sequence[int], *, seed: int = 0, num_samples: int | None = None,
                 rank: int = 0, world_size: int = 1, num_classes: int | None = None,
                 instances: str = "replacement"):
        lab = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        if lab.ndim != 1 or lab.size == 0:
            raise ValueError(f"labels must be a non-empty 1-D array of class ids, got shape {lab.shape}")
        if lab.min() < 0:
            raise ValueError(f"labels must be >= 0, got {int(lab.min())}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if instances not in INSTANCE_MODES:
            raise ValueError(f"instances must be one of {INSTANCE_MODES}, got '{instances}'")
        counts = np.bincount(lab)
        if num_classes is not None:
            if lab.max() >= num_classes:
                raise ValueError(f"label {int(lab.max())} is out of range for num_classes={num_classes}")
            counts = np.bincount(lab, minlength=num_classes)
            empty = np.flatnonzero(counts == 0)
            if empty.size:
                raise ValueError(f"class-balanced sampling needs every class to have samples; empty classes: "
                                 f"{empty[:20].tolist()}{' ...' if empty.size > 20 else ''}")
        self.classes = np.flatnonzero(counts > 0)  # the classes that are drawn
        self.class_counts = counts[self.classes]
        self.order = np.argsort(lab, kind="stable")  # sample ids grouped by class, ascending class id
        self.starts = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])  # of each drawn class in `order`
        self.seed, self.rank, self.world_size, self.instances = int(seed), int(rank), int(world_size), instances
        n = len(lab) if num_samples is None else int(num_samples)
        if n < 1:
            raise ValueError(f"num_samples must be >= 1, got {n}")
        self.total = math.ceil(n / world_size) * world_size  # global draws per epoch
        self.per_rank = self.total // world_size
        self.epoch, self.start = 0, 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select `epoch`'s order; `start` skips this rank's first `start` indices (resume mid-epoch)."""
        if not 0 <= start <= self.per_rank:
            raise ValueError(f"start {start} is not in [0, {self.per_rank}]")
        self.epoch, self.start = int(epoch), int(start)

    def global_indices(self, epoch: int) -> torch.Tensor:
        """The epoch's whole sequence (all ranks, `total` draws), int64: a function of (seed, epoch) only."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        c, t = self.num_classes, self.total
        cycles = math.ceil(t / c)
        slots = np.argsort(rng.random((cycles, c)), axis=1, kind="stable").reshape(-1)[:t]  # class slot per draw
        sizes = self.class_counts[slots]
        if self.instances == "replacement":
            within = np.minimum((rng.random(t) * sizes).astype(np.int64), sizes - 1)
        else:
            within = self._cycled(rng, slots)
        return torch.from_numpy(self.order[self.starts[slots] + within])

    def _cycled(self, rng: np.random.Generator, slots: np.ndarray) -> np.ndarray:
        """Position within its class of every draw: per class, concatenated random permutations of its samples."""
        within = np.empty(len(slots), dtype=np.int64)
        by_slot = np.argsort(slots, kind="stable")  # draws grouped by class, in draw order
        k = np.bincount(slots, minlength=self.num_classes)
        pos = 0
        for s in range(self.num_classes):
            if k[s] == 0:
                continue
            n_c = int(self.class_counts[s])
            perms = np.argsort(rng.random((math.ceil(k[s] / n_c), n_c)), axis=1, kind="stable").reshape(-1)
            within[by_slot[pos:pos + k[s]]] = perms[:k[s]]
            pos += k[s]
        return within

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's indices for `epoch` (default: the current one), all `per_rank` of them, int64."""
        e = self.epoch if epoch is None else epoch
        return self.global_indices(e)[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
