"""The image files of ``bigltr-rehearsal`` (:mod:`bigltr.data.rehearsal`): the learnable stripe patterns
(:class:`Painter`), JPEG / PNG encoding, the odd files (:data:`ODD_PLAN`: grayscale, CMYK, PNG named ``.jpg``, other
size, truncated) and the drawing, encoding and writing of every image over worker processes (:func:`_paint_all`;
the files do not depend on the number of workers).
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------------------------- images
class Painter:
    """Class c: stripes between two colours of its own, at its own orientation and frequency; per image a random
    phase, brightness shift and Gaussian noise."""

    def __init__(self, num_classes: int, size: int, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.size = size
        self.c1 = rng.uniform(0, 255, (num_classes, 3)).astype(np.float32)
        self.c2 = rng.uniform(0, 255, (num_classes, 3)).astype(np.float32)
        theta = rng.integers(0, 4, num_classes) * (np.pi / 4)
        freq = rng.integers(1, 3, num_classes).astype(np.float32)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.cos, self.sin, self.freq = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32), freq
        self.xx, self.yy = xx, yy

    def draw(self, units: list, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Images of several (class, count, generator) units at once: uint8 [sum of counts, H, W, 3]. Each unit's
        generator draws its phases, brightness shifts and noise in that order, so a unit's images do not depend on
        the other units drawn with it."""
        H, W = (self.size, self.size) if size is None else size
        if size is None:
            xx, yy = self.xx, self.yy
        else:
            yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        cls = np.repeat(np.asarray([u[0] for u in units], dtype=np.int64), [u[1] for u in units])
        phase, bright, noise = [], [], []
        for _, n, rng in units:
            phase.append(rng.uniform(0, 2 * np.pi, n))
            bright.append(rng.normal(0, 6, n))
            noise.append(rng.normal(0, 12, (n, H, W, 3)).astype(np.float32))
        phase = np.concatenate(phase).astype(np.float32)[:, None, None]
        bright = np.concatenate(bright).astype(np.float32)[:, None, None, None]
        k = (2 * np.pi / self.size) * self.freq[cls]
        proj = (xx[None] * (self.cos[cls] * k)[:, None, None] + yy[None] * (self.sin[cls] * k)[:, None, None])
        stripe = 0.5 + 0.5 * np.cos(proj + phase)
        c1 = self.c1[cls][:, None, None, :]
        img = c1 + (self.c2[cls][:, None, None, :] - c1) * stripe[..., None]
        img += bright
        img += np.concatenate(noise)
        return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int = 90, mode: str = "RGB") -> bytes:
    h, w = arr.shape[:2]
    img = Image.frombuffer("RGB", (w, h), arr.tobytes(), "raw", "RGB", 0, 1)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _truncate_jpeg(data: bytes) -> bytes:
    """Cut inside the entropy-coded scan (headers intact), as an interrupted download leaves it."""
    sos = data.find(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    return data[:scan + max(1, (len(data) - scan) // 3)]


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_files(batch: list) -> None:
    for path, data in batch:
        _write_file(path, data)


WRITE_THREADS = 2
_PAINTER: dict = {}


def _paint_units(task) -> tuple[int, int]:
    """Draw, encode and write the images of some (class, split) units; returns (files, bytes). Each unit's images
    come from its own seeded generator, so the files do not depend on how the units are spread over workers.

    ``task``: ``(num_classes, img_size, seed, jpeg_quality, [(class, split id, [(path, odd kind or ""), ...]), ...])``
    """
    C, size, seed, quality, units = task
    key = (C, size, seed)
    if key not in _PAINTER:
        _PAINTER.clear()
        _PAINTER[key] = Painter(C, size, seed)
    painter = _PAINTER[key]
    files = nbytes = 0
    made: set = set()
    batch: list = []
    pending: list = []
    # file creation waits on the file system (journal, metadata): a few threads overlap it with the encoding
    pool = ThreadPoolExecutor(max_workers=WRITE_THREADS)
    arr = painter.draw([(c, len(paths), np.random.default_rng([seed, 2, c, sid])) for c, sid, paths in units])
    j = 0
    for c, sid, paths in units:
        for i, (path, kind) in enumerate(paths):
            folder = os.path.dirname(path)
            if folder not in made:
                os.makedirs(folder, exist_ok=True)
                made.add(folder)
            if kind:
                data = _odd_bytes(kind, painter, c, np.random.default_rng([seed, 3, c, sid, i]), quality)
            else:
                data = _jpeg(arr[j + i], quality)
            batch.append((path, data))
            if len(batch) >= 256:
                pending.append(pool.submit(_write_files, batch))
                batch = []
                while len(pending) > 2 * WRITE_THREADS:
                    pending.pop(0).result()
            files += 1
            nbytes += len(data)
        j += len(paths)
    pending.append(pool.submit(_write_files, batch))
    for f in pending:
        f.result()
    pool.shutdown()
    return files, nbytes


def _paint_all(units: list, out: str, C: int, size: int, seed: int, quality: int, workers: int) -> tuple[int, int]:
    """All images, over ``workers`` processes (in this process when 1)."""
    total = sum(len(u[2]) for u in units)
    per_chunk = max(64, min(4096, 2**21 // (size * size * 3), total // max(1, 8 * workers) + 1))
    chunks, cur, n = [], [], 0
    for c, sid, paths in units:
        cur.append((c, sid, [(os.path.join(out, p), k) for p, k in paths]))
        n += len(paths)
        if n >= per_chunk:
            chunks.append(cur)
            cur, n = [], 0
    if cur:
        chunks.append(cur)
    tasks = [(C, size, seed, quality, ch) for ch in chunks]
    if workers <= 1:
        results = [_paint_units(t) for t in tasks]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            results = list(ex.map(_paint_units, tasks))
    return sum(r[0] for r in results), sum(r[1] for r in results)



# ----------------------------------------------------------------------------------------------- odd files
ODD_PLAN = (  # kind, what the converter does with it (--format keep, the default)
    ("grayscale_jpeg", "converted: stored as the original 1-channel JPEG; the trainer reads it as RGB"),
    ("grayscale_jpeg", "converted: stored as the original 1-channel JPEG; the trainer reads it as RGB"),
    ("cmyk_jpeg", "converted: stored as the original CMYK JPEG (re-encoded as RGB with --resize / --format jpg); "
                  "the trainer reads it as RGB"),
    ("cmyk_jpeg", "converted: stored as the original CMYK JPEG (re-encoded as RGB with --resize / --format jpg); "
                  "the trainer reads it as RGB"),
    ("png_named_jpg", "converted: the format is read from the bytes, stored as .png in the shard"),
    ("png_named_jpg", "converted: the format is read from the bytes, stored as .png in the shard"),
    ("other_size", "converted: stored as it is; the trainer resizes it to data.img_size"),
    ("truncated_jpeg", "skipped: counted in conversion_report.json (splits.<split>.skipped, skipped[])"),
)


def odd_size(S: int) -> tuple[int, int]:
    """(width, height) of the odd file of another size."""
    return S + S // 2, 2 * S


def _odd_bytes(kind: str, painter: Painter, c: int, rng: np.random.Generator, quality: int) -> bytes:
    S = painter.size
    if kind == "other_size":
        w, h = odd_size(S)
        return _jpeg(painter.draw([(c, 1, rng)], size=(h, w))[0], quality)
    arr = painter.draw([(c, 1, rng)])[0]
    if kind == "grayscale_jpeg":
        return _jpeg(arr, quality, "L")
    if kind == "cmyk_jpeg":
        return _jpeg(arr, quality, "CMYK")
    if kind == "png_named_jpg":
        return _png(arr)
    if kind == "truncated_jpeg":
        return _truncate_jpeg(_jpeg(arr, quality))
    raise ValueError(kind)
