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
                  "checksums": ["<hex sha256 of train-000000.tar>", ...]},     # optional
        "val":   {...},
        "test":  {...}
      },
      "source": {...},                              # free-form provenance: converter, args, seed, ...
      "category_ids": [...]                         # optional (iNat): contiguous label -> original id
    }

Shard file names are relative to the folder holding ``_info.json``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

from bigltr.atomic import write_json_atomic

__all__ = ["INFO_NAME", "read_info", "write_info", "validate_info"]

INFO_NAME = "_info.json"

_HOW_TO_MAKE = (
    "make shards with `python tools/make_shards.py idx --src DIR_WITH_IDX_FILES --out {root}` "
    "(see `python tools/make_shards.py --help` for other source formats)"
)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_info(info: Any, *, where: str = INFO_NAME) -> None:
    """Check keys and types of a parsed ``_info.json``; raise ValueError naming the bad key."""
    if not isinstance(info, dict):
        raise ValueError(f"{where}: top level must be a JSON object, got {type(info).__name__}")
    for key, typ in (("name", str), ("num_classes", int), ("classes", list), ("class_counts", list),
                     ("splits", dict)):
        if key not in info:
            raise ValueError(f"{where}: missing key '{key}'")
        if not isinstance(info[key], typ) or (typ is int and not _is_int(info[key])):
            raise ValueError(f"{where}: key '{key}' must be {typ.__name__}, got {type(info[key]).__name__}")
    num_classes = info["num_classes"]
    if num_classes < 1:
        raise ValueError(f"{where}: key 'num_classes' must be >= 1, got {num_classes}")
    if len(info["classes"]) != num_classes or not all(isinstance(c, str) for c in info["classes"]):
        raise ValueError(f"{where}: key 'classes' must be a list of {num_classes} strings")
    if len(info["class_counts"]) != num_classes or not all(
        _is_int(n) and n >= 0 for n in info["class_counts"]
    ):
        raise ValueError(f"{where}: key 'class_counts' must be a list of {num_classes} non-negative integers")
    if "source" in info and not isinstance(info["source"], dict):
        raise ValueError(f"{where}: key 'source' must be an object")
    if not info["splits"]:
        raise ValueError(f"{where}: key 'splits' is empty")
    for split, entry in info["splits"].items():
        k = f"splits.{split}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: key '{k}' must be an object")
        for key, typ in (("name", str), ("num_samples", int), ("filenames", list), ("shard_lengths", list)):
            if key not in entry:
                raise ValueError(f"{where}: missing key '{k}.{key}'")
            if not isinstance(entry[key], typ) or (typ is int and not _is_int(entry[key])):
                raise ValueError(
                    f"{where}: key '{k}.{key}' must be {typ.__name__}, got {type(entry[key]).__name__}"
                )
        files, lengths = entry["filenames"], entry["shard_lengths"]
        if not all(isinstance(f, str) and f for f in files):
            raise ValueError(f"{where}: key '{k}.filenames' must be a list of file names")
        if len(set(files)) != len(files):
            raise ValueError(f"{where}: key '{k}.filenames' lists a shard twice")
        if len(lengths) != len(files) or not all(_is_int(n) and n >= 0 for n in lengths):
            raise ValueError(
                f"{where}: key '{k}.shard_lengths' must hold one non-negative integer per file "
                f"({len(files)} files, {len(lengths)} lengths)"
            )
        if sum(lengths) != entry["num_samples"]:
            raise ValueError(
                f"{where}: key '{k}.num_samples' is {entry['num_samples']} but shard_lengths sum to {sum(lengths)}"
            )
        hist = entry.get("class_hist")
        if hist is not None:
            if (not isinstance(hist, list) or len(hist) != len(files)
                    or not all(isinstance(h, list) and len(h) == num_classes and sum(h) == n
                               for h, n in zip(hist, lengths))):
                raise ValueError(
                    f"{where}: key '{k}.class_hist' must hold, per shard, {num_classes} counts summing to "
                    f"that shard's length"
                )
        sums = entry.get("checksums")
        if sums is not None and (not isinstance(sums, list) or len(sums) != len(files) or not all(
                isinstance(h, str) and _SHA256_RE.match(h) for h in sums)):
            raise ValueError(f"{where}: key '{k}.checksums' must hold one hex sha256 string per file")


def read_info(root: str | os.PathLike) -> dict:
    """Read and validate ``root/_info.json``; check that every listed shard exists.

    Raises FileNotFoundError (with a hint on how to make shards) if the folder, the file or a shard is
    missing, ValueError naming the key if the content is malformed.
    """
    root = os.fspath(root)
    path = os.path.join(root, INFO_NAME)
    hint = _HOW_TO_MAKE.format(root=root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no dataset folder {root}: {hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {INFO_NAME} in {root}: {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    validate_info(info, where=path)
    for split, entry in info["splits"].items():
        for fname in entry["filenames"]:
            if not os.path.isfile(os.path.join(root, fname)):
                raise FileNotFoundError(
                    f"{path}: split '{split}' lists shard {fname}, which is missing from {root} "
                    f"(an interrupted or partial copy?): {hint.replace('--out', '--overwrite --out')}"
                )
    return info


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
