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
* with a :class:`bigltr.data.holdout.Holdout` (a validation split to be held out of train), decodes every
  listed training image FIRST (kept in an anonymous spool file in OUT), draws the hold-out from the decodable
  ones only, then writes train and val from the spool (each image is still decoded once);
* writes the shards with :func:`bigltr.data.writer.write_dataset` (temporary names renamed when complete,
  ``_info.json`` last), after writing the report.

Images are stored as their original bytes when possible (``image_format="keep"``, no resize, no JPEG
quality given: JPEG/PNG/WebP files are copied after a successful decode), else re-encoded deterministically.

The reading of one image and the ordered parallel map are :mod:`bigltr.data.decode`'s, the report and its limits
:mod:`bigltr.data.conversion_report`'s; this module is the driver.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from .conversion_report import ConversionReport, EmptiedClassError, SkipLimitExceeded
from .decode import EncodeOptions, _ChunkFn, _mp_context, ordered_map
from .writer import AUTO, EncodedImage, prepare_output_dir, write_dataset

__all__ = ["Item", "convert"]


class Item(NamedTuple):
    """One sample to convert: ``src`` is an image file path (str) or a uint8 HxW[xC] array / PIL image."""

    key: str
    src: Any
    label: int
    origin: str



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
    ``holdout``: a :class:`bigltr.data.holdout.Holdout` to draw the val split out of ``splits["train"]`` (listed
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
