"""The one conversion path of every dataset converter (``bigltr-make-shards`` / ``tools/make_shards.py``).

A source reader (``bigltr.data.sources``) lists, per split, :class:`Item` records ``(key, src, label, origin)`` in
the order they are to be written (``src`` is an image file path or a uint8 array; ``origin`` says where the record
came from, e.g. ``"ImageNet_LT_train.txt line 17"``, for messages and the report); :func:`convert` then

* checks that every listed image file exists (a missing file is an error naming its origin);
* reads, verifies (full decode) and optionally resizes / re-encodes the images over ``workers`` processes,
  in chunks, with results consumed in input order, so the output does not depend on ``workers``;
* skips an image that exists but does not decode, records it in ``OUT/conversion_report.json`` and fails
  (:class:`SkipLimitExceeded`) once more than ``max_skip_fraction`` of a split's images were skipped;
* writes the shards with :func:`bigltr.data.writer.write_dataset` (temporary names renamed when complete,
  ``_info.json`` last), after writing the report.

Images are stored as their original bytes when possible (``image_format="keep"``, no resize, no JPEG
quality given: JPEG/PNG/WebP files are copied after a successful decode), else re-encoded deterministically.
"""
from __future__ import annotations

import io
import math
import os
import re
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from bigltr.atomic import write_json_atomic

from .writer import AUTO, REPORT_NAME, EncodedImage, encode_image, write_dataset

__all__ = ["Item", "EncodeOptions", "load_image", "SkipLimitExceeded", "ConversionReport", "ordered_map",
           "convert", "IMG_EXTENSIONS"]

# torchvision's ImageFolder extensions (compared case-insensitively)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL format -> stored extension. MPO: multi-picture JPEG from cameras/phones; a valid JPEG (first frame).
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_JPEG_FORMATS = ("JPEG", "MPO")
DEFAULT_JPEG_QUALITY = 95


class Item(NamedTuple):
    """One sample to convert: ``src`` is an image file path (str) or a uint8 HxW[xC] array / PIL image."""

    key: str
    src: Any
    label: int
    origin: str


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored.

    image_format: ``"keep"`` (original JPEG/PNG/WebP bytes when nothing forces a re-encode; arrays and other
    file formats become PNG; a re-encoded JPEG stays JPEG), ``"png"`` or ``"jpg"`` (always re-encode).
    resize: shorter side to this many pixels, keeping the aspect ratio (only shrinks: smaller images are kept).
    jpeg_quality: JPEG quality of re-encoded JPEGs (default 95); giving it forces JPEGs to be re-encoded.
    """

    image_format: str = "keep"
    resize: Optional[int] = None
    jpeg_quality: Optional[int] = None

    def __post_init__(self):
        if self.image_format not in ("keep", "png", "jpg"):
            raise ValueError(f"image format must be keep, png or jpg, got {self.image_format!r}")
        if self.resize is not None and int(self.resize) < 1:
            raise ValueError(f"--resize must be >= 1 pixel, got {self.resize}")
        if self.jpeg_quality is not None and not 1 <= int(self.jpeg_quality) <= 100:
            raise ValueError(f"--jpeg-quality must lie in [1, 100], got {self.jpeg_quality}")

    @property
    def reencode(self) -> bool:
        return self.image_format != "keep" or self.resize is not None or self.jpeg_quality is not None


# ----------------------------------------------------------------------------------------- one image
def _shrink_size(w: int, h: int, s: int) -> Optional[tuple[int, int]]:
    """Target size with the shorter side ``s`` (None if the image is not larger than that)."""
    short = min(w, h)
    if short <= s:
        return None
    if w <= h:
        return s, max(1, round(h * s / w))
    return max(1, round(w * s / h)), s


def load_image(src: Any, opts: EncodeOptions) -> EncodedImage:
    """Read (file path) or take (array / PIL image) one image, decode it fully and return what to store.

    Raises an exception (OSError, ValueError, ...) when the image cannot be decoded.
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        if not opts.reencode and fmt in _KEEP_FORMATS:
            img.load()  # full decode: a truncated or corrupt file raises here
            return EncodedImage(data, _KEEP_FORMATS[fmt])
        target = _shrink_size(*img.size, int(opts.resize)) if opts.resize else None
        if target is not None and fmt in _JPEG_FORMATS:
            img.draft(img.mode, target)  # DCT-domain downscale to >= target: much faster for big JPEGs
        img.load()
    else:
        img = src if isinstance(src, Image.Image) else Image.fromarray(np.ascontiguousarray(src))
        fmt = None
        target = _shrink_size(*img.size, int(opts.resize)) if opts.resize else None
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode not in ("L", "RGB", "RGBA", "LA"):
        img = img.convert("RGBA" if ("A" in img.getbands() or "transparency" in img.info) else "RGB")
    if target is not None:
        target = _shrink_size(*img.size, int(opts.resize)) or img.size  # after draft
        img = img.resize(target, Image.Resampling.BICUBIC)
    if opts.image_format == "keep":
        ext = "jpg" if fmt in _JPEG_FORMATS else "png"
    else:
        ext = opts.image_format
    quality = int(opts.jpeg_quality) if opts.jpeg_quality is not None else DEFAULT_JPEG_QUALITY
    return EncodedImage(encode_image(img, ext, jpeg_quality=quality), ext)


_BYTESIO_RE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _load_chunk(srcs: Sequence[Any], opts: EncodeOptions) -> list[tuple[Optional[EncodedImage], Optional[str]]]:
    """Worker task: ``(encoded, None)`` or ``(None, "ErrorType: message")`` per source, in order."""
    out = []
    for src in srcs:
        try:
            out.append((load_image(src, opts), None))
        except Exception as e:  # noqa: BLE001 - any decode failure is a skip, reported with its message
            msg = _BYTESIO_RE.sub(repr(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else "<image>", str(e))
            out.append((None, f"{type(e).__name__}: {msg}"))
    return out


# ----------------------------------------------------------------------------------------- parallel map
def _mp_context():
    import multiprocessing as mp

    # forkserver: workers do not inherit the parent's threads/locks (torch, tqdm) as fork would; spawn elsewhere
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def ordered_map(fn: Callable[[list], list], items: Iterable[Any], *, chunksize: int, executor=None,
                window: int = 4) -> Iterator[Any]:
    """``fn`` applied to consecutive chunks of ``items``; results flattened in input order.

    With an ``executor`` (a ProcessPoolExecutor) at most ``window`` chunks per worker are in flight, so
    memory stays bounded however long ``items`` is. Without one, chunks run in this process.
    """
    it = iter(items)

    def chunks():
        while True:
            chunk = [x for _, x in zip(range(chunksize), it)]
            if not chunk:
                return
            yield chunk

    if executor is None:
        for chunk in chunks():
            yield from fn(chunk)
        return
    limit = max(1, window * getattr(executor, "_max_workers", 1))
    pending: deque = deque()
    try:
        for chunk in chunks():
            pending.append(executor.submit(fn, chunk))
            if len(pending) >= limit:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


class _ChunkFn:
    """Picklable ``chunk -> _load_chunk(chunk, opts)``."""

    def __init__(self, opts: EncodeOptions):
        self.opts = opts

    def __call__(self, chunk):
        return _load_chunk(chunk, self.opts)


# ----------------------------------------------------------------------------------------- report
class SkipLimitExceeded(ValueError):
    """More than ``max_skip_fraction`` of a split's images could not be decoded."""


class ConversionReport:
    """Per-split counts and the skipped images; saved as ``OUT/conversion_report.json``."""

    def __init__(self, max_skip_fraction: float, extra: Optional[dict] = None):
        self.max_skip_fraction = float(max_skip_fraction)
        self.splits: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.extra = dict(extra or {})  # further top-level keys (after the standard ones)

    def start(self, split: str, listed: int) -> None:
        self.splits[split] = {"listed": int(listed), "written": 0, "skipped": 0}

    def allowed(self, split: str) -> int:
        return int(math.floor(self.max_skip_fraction * self.splits[split]["listed"] + 1e-9))

    def skip(self, split: str, item: Item, error: str) -> None:
        self.splits[split]["skipped"] += 1
        where = os.fspath(item.src) if isinstance(item.src, (str, os.PathLike)) else None
        self.skipped.append({"split": split, "key": item.key, "file": where, "origin": item.origin,
                             "label": int(item.label), "error": error})
        s = self.splits[split]
        if s["skipped"] > self.allowed(split):
            raise SkipLimitExceeded(
                f"split '{split}': {s['skipped']} of {s['listed']} images could not be decoded (last: "
                f"{item.origin}: {error}), more than --max-skip-fraction {self.max_skip_fraction:g} allows "
                f"({self.allowed(split)}); stopped. The skipped files are listed in {REPORT_NAME}"
            )

    def as_dict(self, status: str, message: str = "") -> dict:
        return {"status": status, "message": message, "max_skip_fraction": self.max_skip_fraction,
                "splits": self.splits, "skipped": self.skipped, **self.extra}

    def write(self, out_dir: str, status: str, message: str = "") -> str:
        path = os.path.join(out_dir, REPORT_NAME)
        write_json_atomic(path, self.as_dict(status, message))
        return path


# ----------------------------------------------------------------------------------------- conversion
def _check_files(items: Sequence[Item], split: str, progress: bool) -> None:
    paths = sum(1 for it in items if isinstance(it.src, (str, os.PathLike)))
    if progress and paths >= 10000:  # large lists on a network file system: show that something happens
        from tqdm import tqdm

        items = tqdm(items, desc=f"{split}: check files", unit="file", mininterval=1.0)
    for it in items:
        if isinstance(it.src, (str, os.PathLike)) and not os.path.isfile(it.src):
            raise FileNotFoundError(f"{it.origin}: image file {os.fspath(it.src)} does not exist")


def _samples(split: str, items: Sequence[Item], opts: EncodeOptions, executor, report: ConversionReport,
             chunksize: int) -> Iterator[tuple[str, EncodedImage, int]]:
    report.start(split, len(items))
    results = ordered_map(_ChunkFn(opts), (it.src for it in items), chunksize=chunksize, executor=executor)
    for item, (enc, err) in zip(items, results):
        if err is not None:
            report.skip(split, item, err)  # raises once over the limit
            continue
        report.splits[split]["written"] += 1
        yield item.key, enc, item.label


def convert(
    out_dir: str | os.PathLike,
    *,
    name: str,
    classes: list[str],
    splits: dict[str, Sequence[Item]],
    source: dict,
    opts: EncodeOptions = EncodeOptions(),
    workers: int = 1,
    max_skip_fraction: float = 0.01,
    maxcount: int | str = AUTO,  # "auto": balanced shards of 500-1,000 samples (writer.auto_shard_lengths)
    maxsize: Optional[float] = None,
    overwrite: bool = False,
    progress: bool = True,
    extra: Optional[dict] = None,
    chunksize: Optional[int] = None,
    record_encode: bool = True,
    expected_class_counts: Optional[list[int]] = None,
    report_extra: Optional[dict] = None,
) -> dict:
    """Write ``splits`` (split -> items in write order) as shards + report + ``_info.json``; return the info.

    ``record_encode``: add the encode options, ``max_skip_fraction`` and the per-split ``skipped`` counts to
    ``source`` (the idx converter's ``_info.json`` predates them and keeps its layout: False).
    ``expected_class_counts``: the training split's class counts the source's rules promise (a long-tail
    profile); written counts that differ are a RuntimeError (a cheap self-check of the whole chain).
    ``report_extra``: top-level keys added to ``conversion_report.json`` (idx: the class order used).
    """
    if not 0.0 <= float(max_skip_fraction) <= 1.0:
        raise ValueError(f"--max-skip-fraction must lie in [0, 1], got {max_skip_fraction}")
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    num_classes = len(classes)
    for split, items in splits.items():
        for it in items:
            if not 0 <= int(it.label) < num_classes:  # the readers check first, with better messages
                raise ValueError(f"{it.origin}: label {it.label} outside [0, {num_classes})")
        _check_files(items, split, progress)
    report = ConversionReport(max_skip_fraction, extra=report_extra)
    if record_encode:
        source = {**source, "encode": asdict(opts), "max_skip_fraction": float(max_skip_fraction)}
    if chunksize is None:
        any_files = any(isinstance(it.src, (str, os.PathLike)) for items in splits.values() for it in items[:1])
        chunksize = 16 if any_files else 256
    out_dir = os.fspath(out_dir)

    def before_info(info: dict) -> None:
        if record_encode:
            info["source"]["skipped"] = {s: r["skipped"] for s, r in report.splits.items()}
        report.write(out_dir, "ok")

    executor = None
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        executor = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    try:
        info = write_dataset(
            out_dir, name=name, classes=classes, source=source,
            splits={s: (_samples(s, items, opts, executor, report, chunksize), len(items))
                    for s, items in splits.items()},
            maxcount=maxcount, maxsize=maxsize, image_format="png", overwrite=overwrite, progress=progress,
            extra=extra, before_info=before_info,
        )
    except SkipLimitExceeded as e:
        report.write(out_dir, "failed", str(e))
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    if expected_class_counts is not None and info["class_counts"] != list(expected_class_counts):
        raise RuntimeError(f"written class counts {info['class_counts']} differ from the profile "
                           f"{list(expected_class_counts)}")
    return info
