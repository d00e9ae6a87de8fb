"""The one conversion path of every dataset converter (``bigltr-make-shards`` / ``tools/make_shards.py``).

A source reader (``bigltr.data.sources``) lists, per split, :class:`Item` records ``(key, src, label, origin)`` in
the order they are to be written (``src`` is an image file path or a uint8 array; ``origin`` says where the record
came from, e.g. ``"ImageNet_LT_train.txt line 17"``, for messages and the report); :func:`convert` then

* checks that every listed image file exists (a missing file is an error naming its origin);
* reads, verifies (full decode) and optionally resizes / re-encodes the images over ``workers`` processes,
  in chunks, with results consumed in input order, so the output does not depend on ``workers``;
* skips an image that exists but does not decode, records it in ``OUT/conversion_report.json`` and fails
  (:class:`SkipLimitExceeded`) once more than ``max_skip_fraction`` of a split's images were skipped, or
  (:class:`EmptiedClassError`) once every listed training image of a class was skipped;
* with a :class:`bigltr.data.longtail.Holdout` (a validation split to be held out of train), decodes every
  listed training image FIRST (kept in an anonymous spool file in OUT), draws the hold-out from the decodable
  ones only, then writes train and val from the spool (each image is still decoded once);
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
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from bigltr.atomic import write_json_atomic

from .writer import AUTO, REPORT_NAME, EncodedImage, encode_image, prepare_output_dir, write_dataset

__all__ = ["Item", "EncodeOptions", "load_image", "SkipLimitExceeded", "EmptiedClassError", "ConversionReport",
           "ordered_map", "convert", "IMG_EXTENSIONS"]

# File name endings of the source files an ImageFolder conversion picks up (torchvision's ImageFolder list, compared
# case-insensitively). A different list from plan.IMAGE_KEYS, the members a shard holds its image under: load_image
# stores a JPEG, PNG or WebP source as it is (_KEEP_FORMATS) and re-encodes any other format.
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


class EmptiedClassError(ValueError):
    """Every listed training image of a class could not be decoded: the class would have no training image."""


class ConversionReport:
    """Per-split counts and the skipped images; saved as ``OUT/conversion_report.json``.

    ``describe(c)``: how messages name class c (e.g. ``"'Aves sp.', category_id 4521"``).
    """

    def __init__(self, max_skip_fraction: float, extra: Optional[dict] = None,
                 describe: Optional[Callable[[int], str]] = None):
        self.max_skip_fraction = float(max_skip_fraction)
        self.splits: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.extra = dict(extra or {})  # further top-level keys (after the standard ones)
        self.describe = describe or (lambda c: "")
        self._class_left: dict[str, dict[int, int]] = {}  # split -> class -> listed images not yet skipped

    def start(self, split: str, listed: int, labels: Optional[Sequence[int]] = None) -> None:
        """``labels`` (the training split's): a class all of whose listed images are skipped is an error."""
        self.splits[split] = {"listed": int(listed), "written": 0, "skipped": 0}
        if labels is not None:
            left: dict[int, int] = {}
            for lab in labels:
                left[int(lab)] = left.get(int(lab), 0) + 1
            self._class_left[split] = left

    def allowed(self, split: str) -> int:
        return int(math.floor(self.max_skip_fraction * self.splits[split]["listed"] + 1e-9))

    def skip(self, split: str, item: Item, error: str) -> None:
        self.splits[split]["skipped"] += 1
        where = os.fspath(item.src) if isinstance(item.src, (str, os.PathLike)) else None
        self.skipped.append({"split": split, "key": item.key, "file": where, "origin": item.origin,
                             "label": int(item.label), "error": error})
        s = self.splits[split]
        left = self._class_left.get(split)
        if left is not None:
            c = int(item.label)
            left[c] -= 1
            if left[c] == 0:
                n = sum(1 for r in self.skipped if r["split"] == split and r["label"] == c)
                name = self.describe(c)
                raise EmptiedClassError(
                    f"class {c}{f' ({name})' if name else ''}: all {n} of its listed training image(s) could not "
                    f"be decoded (last: {item.origin}: {error}); the class would have no training image. Replace "
                    f"or remove the files (listed in {REPORT_NAME}) or remove the class from the source")
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
    report.start(split, len(items), [it.label for it in items] if split == "train" else None)
    results = ordered_map(_ChunkFn(opts), (it.src for it in items), chunksize=chunksize, executor=executor)
    for item, (enc, err) in zip(items, results):
        if err is not None:
            report.skip(split, item, err)  # raises once over the limit
            continue
        report.splits[split]["written"] += 1
        yield item.key, enc, item.label


def _decode_pool(items: Sequence[Item], opts: EncodeOptions, executor, report: ConversionReport, chunksize: int,
                 spool, progress: bool) -> list[tuple[Item, int, int, str]]:
    """Decode every listed training image once, in order; append the stored bytes of each decodable one to
    ``spool`` and return ``(item, offset, length, ext)`` per decodable image (skips go to ``report``)."""
    report.start("train", len(items), [it.label for it in items])
    results = ordered_map(_ChunkFn(opts), (it.src for it in items), chunksize=chunksize, executor=executor)
    pairs = zip(items, results)
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, total=len(items), desc="train: decode", unit="img", mininterval=1.0)
    pool = []
    for item, (enc, err) in pairs:
        if err is not None:
            report.skip("train", item, err)  # raises over the limit, or when a class has no image left
            continue
        pool.append((item, spool.tell(), len(enc.data), enc.ext))
        spool.write(enc.data)
    spool.flush()
    return pool


def _spooled(split: str, pool: list, positions, spool, report: ConversionReport
             ) -> Iterator[tuple[str, EncodedImage, int]]:
    """The spooled images at ``positions`` (in that order), counted as written to ``split``."""
    for p in positions:
        item, offset, length, ext = pool[int(p)]
        spool.seek(offset)
        data = spool.read(length)
        report.splits[split]["written"] += 1
        yield item.key, EncodedImage(data, ext), item.label


def _hold_out(holdout, pool: list, num_classes: int, report: ConversionReport) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train / val positions into ``pool`` by the hold-out, and its summary (recorded in _info.json and the
    report)."""
    labels = np.array([it.label for it, *_ in pool], dtype=np.int64)
    tr, va = holdout.apply(labels)
    have = np.bincount(labels, minlength=num_classes)
    took = np.bincount(labels[va], minlength=num_classes)
    summary = {**holdout.policy.as_dict(), "seed": int(holdout.seed), "images": int(va.size),
               "classes": int((took > 0).sum()), "num_classes": int(num_classes),
               "decodable_train_images": int(labels.size),
               "classes_under_min_count": int((have < int(holdout.policy.min_count)).sum()),
               "max_fraction_taken": round(float((took / np.maximum(have, 1)).max()), 4) if labels.size else 0.0}
    report.splits["train"]["held_out"] = int(va.size)
    if not va.size:
        from .longtail import warn

        warn(f"the validation hold-out drew no image (every class has fewer than {holdout.policy.min_count} "
             f"decodable training images, or too few for --val-max-fraction {holdout.policy.max_fraction:g}): "
             f"no val split; bigltr's trainer needs train, val and test")
    if va.size:
        report.start("val", int(va.size))
        report.splits["val"]["held_out_of"] = "train"
    return tr, va, summary


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
    holdout=None,
) -> dict:
    """Write ``splits`` (split -> items in write order) as shards + report + ``_info.json``; return the info.

    ``record_encode``: add the encode options, ``max_skip_fraction`` and the per-split ``skipped`` counts to
    ``source`` (the idx converter's ``_info.json`` predates them and keeps its layout: False).
    ``expected_class_counts``: the training split's class counts the source's rules promise (a long-tail
    profile); written counts that differ are a RuntimeError (a cheap self-check of the whole chain).
    ``report_extra``: top-level keys added to ``conversion_report.json`` (idx: the class order used).
    ``holdout``: a :class:`bigltr.data.longtail.Holdout` to draw the val split out of ``splits["train"]`` (listed
    whole, in source order) once the undecodable files are known; it records ``source.holdout`` (and the report's
    ``holdout``): the policy, images and classes held out.

    With ``record_encode``, ``_info.json`` also gets ``official_train_counts`` (per class, the listed training
    images: the official training set before any hold-out or skipped file; the Many/Medium/Few groups use them,
    :func:`bigltr.metrics.group_counts`) and ``official_train_splits`` (the splits whose union is that set, less
    the skipped files: ``["train", "val"]`` when val was held out of train, else ``["train"]``).
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
    category_ids = (extra or {}).get("category_ids")

    def describe(c: int) -> str:
        name = f"'{classes[c]}'"
        return f"{name}, category_id {category_ids[c]}" if category_ids is not None else name

    report = ConversionReport(max_skip_fraction, extra=report_extra, describe=describe)
    official = None
    if record_encode and "train" in splits:
        official = np.bincount(np.array([int(it.label) for it in splits["train"]], dtype=np.int64),
                               minlength=num_classes).tolist()
    if record_encode:
        source = {**source, "encode": asdict(opts), "max_skip_fraction": float(max_skip_fraction)}
    if chunksize is None:
        any_files = any(isinstance(it.src, (str, os.PathLike)) for items in splits.values() for it in items[:1])
        chunksize = 16 if any_files else 256
    out_dir = os.fspath(out_dir)

    held: dict = {}

    def before_info(info: dict) -> None:
        if record_encode:
            info["source"]["skipped"] = {s: r["skipped"] for s, r in report.splits.items()}
            if "summary" in held:
                info["source"]["holdout"] = held["summary"]
        if official is not None:
            info["official_train_counts"] = official
            info["official_train_splits"] = ["train", "val"] if held.get("val") else ["train"]
        report.write(out_dir, "ok")

    executor = spool = None
    try:
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
        todo = {s: (_samples(s, items, opts, executor, report, chunksize), len(items)) for s, items in splits.items()}
        prepare = holdout is None or "train" not in splits
        if not prepare:
            prepare_output_dir(out_dir, overwrite=overwrite)  # refuse a non-empty --out before decoding anything
            # anonymous (unlinked) file: nothing is left behind, whatever stops the conversion
            spool = tempfile.TemporaryFile(dir=out_dir, prefix=".holdout-spool-")
            pool = _decode_pool(splits["train"], opts, executor, report, chunksize, spool, progress)
            tr, va, held["summary"] = _hold_out(holdout, pool, num_classes, report)
            report.extra["holdout"] = held["summary"]
            held["val"] = bool(va.size)
            rest = {s: v for s, v in todo.items() if s not in ("train", "val")}
            todo = {"train": (_spooled("train", pool, tr, spool, report), int(tr.size))}
            if va.size:
                todo["val"] = (_spooled("val", pool, va, spool, report), int(va.size))
            todo.update(rest)
        info = write_dataset(
            out_dir, name=name, classes=classes, source=source, splits=todo,
            maxcount=maxcount, maxsize=maxsize, image_format="png", overwrite=overwrite, progress=progress,
            extra=extra, before_info=before_info, prepare=prepare,
        )
    except (SkipLimitExceeded, EmptiedClassError) as e:
        report.write(out_dir, "failed", str(e))
        raise
    finally:
        if spool is not None:
            spool.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    if expected_class_counts is not None and info["class_counts"] != list(expected_class_counts):
        raise RuntimeError(f"written class counts {info['class_counts']} differ from the profile "
                           f"{list(expected_class_counts)}")
    return info
