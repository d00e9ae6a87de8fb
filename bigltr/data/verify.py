"""Check a shard folder against its ``_info.json`` (``python tools/make_shards.py verify DIR``).

For every listed shard: it exists, its byte size and sha256 match ``sizes`` / ``checksums`` (when recorded), and
reading it with :mod:`tarfile` gives exactly ``shard_lengths[i]`` samples, each with a ``.cls`` integer label in
``[0, num_classes)`` and an image, whose per-class counts match ``class_hist`` (when recorded). With
``decode=True`` every image is also decoded (slow on large data). Reads every byte once: no torch import.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .info import INFO_NAME, validate_info
from .writer import sha256_file

__all__ = ["VerifyReport", "verify_dataset"]

_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0  # samples read (complete or not)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return f"verified {self.shards} shard(s), {self.samples} sample(s) read: {state}"


def _read_shard(path: str, num_classes: int, decode: bool) -> tuple[list[int], list[str], int]:
    """Labels of the usable samples of one tar, problem texts, and the number of samples read. A sample is
    the run of consecutive members sharing a key (the name up to its first dot, as webdataset groups them)."""
    labels: list[int] = []
    problems: list[str] = []
    samples: list[tuple[str, dict]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                base = os.path.basename(m.name)
                if "." not in base:
                    continue
                key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                data = tf.extractfile(m).read()
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"read error after {len(samples)} sample(s) ({type(e).__name__}: {e})")
    for key, fields in samples:
        if "cls" not in fields:
            problems.append(f"sample {key}: no .cls label")
            continue
        try:
            label = int(fields["cls"])
        except ValueError:
            problems.append(f"sample {key}: label {fields['cls'][:20]!r} is not an integer")
            continue
        if not 0 <= label < num_classes:
            problems.append(f"sample {key}: label {label} outside [0, {num_classes})")
            continue
        ext = next((e for e in _IMAGE_EXTS if e in fields), None)
        if ext is None:
            problems.append(f"sample {key}: no image")
            continue
        if decode:
            from PIL import Image

            try:
                with Image.open(io.BytesIO(fields[ext])) as img:
                    img.load()
            except Exception as e:  # PIL raises many types for bad data
                problems.append(f"sample {key}: .{ext} does not decode ({type(e).__name__}: {e})")
                continue
        labels.append(label)
    return labels, problems, len(samples)


def verify_dataset(root: str | os.PathLike, splits: Optional[Sequence[str]] = None, *, decode: bool = False,
                   report: Optional[Callable[[str], None]] = None) -> VerifyReport:
    """Check ``root`` (all splits, or ``splits``); each problem line is also passed to ``report`` as found.

    A missing or malformed ``_info.json`` is one problem (nothing else can be checked).
    """
    root = os.fspath(root)
    out = VerifyReport()

    def problem(text: str) -> None:
        out.problems.append(text)
        if report is not None:
            report(text)

    path = os.path.join(root, INFO_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        validate_info(info, where=path)
    except (OSError, ValueError) as e:  # json.JSONDecodeError and DataError are ValueErrors
        problem(f"{path}: {e}")
        return out
    for s in splits or ():
        if s not in info["splits"]:
            problem(f"{path}: no split '{s}' (has: {', '.join(info['splits'])})")
    num_classes = info["num_classes"]
    for split, entry in info["splits"].items():
        if splits and split not in splits:
            continue
        n = len(entry["filenames"])
        sizes = entry.get("sizes") or [None] * n
        sums = entry.get("checksums") or [None] * n
        hists = entry.get("class_hist") or [None] * n
        for fname, length, size, digest, hist in zip(entry["filenames"], entry["shard_lengths"], sizes, sums,
                                                     hists):
            shard = os.path.join(root, fname)
            out.shards += 1
            if not os.path.isfile(shard):
                problem(f"{shard}: missing (split '{split}' lists it)")
                continue
            actual = os.path.getsize(shard)
            if size is not None and actual != size:
                problem(f"{shard}: {actual} bytes, {INFO_NAME} records {size} (truncated or modified)")
            if digest is not None and sha256_file(shard) != digest:
                problem(f"{shard}: sha256 differs from {INFO_NAME} (corrupted or modified)")
            labels, errors, read = _read_shard(shard, num_classes, decode)
            out.samples += read
            for e in errors:
                problem(f"{shard}: {e}")
            if read != length:
                problem(f"{shard}: {read} sample(s), {INFO_NAME} records {length}")
            if hist is not None and not errors and read == length:
                got = [0] * num_classes
                for lab in labels:
                    got[lab] += 1
                if got != list(hist):
                    problem(f"{shard}: per-class counts {got} differ from class_hist {list(hist)}")
    return out

