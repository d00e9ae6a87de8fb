"""CIFAR-10 / CIFAR-100 python pickles -> CIFAR-LT (LDAM-DRW or official weight-balancing subset)."""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np

from ..longtail import (LONGTAIL_FORMULA, cifar_subset, cifar_subset_rule, longtail_counts, train_order_rule,
                        train_shuffle, val_from_unused)
from ..writer import sha256_file
from . import SourceData, array_items, require_dir

HELP = "CIFAR-10/100 python pickles -> CIFAR-LT"
DESCRIPTION = (
    "CIFAR-LT shards from the CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, "
    "meta) python files in --src. Train: n_c = int(n_max * (1/IF)^(c/(C-1))) images of class c (CIFAR-100 IF "
    "100/50/10: 10,847 / 12,608 / 19,573), chosen by --convention: ldam (LDAM-DRW, the usual benchmark: per-class "
    "indices shuffled with numpy seed 0 before truncation) or official (the weight-balancing code: first n_c in "
    "file order). Test: the balanced official test set. Val: up to --val-per-class images per class from the "
    "training images the subset leaves unused, so the standard train set is unchanged and model selection never "
    "sees the test set; a class whose n_c equals its pool (class 0) gets none.\n\nExample (CIFAR-100-LT IF100):\n"
    "  python tools/make_shards.py cifar --src cifar-100-python --out data/cifar100_lt_if100 --imbalance 100")

_CIFAR = {  # variant -> (train files, test file, meta file, label key, names key, n_max)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", b"labels",
                b"label_names", 5000),
    "cifar100": (["train"], "test", "meta", b"fine_labels", b"fine_label_names", 500),
}


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR file {path} does not exist")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a CIFAR python pickle (top level is {type(d).__name__}, not a dict)")
    return d


def load_cifar_batches(src: str, files: list[str], label_key: bytes, num_classes: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) of the files concatenated in order."""
    images, labels = [], []
    for fname in files:
        path = os.path.join(src, fname)
        d = _unpickle(path)
        if b"data" not in d or label_key not in d:
            raise ValueError(f"{path}: missing key b'data' or {label_key!r}")
        data = np.asarray(d[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{path}: b'data' must be uint8 N x 3072, got {data.dtype} {data.shape}")
        lab = np.asarray(d[label_key], dtype=np.int64)
        if lab.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but {lab.size} labels in {label_key!r}")
        bad = np.flatnonzero((lab < 0) | (lab >= num_classes))
        if bad.size:
            raise ValueError(f"{path}: {label_key.decode()}[{bad[0]}] = {lab[bad[0]]} outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def load(src: str, *, imbalance: float = 100.0, n_max: Optional[int] = None, convention: str = "ldam",
         ldam_seed: int = 0, val_per_class: Optional[int] = None, seed: int = 0) -> SourceData:
    """``n_max`` default 5000 (CIFAR-10) / 500 (CIFAR-100); ``val_per_class`` default 200 / 20 (C == 100)."""
    src = require_dir(src)
    variant = "cifar10" if os.path.isfile(os.path.join(src, "data_batch_1")) else (
        "cifar100" if os.path.isfile(os.path.join(src, "train")) else None)
    if variant is None:
        raise FileNotFoundError(f"--src {src} holds neither CIFAR-10 (data_batch_1..5, test_batch, batches.meta) "
                                f"nor CIFAR-100 (train, test, meta) python files")
    train_files, test_file, meta_file, label_key, names_key, n_max_default = _CIFAR[variant]
    meta_path = os.path.join(src, meta_file)
    meta = _unpickle(meta_path)
    if names_key not in meta:
        raise ValueError(f"{meta_path}: missing key {names_key!r}")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    C = len(classes)
    tr_images, tr_labels = load_cifar_batches(src, train_files, label_key, C)
    te_images, te_labels = load_cifar_batches(src, [test_file], label_key, C)
    n_max = n_max if n_max is not None else n_max_default
    counts = longtail_counts(n_max, imbalance, C)
    train_idx, rest = cifar_subset(tr_labels, counts, convention, ldam_seed)
    k = val_per_class if val_per_class is not None else (20 if C == 100 else 200)
    val_idx, val_rule = val_from_unused(rest, k, seed)
    train_order = train_idx[train_shuffle(train_idx.size, seed)]

    splits = {"train": array_items(tr_images, tr_labels, train_order, "train", f"{variant} training images"),
              "val": array_items(tr_images, tr_labels, val_idx, "train", f"{variant} training images"),
              "test": array_items(te_images, te_labels, np.arange(te_labels.size), "test", f"{test_file} images")}
    if not splits["val"]:
        del splits["val"]
    source = {
        "converter": "tools/make_shards.py cifar", "dataset": variant, "src": os.path.abspath(src),
        "files_sha256": {f: sha256_file(os.path.join(src, f)) for f in [*train_files, test_file, meta_file]},
        "longtail": {"formula": LONGTAIL_FORMULA, "n_max": n_max, "imbalance": imbalance, "counts": counts},
        "convention": convention,
        "subset_rule": cifar_subset_rule(convention, ldam_seed),
        "val_rule": val_rule,
        "train_order": train_order_rule(seed, "file order"),
        "keys": "train_<index in the concatenated training files> (train and val), test_<index in the test file>",
        "seed": seed,
    }
    return SourceData(classes, splits, source, expected_counts=counts)
