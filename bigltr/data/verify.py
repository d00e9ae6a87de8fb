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

from .errors import DataError
from .info import INFO_NAME, validate_info
from .plan import IMAGE_KEYS
from .shard_index import default_index_dir, load_shard_index
from .writer import sha256_file

__all__ = ["VerifyReport", "verify_dataset", "check_label_counts"]


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
        ext = next((e for e in IMAGE_KEYS if e in fields), None)
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
        totals, clean = [0] * num_classes, True  # label counts of the whole split, when every shard read cleanly
        for fname, length, size, digest, hist in zip(entry["filenames"], entry["shard_lengths"], sizes, sums,
                                                     hists):
            shard = os.path.join(root, fname)
            out.shards += 1
            if not os.path.isfile(shard):
                problem(f"{shard}: missing (split '{split}' lists it)")
                clean = False
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
            clean = clean and not errors and read == length
            for lab in labels:
                totals[lab] += 1
            if hist is not None and not errors and read == length:
                got = [0] * num_classes
                for lab in labels:
                    got[lab] += 1
                if got != list(hist):
                    problem(f"{shard}: per-class counts {got} differ from class_hist {list(hist)}")
        if split == "train" and "class_hist" not in entry and clean and totals != list(info["class_counts"]):
            problem(f"{path}: class_counts {list(info['class_counts'])} differ from the train shards' per-class "
                    f"label counts {totals}")
    return out


def check_label_counts(root: str | os.PathLike, info: dict, *, split: str = "train",
                       index_dir: Optional[str] = None) -> None:
    """The cheap part of :func:`verify_dataset`, run by the trainer at start-up: the labels the shards of ``split``
    hold, counted per class, must equal ``class_hist`` (or, without it, ``class_counts``). ``class_counts`` drive
    the loss weights and the Many / Medium / Few groups, and ``read_info`` only checks them against
    ``class_hist``; an ``_info.json`` whose two lists were edited together (say two classes swapped in both)
    passes that check and would train with wrong groups and weights. Raises DataError naming the file, shard and
    the first class that differs.

    Reads only tar headers and the tiny ``.cls`` members (about 0.1 ms per sample), cached per shard (by its path,
    size and mtime) in ``index_dir`` (``data.dali_index_dir``; the DALI pipeline's index cache, which it shares),
    so a later start costs one small JSON read per shard. Shards that read short, hold a sample without label or
    image, or a label that is not in range are left out: the loaders count or refuse those when they read them.
    """
    root = os.fspath(root)
    entry = info["splits"].get(split)
    if entry is None:
        return
    num_classes = int(info["num_classes"])
    hists = entry.get("class_hist")
    total, complete = [0] * num_classes, True
    path = os.path.join(root, INFO_NAME)
    for k, (fname, length) in enumerate(zip(entry["filenames"], entry["shard_lengths"])):
        shard = os.path.join(root, fname)
        try:
            idx = load_shard_index(shard, index_dir or default_index_dir())
        except OSError:
            complete = False
            continue
        got, ok = [0] * num_classes, idx.get("error") is None and len(idx["samples"]) == length
        for _key, text, ext, *_ in idx["samples"]:
            try:
                label = int(text) if ext is not None and text is not None else -1
            except ValueError:
                label = -1
            if 0 <= label < num_classes:
                got[label] += 1
            else:
                ok = False
        if not ok:
            complete = False
            continue
        total = [a + b for a, b in zip(total, got)]
        if hists is not None and got != list(hists[k]):
            c = next(c for c in range(num_classes) if got[c] != hists[k][c])
            raise DataError(
                f"{path}: splits.{split}.class_hist of {fname} records {hists[k][c]} sample(s) of class {c} "
                f"('{info['classes'][c]}'), the shard's labels hold {got[c]} (per class: recorded {list(hists[k])}, "
                f"read {got}): the class counts in {INFO_NAME} do not describe these shards, and they set the loss "
                f"weights and the Many/Medium/Few groups; re-copy {INFO_NAME} or re-run tools/make_shards.py "
                f"(`tools/make_shards.py verify {root}` lists every difference)")
    if hists is None and complete and split == "train" and total != list(info["class_counts"]):
        c = next(c for c in range(num_classes) if total[c] != info["class_counts"][c])
        raise DataError(
            f"{path}: class_counts[{c}]={info['class_counts'][c]} ('{info['classes'][c]}') but the train shards' "
            f"labels hold {total[c]} (per class: recorded {list(info['class_counts'])}, read {total}); the class "
            f"counts set the loss weights and the Many/Medium/Few groups; re-copy {INFO_NAME} or re-run "
            f"tools/make_shards.py (`tools/make_shards.py verify {root}`)")
