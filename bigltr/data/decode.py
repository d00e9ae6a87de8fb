"""One source image to what a shard stores, and the ordered parallel map that does it for a whole split.

:func:`load_image` reads (file path) or takes (array / PIL image) one image, decodes it fully (a truncated or corrupt
file raises) and returns its stored bytes (:class:`EncodeOptions`: the original JPEG/PNG/WebP bytes when nothing
forces a re-encode, else a deterministic re-encode, optionally resized). :func:`ordered_map` runs such work over
worker processes in chunks, results in input order, so the output does not depend on the number of workers. Used by
:func:`bigltr.data.convert.convert`.
"""
from __future__ import annotations

import io
import os
import re
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from .writer import EncodedImage, encode_image

__all__ = ["IMG_EXTENSIONS", "DEFAULT_JPEG_QUALITY", "EncodeOptions", "load_image", "ordered_map"]

# File name endings of the source files an ImageFolder conversion picks up (torchvision's ImageFolder list, compared
# case-insensitively). A different list from plan.IMAGE_KEYS, the members a shard holds its image under: load_image
# stores a JPEG, PNG or WebP source as it is (_KEEP_FORMATS) and re-encodes any other format.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# PIL format -> stored extension. MPO: multi-picture JPEG from cameras/phones; a valid JPEG (first frame).
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_JPEG_FORMATS = ("JPEG", "MPO")
DEFAULT_JPEG_QUALITY = 95


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

