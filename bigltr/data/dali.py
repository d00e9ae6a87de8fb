"""NVIDIA DALI reader of bigltr's WebDataset shards: ``DaliShardLoader``, a drop-in for ``ShardLoader``.

``data.pipeline=dali`` (or ``auto`` with DALI installed and a CUDA device) makes ``RunContext.loader`` build this
instead of ``ShardLoader``. It reads the same shards and ``_info.json`` (no re-conversion) with DALI's own
``fn.readers.webdataset``, decodes on the GPU (``device="mixed"``: nvJPEG / nvImageCodec) when the loader's
device is CUDA, else in DALI's CPU-only mode, and applies the augmentation of ``data.train_aug`` inside DALI.
Iterating yields ``(images [B,C,H,W] float32 normalised, labels [B] long, keys list[str])`` like ShardLoader;
images are on the loader's device.

Same data semantics as ShardLoader (module docstring of ``loader.py``; docs/data.md):

* ``len()``, ``num_samples`` and the shards a rank reads come from a ShardLoader built with the same arguments
  (its constructor only does arithmetic on ``shard_lengths``), so the batch count is the same on every rank and
  equal to ShardLoader's. Ranks read disjoint shards; when ShardLoader would split by sample (fewer shards
  than ranks, or uneven shards), rank ``r`` keeps the samples whose position in the split (shards in file
  order) is ``r`` modulo ``world_size``.
* Order, deterministic for (seed, epoch, rank): the shard order is ShardLoader's (``default_rng([seed, epoch])``
  permutation, ``perm[r::W]``), and each shard's samples are permuted by ``default_rng([seed, epoch, rank,
  shard])``. DALI reads the samples in exactly that order because bigltr writes the DALI index files itself,
  one line per sample in reading order (DALI seeks to each sample's offset; shards stay whole files, read one
  after the other). This replaces ShardLoader's ``shuffle_buffer`` window by a full shuffle within each shard.
  Eval reads shards and samples in file order. The pipeline is rebuilt each epoch (seeded by (seed, epoch,
  rank): the same epoch gives the same augmentation draws), so mid-epoch resume, which reads and discards the
  first k batches, continues with exactly the remaining samples.
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

Index cache: scanning a shard's tar headers (and reading its tiny ``.cls`` members) costs one pass over the
headers, and decoding its images once with PIL (``check_images``) one more pass; the result is kept as JSON in
``index_dir`` (default ``$XDG_CACHE_HOME/bigltr/dali_index`` or
``~/.cache/bigltr/dali_index``), one file per shard named by a hash of its absolute path, size and mtime, so a
rewritten shard is indexed again. Nothing is written into the data folder. Per-epoch DALI index files (the
reading order) go to a temporary folder that is removed after the epoch.

Why index files are hand-written rather than made by DALI's ``wds2idx``: the loader needs the reading order,
the labels and the keys in Python anyway (for the order, the key check and ``len``), DALI's index format is
four fields per component (``v1.2``: ``<ext> <offset> <size> <name>``), and one order file per epoch is what
gives exact per-epoch, per-rank control over which samples DALI reads. Without index files DALI infers one per
tar at start-up (and warns), and shuffles only within its own prefetch buffer.

DALI is imported lazily (only when a DaliShardLoader is built), so this module imports without it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from bigltr.atomic import write_text_atomic

from .errors import DataError
from .info import INFO_NAME
from .labels import parse_label

__all__ = ["DaliShardLoader", "dali_available", "resolve_pipeline", "DALI_INSTALL_HINT"]

_log = logging.getLogger(__name__)

DALI_INSTALL_HINT = "pip install -e '.[dali]'"
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")  # ShardLoader's IMAGE_KEYS, in its order of preference
_INDEX_VERSION = 2  # 2: "bad", the images PIL cannot decode
# timm's DEFAULT_CROP_PCT: the eval transform resizes the shorter side to floor(img_size / 0.875), then centre-crops
_CROP_PCT = 0.875


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


# ----------------------------------------------------------------------------------------------- shard index
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split (first dot of basename)


def default_index_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bigltr", "dali_index")


def _scan_shard(path: str) -> dict:
    """One pass over a tar's headers: samples (consecutive members with the same key, like webdataset) with the
    offset and size of their image, their raw ``.cls`` text, and what could not be used.

    Returns ``{"samples": [[key, cls_text|None, ext|None, offset, size, member], ...], "error": str|None}``; a
    sample without image has ext None, one without ``.cls`` has cls_text None. Scanning stops at the first
    unreadable header or a member that ends past the end of the file (a truncated copy); ``error`` says so.
    """
    size = os.path.getsize(path)
    samples: list[list] = []
    cur: Optional[dict] = None
    error = None

    def close(group):
        if group is None:
            return
        ext = next((e for e in _IMAGE_EXTS if e in group["members"]), None)
        off, n, member = group["members"][ext] if ext else (0, 0, "")
        samples.append([group["key"], group.get("cls"), ext, off, n, member])

    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    # like webdataset: the sample's complete members so far still form a (partial) sample
                    error = f"member {m.name} ends at byte {m.offset_data + m.size}, past the end of the file ({size})"
                    break
                match = _KEY_RE.match(m.name)
                if match is None:
                    continue  # no extension: webdataset ignores such members too
                key, ext = match.group(1), match.group(2).lower()
                if cur is None or cur["key"] != key:
                    close(cur)
                    cur = {"key": key, "members": {}}
                if ext == "cls":
                    cur["cls"] = tf.extractfile(m).read().decode("utf-8", "replace")
                else:
                    cur["members"][ext] = (m.offset_data, m.size, m.name)
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    close(cur)
    return {"samples": samples, "error": error}


def _index_path(index_dir: str, shard: str) -> str:
    st = os.stat(shard)
    h = hashlib.sha1(f"{os.path.abspath(shard)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return os.path.join(index_dir, f"{h}.json")


def _describe(exn: BaseException) -> str:
    """One-line text of an exception (ShardLoader's wording; some PIL/zlib errors have an empty message)."""
    text = " ".join(str(exn).split())
    return f"{type(exn).__name__}: {text}" if text else type(exn).__name__


def _decode_one(blob: bytes) -> Optional[str]:
    """None when PIL fully decodes ``blob`` (ShardLoader's test of an image), else the error in one line."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return _describe(e)
    return None


def check_images(path: str, samples: list, threads: int = 1) -> dict[str, str]:
    """Decode every image of one shard with PIL, as ShardLoader does before it uses a sample; return
    ``{str(position): error}`` for the samples whose image does not decode.

    DALI's own decoders can crash the process (a segmentation fault, not an exception) on some damaged images,
    e.g. a PNG signature followed by zeros, so such samples must never reach DALI. PIL's full decode is also
    exactly the test the torch path applies, so both pipelines skip (and count) the same samples.
    """
    rows = [(j, s[3], s[4]) for j, s in enumerate(samples) if s[2] is not None]
    bad: dict[str, str] = {}

    def run(part):
        out = {}
        with open(path, "rb") as f:
            for j, off, n in part:
                f.seek(off)
                blob = f.read(n)
                err = _decode_one(blob) if len(blob) == n else f"member ends past the end of the file ({path})"
                if err is not None:
                    out[str(j)] = err
        return out

    threads = max(1, min(int(threads), len(rows) // 256 or 1))  # PIL releases the GIL while it decodes
    if threads == 1:
        return run(rows)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(run, [rows[t::threads] for t in range(threads)]):
            bad.update(part)
    return bad


def load_shard_index(shard: str, index_dir: str, *, decode_check: bool = False, threads: int = 1) -> dict:
    """The scan of ``shard`` from the cache, made (and cached atomically) on first use.

    ``decode_check``: also know which images do not decode (``data["bad"]``: ``{str(position): error}``),
    decoding them once with PIL (:func:`check_images`) and caching the result with the scan; without it
    ``data["bad"]`` may be None (not checked yet), which is all the label check at start-up needs.
    """
    cache = _index_path(index_dir, shard)
    data = None
    try:
        with open(cache, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != _INDEX_VERSION or data.get("path") != os.path.abspath(shard):
            data = None
    except (OSError, ValueError):
        data = None
    if data is not None and (data.get("bad") is not None or not decode_check):
        return data
    if data is None:
        data = {"version": _INDEX_VERSION, "path": os.path.abspath(shard), **_scan_shard(shard), "bad": None}
    if decode_check:
        data["bad"] = check_images(shard, data["samples"], threads)
    try:
        write_text_atomic(cache, json.dumps(data, separators=(",", ":")))  # atomic: ranks may index at once
    except OSError as e:  # a read-only cache folder costs a re-scan next time, nothing else
        _log.warning("cannot write the DALI index cache %s (%s); shards are re-indexed every run", cache, e)
    return data


# ShardLoader's arguments that DaliShardLoader takes as they are (its defaults are ShardLoader's)
_PLAN_ARGS = ("seed", "num_workers", "shuffle_buffer", "rank", "world_size", "drop_last", "allow_partial")


def _sub_seed(*parts: int) -> int:
    """A 31-bit seed from integers (DALI takes signed 32-bit seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------------------- DALI graph
def _augment_graph(enc, *, aug: str, augment: bool, img_size, in_chans: int, mean: Sequence[float],
                   std: Sequence[float], gpu: bool):
    """Encoded images -> normalised float CHW, mirroring ``bigltr.data.loader.build_transform``.

    Eval paths match torch's (up to decoder/resampler rounding, see docs/data.md): ``none``/``cifar``: resize to
    img_size x img_size when the image has another size; ``imagenet``: timm's eval transform, shorter side to
    floor(img_size / 0.875) (longer side int()-truncated like torchvision), centre crop with Python's
    round-half-even offset. ``img_size``: S, [S] or [H, W] (``bigltr.data.transforms.image_hw``; a non-square size
    resizes to H x W and crops H x W; ``imagenet`` eval needs a square one). Training: ``cifar`` pads 4 (zeros) and
    takes a random img_size crop (``crop``: the same, never flipped), then flips with
    p=0.5; ``imagenet`` is timm's default: random-resized crop (area 0.08-1, ratio 3/4-4/3, 10 attempts),
    flip, colour jitter 0.4 (brightness, contrast, saturation factors in [0.6, 1.4]).
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    from .transforms import image_hw

    H, W = image_hw(img_size)
    S = H  # the square sizes (imagenet eval) are S x S
    dec = dict(device="mixed" if gpu else "cpu", output_type=types.RGB,
               adjust_orientation=False,  # PIL ignores EXIF orientation; so does the torch path
               jpeg_fancy_upsampling=True)  # libjpeg's (and so PIL's) chroma upsampling on the GPU too
    lin = dict(interp_type=types.INTERP_LINEAR, antialias=True)  # torchvision's bilinear with antialias on PIL

    def mode(img):
        # in_chans 1: decode RGB, then convert with PIL's convert("L") weights (a GRAY decode of a colour JPEG
        # reads its luma channel instead: up to 4 grey levels off PIL)
        if in_chans == 1:
            return fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY)
        return img

    mirror = 0
    if aug == "imagenet" and augment:
        img = mode(fn.decoders.image_random_crop(enc, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                                                 num_attempts=10, **dec))
        img = fn.resize(img, resize_x=W, resize_y=H, **lin)
        # ColorJitter(0.4, 0.4, 0.4) as one colour matrix (DALI's color_twist: a single pass, 1.5x faster on CPU
        # than brightness_contrast + saturation). torchvision applies the three in a random order, clamping after
        # each, and centres contrast on the image's mean grey; color_twist has a fixed order, clamps once and
        # centres contrast on mid-grey (128). Same factor distributions.
        jitter = dict(brightness=fn.random.uniform(range=[0.6, 1.4]), contrast=fn.random.uniform(range=[0.6, 1.4]))
        if in_chans == 3:
            img = fn.color_twist(img, saturation=fn.random.uniform(range=[0.6, 1.4]), **jitter)
        else:  # saturation does nothing to a grey image (nor in torchvision)
            img = fn.brightness_contrast(img, **jitter)
        mirror = fn.random.coin_flip(probability=0.5)
    elif aug == "imagenet":
        if H != W:  # timm resizes a non-square eval size with its ResizeKeepRatio, not mirrored here
            raise ValueError(f"the DALI pipeline's imagenet eval transform needs a square img_size, got {H}x{W} "
                             f"(use data.pipeline=torch)")
        shape = fn.peek_image_shape(enc, adjust_orientation=False, dtype=types.INT32)
        h, w = shape[0], shape[1]
        R = math.floor(S / _CROP_PCT)
        h_short = h <= w  # torchvision: the shorter side is w only when w < h
        tall = 1 - h_short
        new_long = (R * dmath.max(h, w)) // dmath.min(h, w)  # == int(R * long / short) for positive integers
        new_h, new_w = h_short * R + tall * new_long, h_short * new_long + tall * R  # w == h: both R
        img = mode(fn.decoders.image(enc, **dec))
        img = fn.resize(img, resize_x=fn.cast(new_w, dtype=types.FLOAT), resize_y=fn.cast(new_h, dtype=types.FLOAT),
                        **lin)
        img = fn.slice(img, fn.stack(_half_even(new_h - S), _half_even(new_w - S)), _const([S, S]), axes=[0, 1])
    else:
        if aug not in ("none", "cifar", "crop"):
            raise ValueError(f"aug must be 'none', 'cifar', 'crop' or 'imagenet', got {aug!r}")
        img = mode(fn.decoders.image(enc, **dec))
        # resize to S x S; DALI's linear resampling to the same size is the identity (tests check it), so the
        # torch path's "only when the size differs" needs no branch
        img = fn.resize(img, resize_x=W, resize_y=H, **lin)
        if aug in ("cifar", "crop") and augment:
            # RandomCrop(S, padding=4) on an S x S image: offset in {-4..4} per axis, zero padding
            off = fn.random.uniform(values=list(range(-4, 5)), shape=[2], dtype=types.INT32)
            img = fn.slice(img, off, _const([H, W]), axes=[0, 1], out_of_bounds_policy="pad", fill_values=0)
            if aug == "cifar":
                mirror = fn.random.coin_flip(probability=0.5)
    # ToTensor + Normalize: (x / 255 - m) / s == (x - 255 m) / (255 s)
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * float(m) for m in mean], std=[255.0 * float(s) for s in std])


def _const(values):
    from nvidia.dali import types

    return types.Constant(np.array(values, dtype=np.int32), device="cpu")


def _half_even(d):
    """Python's int(round(d / 2)) for integer DataNodes d >= 0 (torchvision's centre-crop offset)."""
    q = d // 2
    return q + (d - 2 * q) * (q - 2 * (q // 2))  # an odd d rounds x.5 to the even neighbour


# ----------------------------------------------------------------------------------------------- loader
class DaliShardLoader:
    """Iterate ``(images [B,C,H,W] float32, labels [B] long, keys list[str])`` over one split with NVIDIA DALI.

    Same interface and attributes as ``ShardLoader`` (``len``, ``set_epoch``, ``info``, ``num_samples``,
    ``expected_samples``, ``skipped``/``epoch_skipped``, ``lost``/``epoch_lost``/``lost_shards``,
    ``padded_batches``, ``split``); it takes the augmentation by name (``aug``: ``data.train_aug``, applied when
    ``augment``, default ``train``; otherwise the eval transform of the same name) instead of a callable.
    ``device``: "cpu" (DALI CPU-only mode) or a CUDA device (decode and augment on that GPU; batches are
    returned there). ``num_workers``: DALI CPU threads (at least 1), and the ShardLoader argument of the same
    name that ``len`` depends on. ``seed``, ``num_workers``, ``shuffle_buffer``, ``rank``, ``world_size``,
    ``drop_last`` and ``allow_partial`` are ShardLoader's (same meaning and defaults: they are passed on to the
    ShardLoader that plans the epochs). See the module docstring for order, keys and faults.
    """

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
        **plan,
    ):
        try:
            import nvidia.dali  # noqa: F401
        except ImportError as e:
            raise ImportError(f"DaliShardLoader needs NVIDIA DALI: {DALI_INSTALL_HINT} ({e})") from e
        from .loader import ShardLoader

        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean and std need {in_chans} values, got {tuple(mean)}, {tuple(std)}")
        if aug not in ("none", "cifar", "crop", "imagenet"):
            raise ValueError(f"aug must be 'none', 'cifar', 'crop' or 'imagenet', got {aug!r}")
        unknown = sorted(set(plan) - set(_PLAN_ARGS))
        if unknown:
            raise TypeError(f"DaliShardLoader got unexpected keyword argument(s) {unknown}")
        # The plan (shards per rank and epoch, len, per-rank sample counts) is ShardLoader's own arithmetic on
        # shard_lengths: building one reads _info.json and starts no worker.
        self._plan = ShardLoader(root, split, batch_size=batch_size, transform=None, train=train, **plan)
        p = self._plan
        self.root, self.split, self.info, self.entry = p.root, split, p.info, p.entry
        self.batch_size, self.train, self.seed = p.batch_size, p.train, p.seed
        self.rank, self.world_size, self.drop_last = p.rank, p.world_size, p.drop_last
        self.allow_partial = p.allow_partial
        self.expected_samples = int(self.entry["num_samples"])
        self.aug, self.augment = aug, self.train if augment is None else bool(augment)
        from .transforms import image_hw

        h, w = image_hw(img_size)
        self.img_size, self.in_chans = (h if h == w else (h, w)), int(in_chans)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.num_threads = max(1, p.num_workers)
        self.prefetch = max(1, int(prefetch))
        self.device = torch.device(device)
        self.index_dir = os.fspath(index_dir) if index_dir else default_index_dir()
        self.epoch = 0
        self.skipped = self.epoch_skipped = 0
        self.lost = self.epoch_lost = 0
        self.lost_shards: list[str] = []
        self.padded_batches = 0

        self._files = [os.path.join(self.root, f) for f in self.entry["filenames"]]
        self._lengths = [int(n) for n in self.entry["shard_lengths"]]
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)]).tolist()  # position of each shard's first sample
        self._num = {f: i for i, f in enumerate(self._files)}
        ws = self.world_size
        # ShardLoader divides the split by sample exactly when every rank reads every shard
        self._split_samples = ws > 1 and len(p.shards_for_epoch(0)) == len(self._files)
        self._len = len(p)
        # train: at most the cap every epoch can give (ShardLoader's); eval: what this rank reads
        self._cap = p.num_samples if self.train else None
        if self._split_samples and not self.train:
            self.num_samples = len(range(self.rank, sum(self._lengths), ws))
        else:
            self.num_samples = p.num_samples
        self._index: dict[int, dict] = {}
        self._bad: set[tuple[int, str]] = set()  # (shard, key) of images DALI could not decode, found earlier
        self._warned = 0
        self._why: dict[tuple[int, str], str] = {}  # (shard, key) -> why a sample is skipped (ShardLoader's text)

    # -- epoch control (ShardLoader's)
    def set_epoch(self, epoch: int) -> None:
        """Select the order and augmentation draws of ``epoch`` (order: train only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._len

    def shards_for_epoch(self, epoch: Optional[int] = None) -> list[str]:
        return self._plan.shards_for_epoch(self.epoch if epoch is None else epoch)

    # -- order
    def _shard_index(self, i: int) -> dict:
        if i not in self._index:
            # decode_check: images PIL cannot decode never reach DALI (its decoders can crash the process on
            # some of them); checked once per shard file and cached with the index
            self._index[i] = load_shard_index(self._files[i], self.index_dir, decode_check=True,
                                              threads=self.num_threads)
        return self._index[i]

    def _epoch_order(self) -> tuple[list[tuple], dict[int, tuple[int, int, Optional[str]]]]:
        """This rank's samples of this epoch in reading order, ``(shard, key, label|None, ext, offset, size,
        member)`` (label None: no image, no label or an image that does not decode, skipped when reached; the
        reason is in ``self._why``), and the shards it reads that hold fewer samples than recorded:
        ``{shard: (found, recorded, scan error)}``."""
        num_classes = int(self.info["num_classes"])
        ws, r = self.world_size, self.rank
        order: list[tuple] = []
        short: dict[int, tuple[int, int, Optional[str]]] = {}
        for path in self.shards_for_epoch():
            i = self._num[path]
            idx = self._shard_index(i)
            rows, bad = idx["samples"], idx["bad"] or {}
            if len(rows) < self._lengths[i]:
                short[i] = (len(rows), self._lengths[i], idx["error"])
            pos = range(len(rows))
            if self._split_samples:
                pos = [j for j in pos if (self._starts[i] + j) % ws == r]
            if self.train:
                pos = [pos[j] for j in np.random.default_rng([self.seed, self.epoch, r, i]).permutation(len(pos))]
            for j in pos:
                key, text, ext, off, size, member = rows[j]
                where = f"{path}: sample {key}"
                label = None
                if ext is not None and text is not None:
                    label = parse_label(text, where, num_classes)  # a bad label stops the run, as in ShardLoader
                    if str(j) in bad:
                        label = None
                        self._why[(i, key)] = f"{where}: .{ext} does not decode ({bad[str(j)]})"
                elif text is None:
                    self._why[(i, key)] = f"{where}: no .cls label"
                else:
                    self._why[(i, key)] = f"{where}: no image ({', '.join('.' + e for e in _IMAGE_EXTS)})"
                order.append((i, key, label, ext, off, size, member))
        return order, short

    def _short_message(self, i: int, sh: tuple) -> str:
        found, recorded, error = sh
        return (f"{self._files[i]} holds {found} of {recorded} samples recorded in {INFO_NAME}"
                + (f" (read error: {error})" if error else "")
                + "; the shard is truncated or damaged: re-copy it or re-run tools/make_shards.py "
                  f"(`tools/make_shards.py verify {self.root}` checks every shard)")

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
                                        ext=[";".join(_IMAGE_EXTS)], missing_component_behavior="error",
                                        pad_last_batch=True)  # a short last batch repeats, not wraps
            src = fn.get_property(enc, key="source_info")
            img = _augment_graph(enc, aug=self.aug, augment=self.augment, img_size=self.img_size,
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
        lost_here = short if not (self._split_samples and self.rank != 0) else {}
        if short and not (self.train or self.allow_partial):
            i, sh = next(iter(sorted(short.items())))
            raise DataError(self._short_message(i, sh) + "; set data.eval_partial=true to evaluate the readable part")
        workdir = tempfile.mkdtemp(prefix="bigltr_dali_")
        emitted = taken = 0
        reached = 0  # order positions consumed (for the skip count)
        last = None
        good = [s for s in order if s[2] is not None and (s[0], s[1]) not in self._bad]
        gpos = {id(s): k for k, s in enumerate(order)}  # order position of each good sample
        try:
            start = 0  # next good sample to read
            while emitted < target and start < len(good) and (cap is None or taken < cap):
                seed = _sub_seed(self.seed, self.epoch, self.rank, start)
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
            if self.world_size > 1 and emitted < target:
                if last is None:
                    raise DataError(f"rank {self.rank}: split '{self.split}' yielded no usable sample this epoch "
                                    f"(all corrupt?); cannot keep {self.world_size} ranks in step")
                _log.warning("rank %d: padding %d batch(es) to stay in step with other ranks", self.rank,
                             target - emitted)
                while emitted < target:
                    self.padded_batches += 1
                    yield last
                    emitted += 1
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            skips = [s for s in order[:reached] if s[2] is None]
            for n, s in enumerate(skips[:6]):  # DALI-found ones were logged when found
                if n == 5:
                    _log.warning("rank %d: more bad samples; further messages suppressed", self.rank)
                else:
                    _log.warning("rank %d: skipping a bad sample: %s", self.rank, self._why.get((s[0], s[1]), s[1]))
            skipped = len(skips) + sum(1 for s in order[:reached] if s[2] is not None and (s[0], s[1]) in self._bad)
            self.epoch_skipped = skipped
            self.skipped += skipped
            self.epoch_lost = sum(rec - found for found, rec, _ in lost_here.values())
            self.lost += self.epoch_lost
            self.lost_shards = sorted(os.path.basename(self._files[i]) for i in lost_here)
            for i, sh in sorted(lost_here.items()):
                _log.warning("rank %d, split '%s', epoch %d: %s; %d sample(s) missing from this epoch", self.rank,
                             self.split, self.epoch, self._short_message(i, sh), sh[1] - sh[0])
