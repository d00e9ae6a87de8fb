"""Streaming reader of bigltr's WebDataset shards for training and evaluation: ``ShardLoader``, the torch reader of
the epoch plan in ``plan.py`` (which shards each rank reads, the split by sample, equal batch counts across ranks,
padding of short ranks, fault counters).

Design (one epoch = one ``iter(loader)``):

* The main process takes this rank's shards of the epoch from the plan. A ``torch.utils.data.DataLoader`` runs
  ``num_workers`` workers; worker ``w`` reads ``rank_shards[w::W]`` through ``webdataset.WebDataset`` (train: raw
  samples pass a shuffle buffer seeded by ``(seed, epoch, rank, worker)``), decodes, applies the transform and sends
  chunks of up to ``batch_size`` samples. The main process re-batches the chunks into batches of exactly
  ``batch_size`` (the last one partial unless ``drop_last``), so no per-worker remainders appear. When the plan
  divides the split by sample, each worker keeps every ``world_size``-th sample of its stream.
* Everything that decides the order depends only on (seed, epoch, rank, world_size, num_workers): the same
  values give the same batches. Random augmentation is seeded per (seed, epoch, rank) as well, through the
  DataLoader's generator: worker ``w`` seeds ``random``, ``numpy`` and ``torch`` from it as torch does. With
  ``num_workers=0`` the stream runs in the main process under its own RNG states, seeded as worker 0 would be
  and swapped in only while the stream produces a chunk, so it gives the batches of ``num_workers=1`` and never
  reads or advances the process's global RNGs (the training step's, which resume checkpoints carry). Mid-epoch
  resume replays the epoch and discards the batches already trained: that is exact only because re-reading
  them draws nothing from the RNGs the checkpoint restored (docs/data.md, "Failure behaviour").

Data faults (table in docs/data.md, "Failure behaviour"); nothing is lost silently:

* corrupt sample (image does not decode, no image, no ``.cls``): skipped with a warning naming shard, key and
  error; counted in ``epoch_skipped``.
* bad label (``.cls`` not an integer, or outside ``[0, num_classes)``): :class:`DataError` naming shard and key.
  The worker sends it as an error record and the main process raises it, so the user sees one line rather
  than torch's re-raised worker traceback.
* short shard (truncated, unreadable): each worker counts the raw samples it reads per shard and reports any
  shortfall against ``shard_lengths``; counted in ``epoch_lost`` / ``lost_shards`` and logged (train), or a
  :class:`DataError` (eval, unless ``allow_partial``). ``read_info`` already refuses shards whose byte size
  differs from the recorded ``sizes``; this is the backstop for old ``_info.json`` files without sizes and
  for shards damaged while the run reads them.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import DataError
from .info import read_info
from .labels import parse_label
from .plan import IMAGE_KEYS, EpochPlan, sub_seed

__all__ = ["ShardLoader", "DataError"]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- worker side
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, ImportError, RuntimeError, MemoryError)


class _BadSample(Exception):
    """One sample cannot be used (its message names shard, key and cause): skip it and count it."""


class _SkipCounter:
    """webdataset exception handler for per-sample errors: log, count and skip a bad sample.

    Errors that point at code or configuration rather than data (TypeError, RuntimeError, ...) are raised, and
    so is DataError (a fault that must stop the run, e.g. a label out of range).
    """

    def __init__(self, where: str):
        self.where = where
        self.count = 0

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, (DataError, *_PROGRAMMING_ERRORS)):
            raise exn
        self.count += 1
        if self.count <= 5:
            _log.warning("%s: skipping a bad sample: %s", self.where, _describe(exn))
        elif self.count == 6:
            _log.warning("%s: more bad samples; further messages suppressed", self.where)
        return True


def _describe(exn: BaseException) -> str:
    """One-line text of an exception, never empty (some PIL/zlib errors have an empty message)."""
    if isinstance(exn, _BadSample):
        return str(exn)
    return f"{type(exn).__name__}: {exn}" if str(exn) else type(exn).__name__


class _ShardReads:
    """Counts the raw samples each shard of one worker yields, to find shards that end early.

    ``on_error`` is the handler of webdataset's tar-level stages (open, tar reading, grouping): a read error
    ends that shard (webdataset moves on to the next one). It is not counted as a skipped sample: the samples
    it costs are counted by ``count`` as missing from the shard (``short``), against ``shard_lengths``.
    """

    def __init__(self, urls: list[str], lengths: dict[str, int]):
        self.urls, self.lengths = urls, lengths
        self.index = {u: i for i, u in enumerate(urls)}
        self.got: dict[str, int] = {u: 0 for u in urls}
        self.errors: dict[str, str] = {}
        self.short: dict[str, tuple[int, int, Optional[str]]] = {}  # url -> (read, recorded, read error)

    def on_error(self, exn: BaseException) -> bool:
        if isinstance(exn, _PROGRAMMING_ERRORS):
            raise exn
        # webdataset appends the url to the args (or " @ <file object naming the path>" to the first arg)
        url = next((a for a in exn.args if isinstance(a, str) and a in self.index), None)
        if url is None:
            url = next((u for u in self.urls if any(isinstance(a, str) and u in a for a in exn.args)), None)
        if url is not None and url not in self.errors:
            first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
            self.errors[url] = f"{type(exn).__name__}: {first}" if first else type(exn).__name__
        return True  # go on with the next shard

    def _close(self, url: str) -> None:
        got, recorded = self.got[url], self.lengths[url]
        if got < recorded:
            self.short[url] = (got, recorded, self.errors.get(url))

    def count(self, src: Iterator[dict]) -> Iterator[dict]:
        """Pass raw samples through; when a shard is done (a later shard's sample arrives, or the stream
        ends), compare what it yielded with its recorded length. Shards are read in ``urls`` order."""
        pos = 0
        for sample in src:
            i = self.index.get(sample.get("__url__"), pos)
            while pos < i:
                self._close(self.urls[pos])
                pos += 1
            self.got[self.urls[i]] += 1
            yield sample
        for url in self.urls[pos:]:
            self._close(url)


def _decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a PIL image in its stored mode (the transform picks L/RGB)."""
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


def stack_batch(xs: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(xs)``; in a DataLoader worker straight into shared memory, as torch's ``default_collate`` does:
    a batch stacked into ordinary memory is copied once more into shared memory when the worker sends it (measured
    with tools/bench_balanced_stream.py: ShardLoader +11-21% img/s on 224 px ImageNet-style batches with one
    worker; docs/performance.md)."""
    if get_worker_info() is None:
        return torch.stack(xs)
    x0 = xs[0]
    storage = x0._typed_storage()._new_shared(len(xs) * x0.numel(), device=x0.device)
    return torch.stack(xs, out=x0.new(storage).resize_(len(xs), *x0.shape))


def _global_rng() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_global_rng(state: tuple) -> None:
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def _worker0_rng(base_seed: int) -> tuple:
    """The (torch, numpy, random) states torch's DataLoader gives worker 0 for ``base_seed``
    (``torch.utils.data._utils.worker._worker_loop``), made without touching the global RNGs."""
    t = torch.Generator().manual_seed(base_seed).get_state()  # torch.manual_seed(base_seed + 0), CPU part
    try:
        from torch.utils.data._utils.worker import _generate_state

        np_seed = _generate_state(base_seed, 0)
    except ImportError:  # a torch without it: still deterministic per (seed, epoch, rank), not worker 0's draws
        np_seed = np.random.SeedSequence([base_seed]).generate_state(4)
    n = np.random.RandomState(np_seed).get_state()
    r = random.Random(base_seed).getstate()
    return t, n, r


def _private_rng(it: Iterator, state: tuple) -> Iterator:
    """Run iterator ``it`` (the in-process stream of ``num_workers=0``) under its own RNG ``state``: swapped in for
    each ``next`` and out again after, so the transform's random draws come from the epoch's own seed and the
    global RNGs (model, dropout, the training loop) see nothing of them. Costs three small state copies a chunk."""
    while True:
        outer = _global_rng()
        _set_global_rng(state)
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            state = _global_rng()
            _set_global_rng(outer)
        yield item


class _EpochStream(IterableDataset):
    """One epoch of one rank: yields chunks ``(images|None, labels|None, keys, worker_id, status)``.

    ``status`` is cumulative for the worker: ``{"skipped": int, "short": {url: (read, recorded, read error)},
    "error": str|None}``. The last message of a worker has no images; ``error`` is set when a DataError
    stopped it (the main process raises it).
    """

    def __init__(self, urls: list[str], *, transform: Callable, train: bool, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int, chunk: int, lengths: dict[str, int], num_classes: int,
                 stride: Optional[tuple[int, int]] = None):
        super().__init__()
        self.urls, self.transform, self.train, self.stride = urls, transform, train, stride
        self.shuffle_buffer, self.seed, self.epoch, self.rank, self.chunk = shuffle_buffer, seed, epoch, rank, chunk
        self.lengths, self.num_classes = lengths, num_classes

    def _apply(self, sample: dict):
        """Raw webdataset sample -> (tensor, label, key). Decoding here (not with ``.decode``) keeps the shard
        and key at hand for every message."""
        key = sample.get("__key__", "?")
        where = f"{sample.get('__url__', '?')}: sample {key}"
        if "cls" not in sample:
            raise _BadSample(f"{where}: no .cls label")
        label = parse_label(sample["cls"], where, self.num_classes)
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        if ext is None:
            raise _BadSample(f"{where}: no image ({', '.join('.' + e for e in IMAGE_KEYS)})")
        try:
            img = _decode_image(sample[ext])
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:
            raise _BadSample(f"{where}: .{ext} does not decode ({_describe(e)})") from e
        try:
            return self.transform(img), label, key
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as e:
            raise _BadSample(f"{where}: transform failed ({_describe(e)})") from e

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[wid::nw]
        counter = _SkipCounter(f"rank {self.rank} worker {wid}")
        reads = _ShardReads(urls, self.lengths)

        def status(error: Optional[str] = None) -> dict:
            return {"skipped": counter.count, "short": dict(reads.short), "error": error}

        ds = wds.WebDataset(urls, handler=reads.on_error, shardshuffle=False, nodesplitter=None,
                            workersplitter=None, empty_check=False)
        ds = ds.compose(reads.count)  # before the sample split and the shuffle: counts whole shards
        if self.stride is not None:  # sample-level split: every rank reads the shards, keeps every W-th sample
            r, w = self.stride
            ds = ds.compose(lambda src: itertools.islice(src, r, None, w))
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(sub_seed(self.seed, self.epoch, self.rank, wid))
            bufsize = self.shuffle_buffer
            ds = ds.compose(lambda src: _buffer_shuffle(src, bufsize, rng))
        ds = ds.map(self._apply, handler=counter)
        xs, ys, ks = [], [], []
        try:
            for x, y, k in ds:
                xs.append(x)
                ys.append(y)
                ks.append(k)
                if len(ks) >= self.chunk:
                    yield stack_batch(xs), torch.tensor(ys, dtype=torch.long), ks, wid, status()
                    xs, ys, ks = [], [], []
        except DataError as e:
            # an error record instead of an exception: torch would re-raise it in the main process wrapped in
            # a worker traceback; the main process raises DataError(message) itself
            yield None, None, [], wid, status(str(e))
            return
        if ks:
            yield stack_batch(xs), torch.tensor(ys, dtype=torch.long), ks, wid, status()
        yield None, None, [], wid, status()  # final message: this worker's counts


# ----------------------------------------------------------------------------------------------- loader
class ShardLoader(EpochPlan):
    """Iterate ``(images [B,C,H,W] float, labels [B] long, keys list[str])`` batches over one split.

    ``train=True``: shard order and a ``shuffle_buffer`` sample buffer are shuffled deterministically for
    (seed, epoch); call ``set_epoch(epoch)`` before each epoch (the epoch stays fixed otherwise, so iterating
    twice without it repeats the order). ``train=False``: no shuffling, every sample once.
    ``drop_last`` defaults to ``train``. Which shards each rank reads, how ranks are kept in step and the
    attributes (``info``, ``num_samples``, the fault counters ``skipped`` / ``epoch_skipped``, ``lost`` /
    ``epoch_lost`` / ``lost_shards``, ``padded_batches``, ...) are the plan's: :class:`EpochPlan`.

    Faults (see the module docstring): a bad label raises DataError (any loader); a shard that yields fewer
    samples than ``shard_lengths`` records is logged and counted (``train=True``) or raises DataError
    (``train=False``), unless ``allow_partial=True`` (then logged and counted only).
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
        allow_partial: bool = False,
    ):
        super().__init__(root, read_info(os.fspath(root)), split, batch_size=batch_size, train=train, seed=seed,
                         num_workers=num_workers, rank=rank, world_size=world_size, drop_last=drop_last,
                         allow_partial=allow_partial)
        self.transform = transform
        self.shuffle_buffer = int(shuffle_buffer)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = prefetch_factor

    # -- iteration
    def _dataloader(self, urls: list[str]) -> DataLoader:
        stream = _EpochStream(urls, transform=self.transform, train=self.train,
                              shuffle_buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch,
                              rank=self.rank, chunk=self.batch_size, lengths=dict(zip(self._files, self._lengths)),
                              num_classes=int(self.info["num_classes"]), stride=self.stride)
        workers = min(self.num_workers, len(urls))
        # Always our own generator: without one, iter(DataLoader) draws its base seed from the global torch RNG
        # (also with num_workers=0), which a mid-epoch resume would then draw a second time.
        kw: dict[str, Any] = {"generator": self._generator()}
        if workers > 0 and self.prefetch_factor is not None:
            kw["prefetch_factor"] = self.prefetch_factor
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          persistent_workers=False, **kw)

    def _generator(self) -> torch.Generator:
        """The epoch's DataLoader generator: its first draw is the workers' base seed."""
        return torch.Generator().manual_seed(sub_seed(self.seed, self.epoch, self.rank, 7))

    def _base_seed(self) -> int:
        """The base seed ``iter(DataLoader)`` draws from ``_generator()`` (torch's ``_BaseDataLoaderIter``)."""
        return int(torch.empty((), dtype=torch.int64).random_(generator=self._generator()).item())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        B, target = self.batch_size, self._len
        cap = self._cap
        status: dict[int, dict] = {}  # worker id -> its latest (cumulative) status
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
        if loader.num_workers == 0:  # the stream runs here, between our yields: give it its own RNGs
            it = _private_rng(it, _worker0_rng(self._base_seed()))
        failed = False
        try:
            for x, y, keys, wid, st in it:
                status[wid] = st
                error = st["error"] or self.short_error(st["short"])
                if error:
                    failed = True
                    raise DataError(error)
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
            yield from self.pad(last, emitted)
        finally:
            del it
            # workers read disjoint shards: their short shards do not overlap
            self.count_epoch(sum(st["skipped"] for st in status.values()),
                             {u: sh for st in status.values() for u, sh in st["short"].items()}, log=not failed)
