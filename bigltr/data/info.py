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
      "category_ids": [...],                        # optional (iNat): contiguous label -> original id
      "official_train_counts": [...],               # optional: the official training set per class (before any
                                                    #   val hold-out / undecodable file): the Many/Medium/Few groups
      "official_train_splits": ["train", "val"]     # optional: the splits whose union is that set (the refit)
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

__all__ = ["INFO_NAME", "read_info", "write_info", "validate_info", "check_trainable", "split_entry",
           "split_class_counts", "DataError", "DataMissingError"]

INFO_NAME = "_info.json"

_HOW_TO_MAKE = (
    "make shards with `python tools/make_shards.py idx --src DIR_WITH_IDX_FILES --out {root}` "
    "(see `python tools/make_shards.py --help` for other source formats)"
)


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Counts and byte sizes above this are not data, and numpy (int64) and the loss weights cannot hold them.
_MAX_COUNT = 2**53 - 1


def _check_magnitudes(info: dict, where: str) -> None:
    """DataError naming file and key for a count (num_classes, class_counts, num_samples, shard_lengths, class_hist,
    sizes) that is a number outside [0, 2**53): 1e20 written as a float, or an integer like 10**400."""
    def check(key: str, v: Any) -> None:
        if isinstance(v, float) or (_is_int(v) and not 0 <= v <= _MAX_COUNT):
            text = repr(v) if len(repr(v)) <= 24 else f"{repr(v)[:12]}... ({len(repr(v))} digits)"
            raise DataError(f"{where}: key '{key}' is {text}: counts must be integers in [0, 2**53)")

    check("num_classes", info.get("num_classes"))
    lists = [("class_counts", info.get("class_counts"))]
    for split, entry in (info.get("splits") or {}).items() if isinstance(info.get("splits"), dict) else ():
        if isinstance(entry, dict):
            check(f"splits.{split}.num_samples", entry.get("num_samples"))
            lists += [(f"splits.{split}.{k}", entry.get(k)) for k in ("shard_lengths", "sizes")]
            hist = entry.get("class_hist")
            if isinstance(hist, list):
                lists += [(f"splits.{split}.class_hist[{i}]", h) for i, h in enumerate(hist)]
    for key, values in lists:
        if isinstance(values, list):
            for i, v in enumerate(values):
                check(f"{key}[{i}]", v)


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
    _check_magnitudes(info, where)
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
    _validate_official(info, where)


def _validate_official(info: dict, where: str) -> None:
    """``official_train_counts`` (the Many/Medium/Few groups) and ``official_train_splits`` (the splits whose union
    is the official training set, less undecodable files), both optional: a held-out split's images and the
    train shards together never exceed the official count of a class."""
    num_classes, official = info["num_classes"], info.get("official_train_counts")
    if official is not None and (not isinstance(official, list) or len(official) != num_classes or not all(
            _is_int(n) and 0 <= n < 2**53 for n in official)):
        raise DataError(f"{where}: key 'official_train_counts' must be a list of {num_classes} non-negative integers")
    parts = info.get("official_train_splits")
    if parts is None:
        return
    if (not isinstance(parts, list) or not parts or parts[0] != "train" or len(set(parts)) != len(parts)
            or not all(isinstance(s, str) and s in info["splits"] for s in parts)):
        raise DataError(f"{where}: key 'official_train_splits' must list 'train' and then other splits of 'splits' "
                        f"(got {parts!r})")
    hists = [info["splits"][s].get("class_hist") for s in parts]
    if official is None or any(h is None for h in hists):
        return
    for c in range(num_classes):
        n = sum(h[c] for hist in hists for h in hist)
        if n > official[c]:
            raise DataError(f"{where}: splits {'+'.join(parts)} hold {n} images of class {c} ('{info['classes'][c]}') "
                            f"but official_train_counts[{c}] is {official[c]}; re-run tools/make_shards.py")


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


def split_entry(info: dict, split: str) -> dict:
    """The ``splits`` entry of ``split``; ``"a+b"`` is the union of splits a and b (a's shards, then b's), e.g.
    ``train+val``: the whole official training set when val was held out of it (the refit)."""
    names = split.split("+")
    missing = [s for s in names if s not in info["splits"]]
    if missing:
        raise DataError(f"{INFO_NAME} of '{info['name']}' has no split '{missing[0]}' (has: "
                        f"{', '.join(info['splits'])})")
    if len(names) == 1:
        return info["splits"][split]
    parts = [info["splits"][s] for s in names]
    out = {"name": split, "num_samples": sum(int(e["num_samples"]) for e in parts),
           "filenames": [f for e in parts for f in e["filenames"]],
           "shard_lengths": [n for e in parts for n in e["shard_lengths"]]}
    for key in ("class_hist", "checksums", "sizes"):
        if all(e.get(key) is not None for e in parts):
            out[key] = [x for e in parts for x in e[key]]
    return out


def split_class_counts(info: dict, split: str) -> list[int]:
    """Training images per class of ``split`` (``train``: ``class_counts``; a union: summed from its splits'
    ``class_hist``, which the converters record)."""
    if split == "train":
        return list(info["class_counts"])
    hist = split_entry(info, split).get("class_hist")
    if hist is None:
        raise DataError(f"{INFO_NAME} of '{info['name']}': split '{split}' has no class_hist, so its per-class "
                        f"counts (the class-balanced loss weights) are unknown; re-run tools/make_shards.py")
    return [sum(col) for col in zip(*hist)]


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
            f"needs at least one training image per class: re-make the shards (idx / cifar: a smaller imbalance "
            f"factor; imagefolder / list / inat: the class's files did not decode, see conversion_report.json, or "
            f"were all held out by an older converter) or drop the class"
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
