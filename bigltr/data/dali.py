"""NVIDIA DALI reader of bigltr's WebDataset shards: ``DaliShardLoader``, a drop-in for ``ShardLoader``.

``data.pipeline=dali`` (or ``auto`` with DALI installed and a CUDA device) makes ``RunContext.loader`` build this
instead of ``ShardLoader``. It reads the same shards and ``_info.json`` (no re-conversion) with DALI's own
``fn.readers.webdataset``, decodes on the GPU (``device="mixed"``: nvJPEG / nvImageCodec) when the loader's
device is CUDA, else in DALI's CPU-only mode, and applies the augmentation of ``data.train_aug`` inside DALI.
Iterating yields ``(images [B,C,H,W] float32 normalised, labels [B] long, keys list[str])`` like ShardLoader;
images are on the loader's device.

Same data semantics as ShardLoader (module docstrings of ``plan.py`` and ``loader.py``; docs/data.md):

* Both read one epoch plan (``plan.EpochPlan``): ``len()``, ``num_samples``, the shards a rank reads and the
  padding of short ranks, so the batch count is the same on every rank and equal to ShardLoader's. Ranks read
  disjoint shards; when the plan divides the split by sample (fewer shards than ranks, or uneven shards), rank
  ``r`` keeps the samples whose position in the split (shards in file order) is ``r`` modulo ``world_size``.
* Order, deterministic for (seed, epoch, rank): the shard order is ShardLoader's (``default_rng([seed, epoch])``
  permutation, ``perm[r::W]``), and each shard's samples are permuted by ``default_rng([seed, epoch, rank,
  shard])``. DALI reads the samples in exactly that order because bigltr writes the DALI index files itself,
  one line per sample in reading order (DALI seeks to each sample's offset; shards stay whole files, read one
  after the other). This replaces ShardLoader's ``shuffle_buffer`` window by a full shuffle within each shard.
  Eval reads shards and samples in file order. The pipeline is rebuilt each epoch, seeded by the plan's
  ``sub_seed(seed, epoch, rank, first sample)`` cut to 31 bits (DALI takes signed 32-bit seeds): the same epoch
  gives the same augmentation draws, so mid-epoch resume, which reads and discards the first k batches, continues
  with exactly the remaining samples.
* Keys are the WebDataset ``__key__`` values (member name up to the first dot), checked against DALI's
  ``source_info`` of every sample, and labels come from the ``.cls`` members read when the shard is indexed.
* Faults, as in ShardLoader: a sample without image or ``.cls`` is skipped and counted (``epoch_skipped``); an
  image PIL cannot decode (ShardLoader's test) is found when its shard is indexed and never reaches DALI (its
  decoders can crash the process on some damaged images: a PNG signature followed by zeros gave SIGSEGV), and is
  skipped, logged and counted likewise; an image PIL decodes but DALI cannot is found (the failing batch is re-run
  one sample at a time), logged with shard and key, skipped and counted, and the pipeline is rebuilt from that
  batch on; a ``.cls`` that is not an integer
  in [0, num_classes) raises DataError naming shard and key; a shard holding fewer samples than
  ``shard_lengths`` records (truncated) is counted in ``epoch_lost`` / ``lost_shards`` and logged (train) or
  raises DataError (eval, unless ``allow_partial``). Short ranks pad with their last batch (``padded_batches``).

Per-epoch DALI index files (the reading order) go to a temporary folder that is removed after the epoch; the
samples of each shard come from its cached index (``shard_index.load_shard_index``), made once per shard file.

Why index files are hand-written rather than made by DALI's ``wds2idx``: the loader needs the reading order,
the labels and the keys in Python anyway (for the order, the key check and ``len``), DALI's index format is
four fields per component (``v1.2``: ``<ext> <offset> <size> <name>``), and one order file per epoch is what
gives exact per-epoch, per-rank control over which samples DALI reads. Without index files DALI infers one per
tar at start-up (and warns), and shuffles only within its own prefetch buffer.

DALI is imported lazily (only when a DaliShardLoader is built), so this module imports without it.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .dali_transforms import augment_graph
from .errors import DataError
from .info import read_info
from .plan import IMAGE_KEYS, EpochPlan, Short, sub_seed
from .shard_index import default_index_dir, load_shard_index, sample_label

__all__ = ["DaliShardLoader", "dali_available", "resolve_pipeline", "DALI_INSTALL_HINT"]

_log = logging.getLogger(__name__)

DALI_INSTALL_HINT = "pip install -e '.[dali]'"


# ----------------------------------------------------------------------------------------------- availability
def dali_available() -> bool:
    """True when ``import nvidia.dali`` works (imports it: call it only when DALI may be used)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install raising OSError from its shared libraries
        return False
    return True


@functools.lru_cache(maxsize=None)
def resolve_pipeline(pipeline: str, device_type: str) -> str:
    """``data.pipeline`` ("torch" | "dali" | "auto") -> "torch" or "dali"; logs the choice for "auto" once.

    "dali" without an importable DALI is a ConfigError naming the install command; "auto" picks DALI when it is
    importable and the run's device is CUDA, else torch.
    """
    from bigltr.config import ConfigError

    if pipeline == "torch":
        return "torch"
    if pipeline == "dali":
        if not dali_available():
            raise ConfigError(f"config key 'data.pipeline': 'dali' needs NVIDIA DALI, which cannot be imported here; "
                              f"install it with {DALI_INSTALL_HINT} (or use data.pipeline=torch or auto)")
        return "dali"
    if pipeline != "auto":
        raise ConfigError(f"config key 'data.pipeline': {pipeline!r} is not one of ['torch', 'dali', 'auto']")
    if device_type != "cuda":
        choice, why = "torch", "no CUDA device"
    elif not dali_available():
        choice, why = "torch", f"NVIDIA DALI is not installed ({DALI_INSTALL_HINT})"
    else:
        import nvidia.dali

        choice, why = "dali", f"CUDA device and NVIDIA DALI {nvidia.dali.__version__}"
    logging.getLogger("bigltr").info(f"data.pipeline=auto: using the {choice} data pipeline ({why})")
    return choice


# ----------------------------------------------------------------------------------------------- loader
class DaliShardLoader(EpochPlan):
    """Iterate ``(images [B,C,H,W] float32, labels [B] long, keys list[str])`` over one split with NVIDIA DALI.

    A reader of the same :class:`EpochPlan` as ``ShardLoader``, so the same interface and attributes (``len``,
    ``set_epoch``, ``info``, ``num_samples``, ``expected_samples``, ``skipped``/``epoch_skipped``,
    ``lost``/``epoch_lost``/``lost_shards``, ``padded_batches``, ``split``); it takes the augmentation by name
    (``aug``: ``data.train_aug``, applied when ``augment``, default ``train``; otherwise the eval transform of the
    same name) instead of a callable. ``device``: "cpu" (DALI CPU-only mode) or a CUDA device (decode and augment on
    that GPU; batches are returned there). ``num_workers``: DALI CPU threads (at least 1), and the plan argument of
    the same name that ``len`` depends on. ``seed``, ``rank``, ``world_size``, ``drop_last`` and ``allow_partial``
    are the plan's (ShardLoader's meaning and defaults); ``shuffle_buffer`` is taken for ShardLoader's signature
    and not used (each shard is shuffled whole). See the module docstring for order, keys and faults.
    """

    short_verb = "holds"  # a shard's samples are counted when it is indexed

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        batch_size: int,
        train: bool,
        img_size: int,
        in_chans: int,
        mean: Sequence[float],
        std: Sequence[float],
        aug: str = "none",
        augment: Optional[bool] = None,
        device: str | torch.device = "cpu",
        index_dir: Optional[str] = None,
        prefetch: int = 2,
        shuffle_buffer: Optional[int] = None,
        **plan,
    ):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(f"DaliShardLoader needs NVIDIA DALI: {DALI_INSTALL_HINT} ({e})") from e
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values, got {tuple(mean)}, {tuple(std)}")
        from bigltr.config import AUGS  # the one list of augmentation names (data.train_aug)

        if aug not in AUGS:
            raise ValueError(f"aug must be {', '.join(map(repr, AUGS[:-1]))} or {AUGS[-1]!r}, got {aug!r}")
        super().__init__(root, read_info(os.fspath(root)), split, batch_size=batch_size, train=train, **plan)
        self.aug, self.augment = aug, self.train if augment is None else bool(augment)
        from .transforms import image_hw

        h, w = image_hw(img_size)
        self.img_size, self.in_chans = (h if h == w else (h, w)), int(in_chans)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_threads = max(1, self.num_workers)
        self.prefetch = max(1, int(prefetch))
        self.device = torch.device(device)
        self.index_dir = os.fspath(index_dir) if index_dir else default_index_dir()
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)]).tolist()  # position of each shard's first sample
        self._num = {f: i for i, f in enumerate(self._files)}
        if self._split_samples and not self.train:  # rank r reads the split's positions r, r + ws, ...
            self.num_samples = len(range(self.rank, sum(self._lengths), self.world_size))
        self._index: dict[int, dict] = {}
        self._bad: set[tuple[int, str]] = set()  # (shard, key) of images DALI could not decode, found earlier
        self._warned = 0
        self._why: dict[tuple[int, str], str] = {}  # (shard, key) -> why a sample is skipped (ShardLoader's text)

    # -- order
    def _shard_index(self, i: int) -> dict:
        if i not in self._index:
            # decode_check: images PIL cannot decode never reach DALI (its decoders can crash the process on
            # some of them); checked once per shard file and cached with the index
            self._index[i] = load_shard_index(self._files[i], self.index_dir, decode_check=True,
                                              threads=self.num_threads)
        return self._index[i]

    def _epoch_order(self) -> tuple[list[tuple], dict[str, Short]]:
        """This rank's samples of this epoch in reading order, ``(shard, key, label|None, ext, offset, size,
        member)`` (label None: no image, no label or an image that does not decode, skipped when reached; the
        reason is in ``self._why``), and the shards it reads that hold fewer samples than recorded:
        ``{path: (found, recorded, scan error)}``."""
        num_classes = int(self.info["num_classes"])
        ws, r = self.world_size, self.rank
        order: list[tuple] = []
        short: dict[str, Short] = {}
        for path in self.shards_for_epoch():
            i = self._num[path]
            idx = self._shard_index(i)
            rows, bad = idx["samples"], idx["bad"] or {}
            if len(rows) < self._lengths[i]:
                short[path] = (len(rows), self._lengths[i], idx["error"])
            pos = range(len(rows))
            if self._split_samples:  # keep every ws-th sample of the split (file order) from the rank-th on
                pos = [j for j in pos if (self._starts[i] + j) % ws == r]
            if self.train:
                pos = [pos[j] for j in np.random.default_rng([self.seed, self.epoch, r, i]).permutation(len(pos))]
            for j in pos:
                key, _text, ext, off, size, member = rows[j]
                # a bad label stops the run, as in ShardLoader
                label, why = sample_label(rows[j], j, bad, f"{path}: sample {key}", num_classes)
                if why is not None:
                    self._why[(i, key)] = why
                order.append((i, key, label, ext, off, size, member))
        return order, short

    # -- DALI
    def _pipeline(self, samples: list[tuple], workdir: str, tag: str, batch_size: int, seed: int):
        """A built pipeline reading ``samples`` (good ones, in order) through per-shard order index files."""
        from nvidia.dali import fn, pipeline_def

        runs: list[tuple[str, str]] = []
        start = 0
        while start < len(samples):  # maximal runs of consecutive samples from one shard
            end = start
            while end < len(samples) and samples[end][0] == samples[start][0]:
                end += 1
            idx = os.path.join(workdir, f"{tag}-{len(runs)}.idx")
            with open(idx, "w") as f:
                f.write(f"v1.2 {end - start}\n")
                f.writelines(f"{s[3]} {s[4]} {s[5]} {s[6]}\n" for s in samples[start:end])
            runs.append((self._files[samples[start][0]], idx))
            start = end
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if gpu \
            else None

        @pipeline_def(batch_size=batch_size, num_threads=self.num_threads, device_id=device_id, seed=seed,
                      prefetch_queue_depth=self.prefetch)
        def pipe():
            enc = fn.readers.webdataset(paths=[p for p, _ in runs], index_paths=[x for _, x in runs],
                                        ext=[";".join(IMAGE_KEYS)], missing_component_behavior="error",
                                        pad_last_batch=True)  # a short last batch repeats, not wraps
            src = fn.get_property(enc, key="source_info")
            img = augment_graph(enc, aug=self.aug, augment=self.augment, img_size=self.img_size,
                                 in_chans=self.in_chans, mean=self.mean, std=self.std, gpu=gpu)
            return img, src

        pl = pipe()
        pl.build()
        return pl

    def _run(self, pl, n: int) -> tuple[torch.Tensor, list[str]]:
        """One batch from ``pl``: the first ``n`` images (copied out of DALI's buffers) and their member names."""
        from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray

        imgs, src = pl.run()
        if self.device.type == "cuda":
            imgs = imgs.as_tensor()
            out = torch.empty(imgs.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(imgs, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            out = torch.from_numpy(np.array(imgs.as_tensor()))  # np.array copies: DALI reuses its buffers
        infos = [np.array(src[k]).tobytes().decode("utf-8", "replace") for k in range(n)]  # "<tar>:<offset>:<member>"
        return (out[:n] if n < out.shape[0] else out), infos

    def _find_bad(self, batch: list[tuple], workdir: str) -> list[tuple]:
        """The samples of a batch DALI failed on that fail on their own (one pipeline run per sample)."""
        bad: list[tuple] = []
        rest = list(batch)
        while rest:
            pl = self._pipeline(rest, workdir, "probe", 1, 0)
            try:
                for k in range(len(rest)):
                    try:
                        self._run(pl, 1)
                    except RuntimeError:
                        bad.append(rest[k])
                        rest = rest[k + 1:]
                        break
                else:
                    rest = []
            finally:
                del pl
        return bad

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        B, target, cap = self.batch_size, self._len, self._cap
        self.padded_batches = 0
        order, short = self._epoch_order()
        error = self.short_error(short)
        if error:
            raise DataError(error)
        workdir = tempfile.mkdtemp(prefix="bigltr_dali_")
        emitted = taken = 0
        reached = 0  # order positions consumed (for the skip count)
        last = None
        good = [s for s in order if s[2] is not None and (s[0], s[1]) not in self._bad]
        gpos = {id(s): k for k, s in enumerate(order)}  # order position of each good sample
        try:
            start = 0  # next good sample to read
            while emitted < target and start < len(good) and (cap is None or taken < cap):
                seed = sub_seed(self.seed, self.epoch, self.rank, start, bits=31)
                pl = self._pipeline(good[start:], workdir, f"e{self.epoch}-{start}", B, seed)
                try:
                    while emitted < target and start < len(good) and (cap is None or taken < cap):
                        n = min(B, len(good) - start, cap - taken if cap is not None else B)
                        if n < B and self.drop_last:
                            start = len(good)
                            break
                        batch = good[start:start + n]
                        try:
                            x, names = self._run(pl, n)
                        except RuntimeError as e:
                            tried = good[start:start + B]
                            bad = self._find_bad(tried, workdir)
                            if not bad or (len(bad) == len(tried) > 1):  # not one bad image: a systematic fault
                                raise DataError(f"rank {self.rank}: DALI failed on the batch of "
                                                f"{self._files[batch[0][0]]} starting at sample {batch[0][1]} "
                                                f"({len(bad)} of its {len(tried)} samples fail alone): {e}") from e
                            for s in bad:
                                self._bad.add((s[0], s[1]))
                                self._warned += 1
                                if self._warned <= 5:
                                    _log.warning("rank %d: %s: sample %s: skipping a bad sample (.%s does not decode "
                                                 "with DALI)", self.rank, self._files[s[0]], s[1], s[3])
                                elif self._warned == 6:
                                    _log.warning("rank %d: more bad samples; further messages suppressed", self.rank)
                            good = [s for s in good if (s[0], s[1]) not in self._bad]
                            break  # rebuild from `start`, which is now the next good sample
                        for info, s in zip(names, batch):
                            if not (info.startswith(self._files[s[0]] + ":") and info.endswith(":" + s[6])):
                                raise RuntimeError(f"DALI read {info} where {self._files[s[0]]}: {s[6]} was expected "
                                                   f"(a bigltr bug: index order and reader disagree)")
                        y = torch.tensor([s[2] for s in batch], dtype=torch.long)
                        last = (x, y, [s[1] for s in batch])
                        start += n
                        taken += n
                        reached = gpos[id(batch[-1])] + 1
                        yield last
                        emitted += 1
                finally:
                    del pl
            if emitted < target and start >= len(good):
                reached = len(order)  # read to the end: every skipped sample of this rank's shards counts
            yield from self.pad(last, emitted)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            skips = [s for s in order[:reached] if s[2] is None]
            for n, s in enumerate(skips[:6]):  # DALI-found ones were logged when found
                if n == 5:
                    _log.warning("rank %d: more bad samples; further messages suppressed", self.rank)
                else:
                    _log.warning("rank %d: skipping a bad sample: %s", self.rank, self._why.get((s[0], s[1]), s[1]))
            skipped = len(skips) + sum(1 for s in order[:reached] if s[2] is not None and (s[0], s[1]) in self._bad)
            self.count_epoch(skipped, short)
