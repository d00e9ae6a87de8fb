"""``bigltr-rehearsal``: a synthetic SOURCE tree shaped like iNaturalist 2018, ImageNet-LT or Places-LT.

A rehearsal any user can run before spending GPU hours on a new cluster: this command writes a source dataset in
the real on-disk format (iNat's COCO-style ``train2018.json`` / ``val2018.json`` and image folders, or the OLTR
``relative/path label`` text lists with train / val / test), with the real number of classes and the real
long-tailed profile (scaled by ``--scale``), real JPEG files and a handful of the odd files real data has. Then
``bigltr-make-shards``, stage 1 and stage 2 (on several ranks) run on it exactly as on the real data
(docs/cluster.md, "Dry-run a new cluster").

What is written (``--out OUT``):

* ``inat2018``: ``OUT/train2018.json``, ``OUT/val2018.json`` (COCO-style: ``images[{id, file_name, width, height,
  ...}]``, ``annotations[{id, image_id, category_id}]``, ``categories[{id, name, supercategory, ...}]``; category
  ids are NOT contiguous and the categories list is not sorted, so the converter's id -> label mapping is
  exercised), images ``OUT/train_val2018/<supercategory>/<category id>/<32 hex>.jpg`` (``file_name`` is relative to
  OUT, as in the real archive). Train counts from 1,000 down to 2 per class (437,513 in all at 8,142 classes and
  scale 1: 842 classes > 100 images, 4,076 with 20-100, 3,224 < 20 of which 2,000 have 2 or 3 images); the
  official val set (the test split by the iNat convention) has 3 images per class (24,426).
* ``imagenet_lt``: ``OUT/ImageNet_LT_{train,val,test}.txt``; train and val images under
  ``OUT/train/<wnid>/<wnid>_<n>.JPEG`` (ImageNet-LT's val comes from ImageNet's train set), test under
  ``OUT/val/<wnid>/ILSVRC2012_val_<n>.JPEG``. Train 1,280 ... 5 per class (115,846 at 1,000 classes), val 20 and
  test 50 per class.
* ``places_lt``: ``OUT/Places_LT_{train,val,test}.txt`` (lines start with ``/``, as the Places365 lists do),
  images ``OUT/data_256/<letter>/<scene>/<n>.jpg`` (train, val) and ``OUT/val_256/Places365_val_<n>.jpg`` (test).
  Train 4,980 ... 5 per class (62,500 at 365 classes), val 20 and test 100 per class.
* ``OUT/rehearsal.json``: the manifest: options, per-class train counts (in label order, i.e. sorted category id /
  list label), totals, the odd files with the conversion key they get and what the converter must do with them,
  the time taken, and the commands that convert and train on the tree.

Counts. The real profile (at the real class count) is computed first: log n piecewise linear in the class rank
through the commonly cited Many / Medium / Few sizes of the real set (classes with > 100, 20-100, < 20 images: iNat
842 / 4,076 / 3,224, ImageNet-LT 385 / 479 / 136, Places-LT 131 / 163 / 71), from n_max to n_min (iNat: its rarest
2,000 classes at 3 and 2), the head segment bent so that the total is the real one. Not the real per-class counts,
but the same extremes, total and group sizes. ``--classes C`` samples that profile at C evenly spaced ranks;
``--scale s`` keeps ``max(2, round(n * s))`` images of a class (never more than ``n`` when s <= 1); val / test
sizes per class are not scaled (``--val-per-class``, ``--test-per-class``). Counts are given to the classes in a
seeded random order (not by label).

Images (learnable): class c is a stripe pattern between two colours of its own (orientation and frequency of its
own too) plus per-image phase, brightness and Gaussian noise, so a small CNN learns above chance in one epoch.
Odd files (a handful, in the largest classes' training images, listed in the manifest): grayscale JPEGs, CMYK
JPEGs, PNG files named ``.jpg``, an image of another size (all converted / stored as they are), and one truncated
JPEG (the converter skips it and counts it in ``conversion_report.json``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ["SPECS", "real_profile", "scaled_counts", "generate", "train_overrides", "next_commands", "main",
           "MANIFEST_NAME"]

MANIFEST_NAME = "rehearsal.json"


@dataclass(frozen=True)
class Spec:
    classes: int  # real class count
    n_max: int
    n_min: int
    total: int  # real training images
    val_per_class: int  # 0: no val split in the source (the converter holds one out)
    test_per_class: int
    recipe: str
    groups: tuple  # classes with > 100, 20-100, < 20 training images (the commonly cited Many / Medium / Few sizes)
    tiny: int = 0  # rarest classes with 2 or 3 images (half each)


SPECS = {
    "inat2018": Spec(8142, 1000, 2, 437_513, 0, 3, "inat2018", (842, 4076, 3224), 2000),
    "imagenet_lt": Spec(1000, 1280, 5, 115_846, 20, 50, "imagenet_lt", (385, 479, 136)),
    "places_lt": Spec(365, 4980, 5, 62_500, 20, 100, "places_lt", (131, 163, 71)),
}
INAT_SUPER = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia", "Mollusca", "Animalia",
              "Arachnida", "Actinopterygii", "Chromista", "Protozoa", "Bacteria")
INAT_SUPER_P = (0.35, 0.13, 0.15, 0.04, 0.03, 0.04, 0.02, 0.02, 0.02, 0.02, 0.03, 0.01, 0.005, 0.145)


# ----------------------------------------------------------------------------------------------- counts
def _fix_total(counts: np.ndarray, total: int, n_max: int) -> np.ndarray:
    """Add/remove one image to/from classes of rank 1, 2, ... (never the top class, never above n_max or below the
    next rank's count) until the sum is ``total``; returns the counts sorted descending."""
    c = counts.astype(np.int64).copy()
    diff = int(total - c.sum())
    step = 1 if diff > 0 else -1
    r = 1
    guard = 0
    while diff != 0 and guard < 50 * len(c):
        guard += 1
        nxt = c[r + 1] if r + 1 < len(c) else 0
        if step > 0 and c[r] + 1 <= min(n_max, c[r - 1]):
            c[r] += 1
            diff -= 1
        elif step < 0 and c[r] - 1 >= max(nxt, 1) and c[r] > c[-1]:
            c[r] -= 1
            diff += 1
        r = r + 1 if r + 1 < len(c) else 1
    return np.sort(c)[::-1]


def _bisect(f, lo: float, hi: float, target: float, iters: int = 60) -> float:
    """x in [lo, hi] with f(x) ~ target, f increasing."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _group_profile(spec: Spec) -> np.ndarray:
    """log n piecewise linear in rank through the group boundaries (n_max -> 101 | 100 -> 20 | 19 -> n_min, the
    last ``tiny`` classes at 3 and 2), the head segment bent (log n linear in t ** p) so that the sum is the real
    total."""
    C = spec.classes
    many, med, few = spec.groups
    assert many + med + few == C
    r = np.arange(C, dtype=np.float64)

    def build(p_head: float) -> np.ndarray:
        n = np.zeros(C)

        def seg(lo, hi, a, b, p):  # log n from log a (rank lo) to log b (rank hi), along t ** p
            t = (r[lo:hi + 1] - lo) / max(1, hi - lo)
            n[lo:hi + 1] = np.exp(np.log(a) + (np.log(b) - np.log(a)) * t ** p)

        seg(0, many - 1, spec.n_max, 101, p_head)
        seg(many, many + med - 1, 100, 20, 1.0)
        tail = C - spec.tiny
        seg(many + med, tail - 1, 19, max(spec.n_min, 4 if spec.tiny else spec.n_min), 1.0)
        out = np.floor(n + 1e-9).astype(np.int64)
        out[tail:tail + spec.tiny // 2] = 3
        out[tail + spec.tiny // 2:] = 2
        return out

    p = _bisect(lambda x: build(x).sum(), 0.01, 5.0, spec.total)
    return _fix_total(build(p), spec.total, spec.n_max)


def real_profile(dataset: str) -> np.ndarray:
    """Training images per class of the real dataset, by rank (descending), summing to its real total."""
    return _group_profile(SPECS[dataset])


def scaled_counts(dataset: str, classes: Optional[int] = None, scale: float = 1.0) -> np.ndarray:
    """The real profile sampled at ``classes`` evenly spaced ranks, then ``max(2, round(n * scale))`` (capped at n
    when scale <= 1); descending."""
    prof = real_profile(dataset)
    C = len(prof) if classes is None else int(classes)
    if C < 2:
        raise ValueError(f"--classes must be >= 2, got {C}")
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    ranks = np.minimum(len(prof) - 1, (np.arange(C) * len(prof)) // C)
    n = prof[ranks]
    out = np.maximum(2, np.round(n * float(scale))).astype(np.int64)
    if scale <= 1:
        out = np.minimum(out, np.maximum(n, 2))
    return out


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


# ----------------------------------------------------------------------------------------------- layouts
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


def _odd_slots(counts_by_label: np.ndarray, n_odd: int) -> list[tuple[int, int]]:
    """(label, index of the image within that label's training images) for each odd file: the largest classes,
    one file each (the second image of a class, so its first stays an ordinary one)."""
    order = np.argsort(-counts_by_label, kind="stable")
    slots = []
    for k in range(n_odd):
        lab = int(order[k % len(order)])
        idx = 1 + k // len(order)
        if idx < counts_by_label[lab]:
            slots.append((lab, idx))
    return slots


def generate(dataset: str, out: str, *, classes: Optional[int] = None, scale: float = 1.0, img_size: int = 32,
             seed: int = 0, val_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
             odd_files: bool = True, jpeg_quality: int = 90, overwrite: bool = False, workers: int = 1,
             log=print) -> dict:
    """Write the synthetic source tree of ``dataset`` into ``out``; return the manifest (``out/rehearsal.json``)."""
    if dataset not in SPECS:
        raise ValueError(f"--dataset must be one of {', '.join(SPECS)}, got {dataset!r}")
    spec = SPECS[dataset]
    if img_size < 4:
        raise ValueError(f"--img-size must be >= 4, got {img_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must lie in [1, 100], got {jpeg_quality}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file")
    t0 = time.perf_counter()
    by_rank = scaled_counts(dataset, classes, scale)
    C = len(by_rank)
    rng = np.random.default_rng([seed, 0])
    rank_of_label = rng.permutation(C)  # label l gets the count of rank rank_of_label[l]
    train_counts = by_rank[rank_of_label]
    val_k = spec.val_per_class if val_per_class is None else int(val_per_class)
    test_k = spec.test_per_class if test_per_class is None else int(test_per_class)
    if val_k < 0 or test_k < 1:
        raise ValueError("--val-per-class must be >= 0 and --test-per-class >= 1")
    if dataset == "inat2018" and val_k:
        raise ValueError("inat2018 has no val list: its official val set is the test set (--test-per-class); the "
                         "converter holds a val split out of train (make-shards --val-per-class)")
    if os.path.exists(out) and os.listdir(out):  # after every check of the options: nothing removed for a typo
        if not overwrite:
            raise FileExistsError(f"--out {out} is not empty (pass --overwrite to replace an earlier rehearsal tree)")
        if not os.path.isfile(os.path.join(out, MANIFEST_NAME)):
            raise FileExistsError(f"--overwrite: {out} holds no {MANIFEST_NAME}: not a rehearsal tree, left alone")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    odd = _odd_slots(train_counts, len(ODD_PLAN)) if odd_files else []
    odd_at = {slot: kind for slot, (kind, _) in zip(odd, ODD_PLAN)}  # (label, train image index) -> kind
    odd_rule = {kind: rule for kind, rule in ODD_PLAN}
    layout = _inat if dataset == "inat2018" else _oltr
    info, units = layout(out, C, train_counts, val_k, test_k, seed, odd_at, img_size, dataset)
    t_layout = time.perf_counter() - t0
    files, nbytes = _paint_all(units, out, C, img_size, seed, jpeg_quality, max(1, int(workers)))
    seconds = time.perf_counter() - t0
    odd_list = [{**o, "expected": odd_rule[o["kind"]]} for o in info.pop("odd")]
    manifest = {
        "rehearsal": dataset, "generator": "bigltr-rehearsal", "seed": seed, "scale": scale, "img_size": img_size,
        "num_classes": C, "real_num_classes": spec.classes, "jpeg_quality": jpeg_quality,
        "layout": info["layout"],
        "images": {"train": int(train_counts.sum()), **info["eval_totals"], "files": files, "bytes": nbytes},
        "per_class": {"train_max": int(train_counts.max()), "train_min": int(train_counts.min()),
                      "val": val_k, "test": test_k,
                      "train_2_or_3": int(((train_counts >= 2) & (train_counts <= 3)).sum())},
        "class_counts": train_counts.tolist(),  # by label: sorted category id (inat) / list label (OLTR)
        "odd_files": odd_list,
        "seconds": round(seconds, 2), "seconds_lists": round(t_layout, 2), "workers": max(1, int(workers)),
        "next": next_commands(dataset, out, scale, img_size),
    }
    _write_file(os.path.join(out, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    log(f"bigltr-rehearsal: {dataset}, {C} classes, {manifest['images']['train']} train images "
        f"({manifest['per_class']['train_max']} ... {manifest['per_class']['train_min']} per class), "
        + ", ".join(f"{k} {v}" for k, v in info["eval_totals"].items())
        + f", {len(odd_list)} odd file(s); {files} files, {nbytes / 2**20:.1f} MiB in {seconds:.1f} s "
          f"-> {out}")
    return manifest


def _dump_json(path: str, data) -> None:
    _write_file(path, json.dumps(data, separators=(",", ":")).encode())  # dumps: the C encoder (dump is pure Python)


def _inat(out, C, train_counts, val_k, test_k, seed, odd_at, S, dataset) -> tuple[dict, list]:
    rng = np.random.default_rng([seed, 4])
    cat_ids = np.sort(rng.choice(3 * C, size=C, replace=False))  # label l <-> cat_ids[l] (sorted: the converter's rule)
    supers = rng.choice(len(INAT_SUPER), size=C, p=np.asarray(INAT_SUPER_P) / sum(INAT_SUPER_P))
    root = "train_val2018"
    categories = [{"id": int(cat_ids[c]), "name": f"Synthetica {INAT_SUPER[supers[c]].lower()} {int(cat_ids[c])}",
                   "supercategory": INAT_SUPER[supers[c]], "kingdom": INAT_SUPER[supers[c]]} for c in range(C)]
    cat_order = rng.permutation(C)  # the JSON lists categories unsorted
    hexes = rng.integers(0, 2**63 - 1, size=(int(train_counts.sum()) + test_k * C, 2)).tolist()
    h = 0
    entries: dict = {"train": [], "val": []}
    units, odd = [], []
    for c in range(C):
        folder = f"{root}/{INAT_SUPER[supers[c]]}/{int(cat_ids[c])}"
        for sid, (split, n) in enumerate((("train", int(train_counts[c])), ("val", test_k))):
            rel = [f"{folder}/{a:016x}{b:016x}.jpg" for a, b in hexes[h:h + n]]
            h += n
            kinds = [odd_at.get((c, i), "") if split == "train" else "" for i in range(n)]
            units.append((c, sid, list(zip(rel, kinds))))
            odd += [{"kind": k, "split": split, "file": rel[i], "label": c, "category_id": int(cat_ids[c]),
                     "_entry": len(entries[split]) + i} for i, k in enumerate(kinds) if k]
            entries[split] += [(c, p) for p in rel]
    position: dict = {}
    other = {o["file"]: odd_size(S) for o in odd if o["kind"] == "other_size"}
    for split, name, id_base in (("train", "train2018.json", 0), ("val", "val2018.json", 10_000_000)):
        ents = entries[split]
        order = rng.permutation(len(ents))  # images listed in a mixed order, as in the real files
        img_ids = id_base + rng.permutation(3 * len(ents))[:len(ents)]  # unique, not contiguous
        imgs, anns = [], []
        for pos, e in enumerate(order.tolist()):
            c, rel = ents[e]
            position[(split, e)] = pos
            iid = int(img_ids[e])
            w, hgt = other.get(rel, (S, S))
            imgs.append({"id": iid, "file_name": rel, "width": w, "height": hgt, "license": 1,
                         "rights_holder": "bigltr-rehearsal (synthetic)"})
            anns.append({"id": pos, "image_id": iid, "category_id": int(cat_ids[c])})
        _dump_json(os.path.join(out, name), {
            "info": {"description": f"bigltr-rehearsal: synthetic {name} shaped like iNaturalist 2018",
                     "year": 2018, "version": "rehearsal"},
            "images": imgs, "annotations": anns, "categories": [categories[k] for k in cat_order.tolist()],
            "licenses": [{"id": 1, "name": "synthetic, no rights", "url": ""}]})
    for o in odd:  # the key make-shards inat gives the image: <split>_<position in the JSON's images list>
        o["json"] = "train2018.json" if o["split"] == "train" else "val2018.json"
        o["key"] = f"{o['split']}_{position[(o['split'], o.pop('_entry'))]:07d}"
    return ({"layout": {"train_json": "train2018.json", "val_json": "val2018.json", "image_root": ".",
                        "images": f"{root}/<supercategory>/<category id>/<hex>.jpg",
                        "category_ids": "non-contiguous, sorted id -> label"},
             "eval_totals": {"test (val2018.json)": len(entries["val"])}, "odd": odd}, units)


def _oltr(out, C, train_counts, val_k, test_k, seed, odd_at, S, dataset) -> tuple[dict, list]:
    rng = np.random.default_rng([seed, 4])
    if dataset == "imagenet_lt":
        wnids = [f"n{int(x):08d}" for x in np.sort(rng.choice(10**8 // 7, size=C, replace=False)) * 7 + 1440764]
        prefix, lead = "ImageNet_LT", ""

        def path(split, c, i):
            if split == "test":
                return f"val/{wnids[c]}/ILSVRC2012_val_{test_no[c][i]:08d}.JPEG"
            return f"train/{wnids[c]}/{wnids[c]}_{train_no[c][i]}.JPEG"
    else:
        letters = "abcdefghijklmnopqrstuvwxyz"
        scenes = [f"{letters[c % 26]}/{letters[c % 26]}scene_{c:03d}" for c in range(C)]
        prefix, lead = "Places_LT", "/"

        def path(split, c, i):
            if split == "test":
                return f"val_256/Places365_val_{test_no[c][i]:08d}.jpg"
            return f"data_256/{scenes[c]}/{train_no[c][i]:08d}.jpg"
    # file numbers: train and val images of a class are distinct files of its (ImageNet / Places) training folder
    train_no = [1 + np.sort(rng.choice(max(4 * (int(n) + val_k), 100), size=int(n) + val_k, replace=False))
                for n in train_counts]
    perm = 1 + rng.permutation(C * test_k)
    test_no = [np.sort(perm[c * test_k:(c + 1) * test_k]) for c in range(C)]
    lines: dict = {"train": [], "val": [], "test": []}
    units, odd = [], []
    for c in range(C):
        n = int(train_counts[c])
        for sid, (split, idx) in enumerate((("train", range(n)), ("val", range(n, n + val_k)),
                                            ("test", range(test_k)))):
            if not len(idx):
                continue
            rel = [path(split, c, i) for i in idx]
            kinds = [odd_at.get((c, i), "") if split == "train" else "" for i in range(len(rel))]
            units.append((c, sid, list(zip(rel, kinds))))
            odd += [{"kind": k, "split": split, "file": rel[i], "label": c, "_line": len(lines[split]) + i}
                    for i, k in enumerate(kinds) if k]
            lines[split] += [(p, c) for p in rel]
    line_no: dict = {}
    for split, ents in lines.items():
        if not ents:
            continue
        order = rng.permutation(len(ents))  # lists in a mixed order
        text = []
        for ln, e in enumerate(order.tolist(), 1):
            text.append(f"{lead}{ents[e][0]} {ents[e][1]}\n")
            line_no[(split, e)] = ln
        _write_file(os.path.join(out, f"{prefix}_{split}.txt"), "".join(text).encode())
    for o in odd:  # the key make-shards list gives the image: <split>_<line number in that split's list>
        o["list"] = f"{prefix}_{o['split']}.txt"
        o["key"] = f"{o['split']}_{line_no[(o['split'], o.pop('_line'))]:07d}"
    lists = {s: f"{prefix}_{s}.txt" for s in lines if lines[s]}
    return ({"layout": {"lists": lists, "image_root": ".", "line": f"'{lead}relative/path label'"},
             "eval_totals": {s: len(v) for s, v in lines.items() if s != "train" and v}, "odd": odd}, units)


# ----------------------------------------------------------------------------------------------- commands
def train_overrides(shards: str, scale: float, img_size: int) -> dict:
    """Overrides of a benchmark recipe for a one-epoch dry run on a rehearsal tree: a tiny timm model, the tree's
    image size, and Many / Medium / Few thresholds scaled with the counts (at least 3 / 5: every class has >= 2
    images, so all three groups stay non-empty)."""
    few = max(3, round(20 * scale))
    many = max(few + 2, round(100 * scale))
    return {"data.root": shards, "data.img_size": img_size, "model.name": "test_resnet", "data.train_aug": "none",
            "data.num_workers": 1, "data.many_thr": many, "data.few_thr": few, "stage1.epochs": 1,
            "stage2.epochs": 1, "stage1.batch_size": 64, "stage1.lr": 0.2, "stage2.batch_size": 256,
            "stage1.amp": "none"}


def next_commands(dataset: str, out: str, scale: float, img_size: int) -> dict:
    """The conversion and training commands for this tree (docs/cluster.md, "Dry-run a new cluster")."""
    out = os.path.abspath(out)  # every node of a job must find the files: no path relative to this shell
    shards = out.rstrip(os.sep) + "_shards"
    if dataset == "inat2018":
        convert = (f"bigltr-make-shards inat --src {out} --train-json {out}/train2018.json "
                   f"--val-json {out}/val2018.json --out {shards}")
    else:
        p = "ImageNet_LT" if dataset == "imagenet_lt" else "Places_LT"
        convert = (f"bigltr-make-shards list --src {out} --train-list {out}/{p}_train.txt "
                   f"--val-list {out}/{p}_val.txt --test-list {out}/{p}_test.txt --out {shards}")
    overrides = " ".join(f"{k}={v}" for k, v in train_overrides(shards, scale, img_size).items())
    return {"convert": convert, "train_overrides": overrides,
            "stage1": f"python -m bigltr.train recipe={SPECS[dataset].recipe} out=runs/rehearsal stage=1 {overrides}",
            "stage2": (f"torchrun --standalone --nproc_per_node 2 -m bigltr.train recipe={SPECS[dataset].recipe} "
                       f"out=runs/rehearsal stage=2 dist.world_size=2 {overrides}")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigltr-rehearsal",
                                description="Write a synthetic source tree shaped like iNaturalist 2018 (COCO-style "
                                            "JSON), ImageNet-LT or Places-LT (OLTR lists): the real class count and "
                                            "long-tailed profile (scaled), learnable JPEGs and a few odd files, for "
                                            "a dry run of conversion and training (docs/cluster.md, 'Dry-run a new "
                                            "cluster').",
                                epilog="Then: the 'next' commands in OUT/rehearsal.json, or docs/cluster.md "
                                       "('Dry-run a new cluster').")
    p.add_argument("--dataset", choices=tuple(SPECS), default="inat2018", help="which source to imitate "
                                                                               "(default inat2018)")
    p.add_argument("--out", required=True, help="folder to write the source tree into (must be empty or absent)")
    p.add_argument("--classes", type=int, default=None,
                   help="number of classes (default: the real count, 8142 / 1000 / 365)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of each class's training images: max(2, round(n * scale)) (default 1: the real "
                        "437,513 / 115,846 / 62,500)")
    p.add_argument("--img-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of counts order, ids, patterns and noise (default 0)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="val list images per class (ImageNet-LT / Places-LT; default 20; inat2018 has none)")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="test images per class (default: 3 iNat val2018.json, 50 ImageNet-LT, 100 Places-LT)")
    p.add_argument("--no-odd-files", dest="odd_files", action="store_false",
                   help="no grayscale / CMYK / PNG-named-.jpg / other-size / truncated files")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="processes that draw, encode and write the images (default: min(4, cores)); the files do "
                        "not depend on it")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier rehearsal tree in --out")
    return p


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return generate(args.dataset, args.out, classes=args.classes, scale=args.scale, img_size=args.img_size,
                        seed=args.seed, val_per_class=args.val_per_class, test_per_class=args.test_per_class,
                        odd_files=args.odd_files, jpeg_quality=args.jpeg_quality, overwrite=args.overwrite,
                        workers=args.workers)
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"bigltr-rehearsal: error: {e}") from e


def console_main() -> int:
    m = main()
    nxt = m["next"]
    print("next:\n  " + nxt["convert"] + "\n  " + nxt["stage1"] + "\n  " + nxt["stage2"], file=sys.stdout)
    return 0


if __name__ == "__main__":
    console_main()
