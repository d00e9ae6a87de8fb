"""The ``_info.json`` file that describes a folder of WebDataset shards.

Format (a superset of what timm's ``wds`` reader reads; timm ignores the extra keys)::

    {
      "name": "fmnist_lt",
      "num_classes": 10,
      "classes": ["T-shirt/top", ...],
      "class_counts": [5000, 2997, ...],          # training images per class
      "splits": {
        "train": {"name": "train", "num_samples": 12406,
                  "filenames": ["train-000000.tar", ...], "shard_lengths": [5000, ...],
                  "class_hist": [[...per-class counts of shard 0...], ...],    # optional
                  "checksums": ["<hex sha256 of train-000000.tar>", ...],      # optional
                  "sizes": [<bytes of train-000000.tar>, ...]},                 # optional
        "val":   {...},
        "test":  {...}
      },
      "source": {...},                              # free-form provenance: converter, args, seed, ...
      "category_ids": [...]                         # optional (iNat): contiguous label -> original id
    }

Shard file names are relative to the folder holding ``_info.json``. Every problem found here raises
:class:`bigltr.data.errors.DataError` (a ValueError; :class:`DataMissingError`, also a FileNotFoundError, for a
missing folder, file or shard), with a message naming the file and key.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from bigltr.atomic import write_json_atomic

from .errors import DataError, DataMissingError

__all__ = ["INFO_NAME", "read_info", "write_info", "validate_info", "check_trainable", "DataError",
           "DataMissingError"]

INFO_NAME = "_info.json"

_HOW_TO_MAKE = (
    "make shards with `python tools/make_shards.py idx --src DIR_WITH_IDX_FILES --out {root}` "
    "(see `python tools/make_shards.py --help` for other source formats)"
)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_info(info: Any, *, where: str = INFO_NAME) -> None:
    """Check keys, types and consistency of a parsed ``_info.json``; raise DataError naming the bad key."""
    if not isinstance(info, dict):
        raise DataError(f"{where}: top level must be a JSON object, got {type(info).__name__}")
    for key, typ in (("name", str), ("num_classes", int), ("classes", list), ("class_counts", list),
                     ("splits", dict)):
        if key not in info:
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(info[key], typ) or (typ is int and not _is_int(info[key])):
            raise DataError(f"{where}: key '{key}' must be {typ.__name__}, got {type(info[key]).__name__}")
    num_classes = info["num_classes"]
    if num_classes < 1:
        raise DataError(f"{where}: key 'num_classes' must be >= 1, got {num_classes}")
    if len(info["classes"]) != num_classes or not all(isinstance(c, str) for c in info["classes"]):
        raise DataError(f"{where}: key 'classes' must be a list of {num_classes} strings")
    if len(info["class_counts"]) != num_classes or not all(
        _is_int(n) and n >= 0 for n in info["class_counts"]
    ):
        raise DataError(f"{where}: key 'class_counts' must be a list of {num_classes} non-negative integers")
    if "source" in info and not isinstance(info["source"], dict):
        raise DataError(f"{where}: key 'source' must be an object")
    if not info["splits"]:
        raise DataError(f"{where}: key 'splits' is empty")
    for split, entry in info["splits"].items():
        k = f"splits.{split}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: key '{k}' must be an object")
        for key, typ in (("name", str), ("num_samples", int), ("filenames", list), ("shard_lengths", list)):
            if key not in entry:
                raise DataError(f"{where}: missing key '{k}.{key}'")
            if not isinstance(entry[key], typ) or (typ is int and not _is_int(entry[key])):
                raise DataError(
                    f"{where}: key '{k}.{key}' must be {typ.__name__}, got {type(entry[key]).__name__}"
                )
        files, lengths = entry["filenames"], entry["shard_lengths"]
        if not all(isinstance(f, str) and f for f in files):
            raise DataError(f"{where}: key '{k}.filenames' must be a list of file names")
        if len(set(files)) != len(files):
            raise DataError(f"{where}: key '{k}.filenames' lists a shard twice")
        if len(lengths) != len(files) or not all(_is_int(n) and n >= 0 for n in lengths):
            raise DataError(
                f"{where}: key '{k}.shard_lengths' must hold one non-negative integer per file "
                f"({len(files)} files, {len(lengths)} lengths)"
            )
        if sum(lengths) != entry["num_samples"]:
            raise DataError(
                f"{where}: key '{k}.num_samples' is {entry['num_samples']} but shard_lengths sum to {sum(lengths)}"
            )
        hist = entry.get("class_hist")
        if hist is not None:
            if (not isinstance(hist, list) or len(hist) != len(files)
                    or not all(isinstance(h, list) and len(h) == num_classes and sum(h) == n
                               for h, n in zip(hist, lengths))):
                raise DataError(
                    f"{where}: key '{k}.class_hist' must hold, per shard, {num_classes} counts summing to "
                    f"that shard's length"
                )
        sums = entry.get("checksums")
        if sums is not None and (not isinstance(sums, list) or len(sums) != len(files) or not all(
                isinstance(h, str) and _SHA256_RE.match(h) for h in sums)):
            raise DataError(f"{where}: key '{k}.checksums' must hold one hex sha256 string per file")
        sizes = entry.get("sizes")
        if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(files) or not all(
                _is_int(n) and n >= 0 for n in sizes)):
            raise DataError(f"{where}: key '{k}.sizes' must hold one non-negative byte count per file")
    # class_counts drive the loss weights and the Many/Medium/Few groups: they must match the train shards.
    hist = info["splits"].get("train", {}).get("class_hist")
    if hist is not None:
        for c in range(num_classes):
            n = sum(h[c] for h in hist)
            if n != info["class_counts"][c]:
                raise DataError(
                    f"{where}: class_counts[{c}]={info['class_counts'][c]} but the train shards' class_hist sums "
                    f"to {n} (class '{info['classes'][c]}'); re-run tools/make_shards.py rather than editing "
                    f"_info.json by hand"
                )


def read_info(root: str | os.PathLike) -> dict:
    """Read and validate ``root/_info.json``; check that every listed shard exists.

    Raises DataMissingError (a FileNotFoundError, with a hint on how to make shards) if the folder, the file
    or a shard is missing, DataError naming the key if the content is malformed, and DataError naming the
    shard if its size differs from the ``sizes`` recorded when it was written (a truncated copy: one stat per
    shard, no reading).
    """
    root = os.fspath(root)
    path = os.path.join(root, INFO_NAME)
    hint = _HOW_TO_MAKE.format(root=root)
    if not os.path.isdir(root):
        raise DataMissingError(f"no dataset folder {root}: {hint}")
    if not os.path.isfile(path):
        raise DataMissingError(f"no {INFO_NAME} in {root}: {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    validate_info(info, where=path)
    for split, entry in info["splits"].items():
        sizes = entry.get("sizes") or [None] * len(entry["filenames"])  # absent in _info.json files of old runs
        for fname, recorded in zip(entry["filenames"], sizes):
            shard = os.path.join(root, fname)
            if not os.path.isfile(shard):
                raise DataMissingError(
                    f"{path}: split '{split}' lists shard {fname}, which is missing from {root} "
                    f"(an interrupted or partial copy?): {hint.replace('--out', '--overwrite --out')}"
                )
            if recorded is not None and os.path.getsize(shard) != recorded:
                raise DataError(
                    f"truncated or modified shard {shard}: {os.path.getsize(shard)} bytes, {INFO_NAME} records "
                    f"{recorded}; re-copy it or re-run tools/make_shards.py; `tools/make_shards.py verify {root}` "
                    f"checks checksums"
                )
    return info


def check_trainable(info: dict, *, split: str = "train") -> None:
    """Raise DataError unless ``info`` can train a classifier: a ``split`` split and >= 1 image per class.

    Call at run start (not in :func:`read_info`: an evaluation-only folder may lack images of some class).
    """
    if split not in info["splits"]:
        raise DataError(f"{INFO_NAME} of '{info['name']}' has no '{split}' split: nothing to train on")
    empty = [c for c, n in enumerate(info["class_counts"]) if n == 0]
    if empty:
        names = ", ".join(f"{c} ('{info['classes'][c]}')" for c in empty[:10]) + (", ..." if len(empty) > 10 else "")
        raise DataError(
            f"{INFO_NAME} of '{info['name']}': {len(empty)} class(es) have no training images: {names}; the method "
            f"needs at least one training image per class: re-make the shards (e.g. with a smaller imbalance "
            f"factor) or drop the class"
        )


def write_info(root: str | os.PathLike, info: dict) -> str:
    """Validate ``info`` and write it to ``root/_info.json`` atomically (temp file + os.replace).

    Returns the path written.
    """
    root = os.fspath(root)
    validate_info(info, where=f"info for {root}")
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, INFO_NAME)
    write_json_atomic(path, info)
    return path
