"""Write one split of a dataset as WebDataset tar shards (for every converter, through bigltr.data.convert).

Each sample becomes ``<key>.png`` (or ``.jpg``) and ``<key>.cls`` (the label as ASCII digits) in a POSIX tar
file ``{split}-{i:06d}.tar``. Shards are written under a hidden temporary name in the same folder and
renamed to their final name only once complete, so an interrupted conversion never leaves a partial shard
under a final name. Tar headers use a fixed mtime/owner, so the same input gives byte-identical shards.

Shard sizes (``maxcount``): an int N fills shards in order with at most N samples each, the last one holding the
rest (webdataset's ``maxcount``). The default, ``"auto"`` (:func:`auto_shard_lengths`), makes shards of 500 to
1,000 samples, balanced (they differ by at most one), whose count is a multiple of a power of two (of 64 for a
large split, of 8 when 8 shards of 500 fit, ...), so that 1, 2, 4, 8, ... ranks each read whole shards of nearly
the same total and ``ShardLoader`` drops almost nothing (see docs/data.md, "Shard size").
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from typing import Any, Callable, Iterable, NamedTuple, Optional

import numpy as np
from PIL import Image

__all__ = ["write_split", "write_dataset", "prepare_output_dir", "encode_image", "shard_name", "EncodedImage",
           "sha256_file", "REPORT_NAME", "AUTO", "auto_shard_lengths", "parse_maxcount"]

_FORMATS = {"png": "PNG", "jpg": "JPEG"}
_STORED_EXTS = ("png", "jpg", "webp")  # extensions an already-encoded image may be stored under
REPORT_NAME = "conversion_report.json"  # written by bigltr.data.convert beside the shards

AUTO = "auto"  # maxcount: balanced shards of AUTO_MIN..AUTO_TARGET samples (auto_shard_lengths)
AUTO_TARGET = 1000  # samples per shard the automatic layout aims at and never exceeds
AUTO_MULTIPLE = 64  # the shard count is a multiple of the largest power of two up to this (world sizes 1, 2, 4, ...)
AUTO_MIN = 500  # ... that keeps every shard at least this large


def auto_shard_lengths(n: int, *, target: int = AUTO_TARGET, multiple: int = AUTO_MULTIPLE,
                       min_size: int = AUTO_MIN) -> list[int]:
    """Samples per shard of the automatic layout for a split of ``n`` samples (``maxcount="auto"``).

    k = ceil(n / target) shards, rounded up to a multiple of the largest power of two m <= ``multiple`` (64) for
    which every shard still holds at least ``min_size`` samples (k <= n // min_size; a split of fewer than
    2 x min_size samples is one shard); the counts are balanced (the first n mod k shards hold one more). Every
    shard holds at most ``target``. ``ShardLoader`` on W ranks, W a power of two dividing m, then gives every rank
    k / W whole shards and drops n mod k samples per epoch at most (fewer than k).
    Examples: 12,406 -> 16 shards of 776/775; 2,000 -> 4 of 500; 10,000 -> 16 of 625; 115,846 -> 128 of 906/905.
    """
    n = int(n)
    if n <= 0:
        return []
    k = -(-n // int(target))
    m = int(multiple)
    while m > 1 and n // (-(-k // m) * m) < min_size:
        m //= 2
    k = -(-k // m) * m
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def parse_maxcount(value: Any) -> int | str:
    """``--maxcount`` / ``maxcount=``: ``"auto"`` or an int >= 1 (ValueError otherwise)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool):
        raise ValueError(f"maxcount must be 'auto' or an integer >= 1, got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"maxcount must be 'auto' or an integer >= 1, got {value!r}") from None
    if n < 1 or (not isinstance(value, str) and n != value):  # 2.5 is not a count; 1e3 is
        raise ValueError(f"maxcount must be 'auto' or an integer >= 1, got {value!r}")
    return n


class EncodedImage(NamedTuple):
    """An image already encoded (e.g. an original JPEG file's bytes): written as is, as ``<key>.<ext>``."""

    data: bytes
    ext: str  # "png", "jpg" or "webp"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_FIXED_MTIME = 0  # fixed tar timestamps: reruns give byte-identical shards


def shard_name(split: str, index: int) -> str:
    """Final file name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def _to_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr)  # uint8 2-D -> mode "L"
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(arr)
    raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4 uint8, got shape {arr.shape}")


def encode_image(image: Any, image_format: str = "png", *, jpeg_quality: int = 95) -> bytes:
    """Encode a PIL image or a uint8 HxW / HxWxC array as PNG or JPEG bytes (deterministic)."""
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    img = _to_pil(image)
    buf = io.BytesIO()
    if image_format == "jpg":
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


class _ShardSink:
    """Writes shards under temporary names; renames each to its final name when it is complete."""

    def __init__(self, out_dir: str, split: str):
        self.out_dir, self.split = out_dir, split
        self.index = 0
        self.tmp_path: Optional[str] = None
        self.stream = None
        self.writer = None  # webdataset.TarWriter
        self.count = 0
        self.size = 0
        self.hist: dict[int, int] = {}
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self.hists: list[dict[int, int]] = []
        self.checksums: list[str] = []
        self.sizes: list[int] = []  # bytes per shard file: read_info compares them (cheap truncation check)

    def open(self) -> None:
        import webdataset as wds  # imported here: webdataset imports torch (seconds), only needed to write

        final = shard_name(self.split, self.index)
        self.tmp_path = os.path.join(self.out_dir, f".{final}.tmp")
        self.stream = open(self.tmp_path, "wb")
        self.writer = wds.TarWriter(self.stream, encoder=False, mtime=_FIXED_MTIME,
                                    user="bigltr", group="bigltr", mode=0o644)
        self.count, self.size, self.hist = 0, 0, {}

    def write(self, key: str, data: bytes, ext: str, label: int) -> None:
        if self.writer is None:
            self.open()
        self.size += self.writer.write({"__key__": key, ext: data, "cls": str(label).encode("ascii")})
        self.count += 1
        self.hist[label] = self.hist.get(label, 0) + 1

    def close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()  # does not close a caller-owned stream
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        final = shard_name(self.split, self.index)
        digest = sha256_file(self.tmp_path)  # from the page cache: cheap next to encoding
        self.sizes.append(os.path.getsize(self.tmp_path))
        os.replace(self.tmp_path, os.path.join(self.out_dir, final))
        self.filenames.append(final)
        self.checksums.append(digest)
        self.lengths.append(self.count)
        self.hists.append(self.hist)
        self.writer = self.stream = self.tmp_path = None
        self.index += 1

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
                self.stream.close()
            except Exception:
                pass
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            self.writer = self.stream = self.tmp_path = None


def write_split(
    out_dir: str | os.PathLike,
    split: str,
    samples: Iterable[tuple[str, Any, int]],
    *,
    maxcount: int | str = AUTO,
    maxsize: Optional[int] = None,
    image_format: str = "png",
    num_classes: Optional[int] = None,
    total: Optional[int] = None,
    progress: bool = False,
    jpeg_quality: int = 95,
) -> dict:
    """Write ``samples`` (an iterable of ``(key, image, label)``) as tar shards ``{split}-{i:06d}.tar``.

    ``image`` is a PIL image or a uint8 HxW / HxWxC array (encoded as ``image_format``), or an
    :class:`EncodedImage` (stored as is under its own extension); ``label`` an int in [0, num_classes) when
    ``num_classes`` is given. Keys must be unique within the split and use only ``[A-Za-z0-9_-/]`` (a dot
    would split the WebDataset sample). Shard sizes: ``maxcount=N`` starts a new shard after N samples (the last
    shard holds the rest); ``maxcount="auto"`` (default) cuts the split into the balanced shards of
    :func:`auto_shard_lengths` for ``total`` samples (``len(samples)`` when ``total`` is None; without either,
    shards of ``AUTO_TARGET``); if fewer samples arrive than ``total`` (skipped images), the last shard is
    shorter. Either way a new shard also starts once the current one holds ``maxsize`` bytes of payload (the
    later cuts stay where they were planned). Shards are written in the order given (shuffle before calling if
    shards should mix classes).

    Returns the split entry for ``_info.json``: ``{"name", "num_samples", "filenames", "shard_lengths",
    "class_hist", "checksums", "sizes"}``, ``class_hist`` holding per-shard per-class counts (length
    ``num_classes``, or max label + 1 when not given), ``checksums`` the hex sha256 and ``sizes`` the byte size
    of each shard file.
    """
    if not isinstance(split, str) or not re.match(r"^[A-Za-z0-9_]+$", split):
        raise ValueError(f"split name must be alphanumeric/underscore, got {split!r}")
    maxcount = parse_maxcount(maxcount)
    cuts: set[int] = set()  # "auto": numbers of samples written after which a shard ends
    if maxcount == AUTO:
        n_planned = total if total is not None else (len(samples) if hasattr(samples, "__len__") else None)
        plan = auto_shard_lengths(n_planned) if n_planned is not None else []
        cuts = set(np.cumsum(plan[:-1]).tolist())
        maxcount = max(plan, default=AUTO_TARGET)  # also caps shards if more samples arrive than planned
    if maxsize is not None and maxsize < 1:
        raise ValueError(f"maxsize must be >= 1 byte, got {maxsize}")
    if image_format not in _FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_FORMATS)}, got {image_format!r}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    import webdataset  # noqa: F401  (slow first import, here rather than inside the first progress-bar tick)

    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, total=total, desc=f"{split}", unit="img", mininterval=1.0)

    sink = _ShardSink(out_dir, split)
    seen: set[str] = set()
    written = 0
    try:
        for key, image, label in it:
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise ValueError(f"sample key {key!r}: keys must be non-empty and use only [A-Za-z0-9_-/]")
            if key in seen:
                raise ValueError(f"sample key {key!r} appears twice in split '{split}'")
            seen.add(key)
            label = int(label)
            if label < 0 or (num_classes is not None and label >= num_classes):
                raise ValueError(f"sample {key!r}: label {label} outside [0, {num_classes})")
            if sink.writer is not None and (
                sink.count >= maxcount or written in cuts or (maxsize is not None and sink.size >= maxsize)
            ):
                sink.close_shard()
            written += 1
            if isinstance(image, EncodedImage):
                if image.ext not in _STORED_EXTS:
                    raise ValueError(f"sample {key!r}: encoded image extension must be one of {_STORED_EXTS}, "
                                     f"got {image.ext!r}")
                sink.write(key, bytes(image.data), image.ext, label)
            else:
                sink.write(key, encode_image(image, image_format, jpeg_quality=jpeg_quality), image_format, label)
        sink.close_shard()
    except BaseException:
        sink.abort()
        raise
    finally:
        if progress and hasattr(it, "close"):
            it.close()

    n_cls = num_classes if num_classes is not None else (
        max((max(h) for h in sink.hists if h), default=-1) + 1
    )
    class_hist = [[h.get(c, 0) for c in range(n_cls)] for h in sink.hists]
    return {
        "name": split,
        "num_samples": int(sum(sink.lengths)),
        "filenames": list(sink.filenames),
        "shard_lengths": list(sink.lengths),
        "class_hist": class_hist,
        "checksums": list(sink.checksums),
        "sizes": list(sink.sizes),
    }


_OUR_FILE_RE = re.compile(
    r"^(?:[A-Za-z0-9_]+-\d{6}\.tar|\.[A-Za-z0-9_]+-\d{6}\.tar\.tmp|_info\.json|\._info\.json\..*\.tmp"
    r"|conversion_report\.json|\.conversion_report\.json\..*\.tmp)$"
)


def prepare_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Create ``out_dir`` or make an existing one ready for a fresh conversion.

    A non-empty folder is refused (FileExistsError) unless ``overwrite``; with ``overwrite`` the old
    ``_info.json`` is removed first (so the folder never looks complete half-way), then every shard file
    (``<split>-NNNNNN.tar``), old ``conversion_report.json`` and leftover temporary file. Other files are
    left alone.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"output path {out_dir} exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    entries = sorted(os.listdir(out_dir))
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"output folder {out_dir} is not empty ({len(entries)} entries: {shown}); "
            f"pass --overwrite to replace its shards, or choose another --out"
        )
    info_path = os.path.join(out_dir, "_info.json")
    if os.path.exists(info_path):
        os.unlink(info_path)
    for e in entries:
        if _OUR_FILE_RE.match(e) and os.path.isfile(os.path.join(out_dir, e)):
            os.unlink(os.path.join(out_dir, e))
    return out_dir


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    name: str,
    classes: list[str],
    splits: dict[str, tuple[Iterable[tuple[str, Any, int]], Optional[int]]],
    source: dict,
    train_split: str = "train",
    maxcount: int | str = AUTO,
    maxsize: Optional[int] = None,
    image_format: str = "png",
    overwrite: bool = False,
    progress: bool = True,
    jpeg_quality: int = 95,
    extra: Optional[dict] = None,
    before_info: Optional[Callable[[dict], None]] = None,
    prepare: bool = True,
) -> dict:
    """Convert a whole dataset: prepare ``out_dir``, write each split, then ``_info.json`` last.

    ``splits`` maps split name -> ``(samples, total)`` with samples as in :func:`write_split` (``total``
    sizes the progress bar and, with ``maxcount="auto"``, the shards). ``class_counts`` in the info is the
    per-class histogram of ``train_split``. ``extra`` adds top-level keys to the info (e.g. ``category_ids``);
    ``before_info(info)`` runs after the last shard and before ``_info.json`` is written (it may raise to
    leave the folder unfinished). Because ``_info.json`` is written last (atomically), a folder without it
    is an unfinished conversion. ``prepare=False``: the caller has already called :func:`prepare_output_dir` (and
    may hold a temporary file in ``out_dir``). Returns the info dict written.
    """
    from .info import write_info  # local import: keeps writer importable on its own

    if prepare:
        prepare_output_dir(out_dir, overwrite=overwrite)
    num_classes = len(classes)
    entries = {}
    for split, (samples, total) in splits.items():
        entries[split] = write_split(out_dir, split, samples, maxcount=maxcount, maxsize=maxsize,
                                     image_format=image_format, num_classes=num_classes, total=total,
                                     progress=progress, jpeg_quality=jpeg_quality)
    if train_split in entries:
        hist = entries[train_split]["class_hist"]
        class_counts = [int(sum(h[c] for h in hist)) for c in range(num_classes)]
    else:
        class_counts = [0] * num_classes
    info = {
        "name": name,
        "num_classes": num_classes,
        "classes": list(classes),
        "class_counts": class_counts,
        "splits": entries,
        "source": source,
    }
    for k, v in (extra or {}).items():
        if k in info:
            raise ValueError(f"write_dataset: extra key {k!r} would replace a standard _info.json key")
        info[k] = v
    if before_info is not None:
        before_info(info)
    write_info(out_dir, info)
    return info
