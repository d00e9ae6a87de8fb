"""OLTR-style split lists, one ``relative/path label`` per line (ImageNet-LT, Places-LT)."""
from __future__ import annotations

import os
from typing import Optional

from ..convert import Item
from ..holdout import split_items
from ..writer import sha256_file
from . import SourceData, require_dir

HELP = "OLTR text lists 'relative/path label' (ImageNet-LT, Places-LT)"
DESCRIPTION = (
    "Shards from OLTR-style split lists (one 'relative/path label' per line, paths relative to --src), as "
    "redistributed by facebookresearch/classifier-balancing. C = the number of names in --classes-file, else "
    "--num-classes, else max training label + 1; class names default to '0'..'C-1'. Without --val-list, a validation "
    "split is held out of the decodable training images (--val-per-class / --val-max-fraction / --val-min-count, "
    "docs/data.md); a val list sharing an image with the test list is refused.\n\nExamples:\n"
    "  python tools/make_shards.py list --src /data/imagenet --train-list ImageNet_LT_train.txt "
    "--val-list ImageNet_LT_val.txt --test-list ImageNet_LT_test.txt --out data/imagenet_lt "
    "--resize 256 --workers 16\n"
    "  python tools/make_shards.py list --src /data/places365_standard --train-list "
    "Places_LT_train.txt --val-list Places_LT_val.txt --test-list Places_LT_test.txt "
    "--out data/places_lt --resize 256 --workers 16")


def parse_list(path: str) -> list[tuple[int, str, int]]:
    """``(line number, relative path, label)`` per non-blank line of an OLTR list ``relative/path label``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = line.strip()
            if not text:
                continue
            parts = text.rsplit(None, 1)
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
            except ValueError:
                raise ValueError(f"{path} line {n}: expected '<relative/path> <integer label>', got {text!r}") from None
            if label < 0:
                raise ValueError(f"{path} line {n}: label {label} is negative")
            out.append((n, parts[0], label))
    if not out:
        raise ValueError(f"{path}: no entries")
    return out


def read_class_names(path: str) -> list[str]:
    """One class name per line (line i names class i)."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f]
    while names and not names[-1]:
        names.pop()
    for n, name in enumerate(names, 1):
        if not name:
            raise ValueError(f"{path} line {n}: empty class name")
    return names


def load(src: str, *, train_list: str, val_list: Optional[str] = None, test_list: Optional[str] = None,
         classes_file: Optional[str] = None, num_classes: Optional[int] = None,
         val_per_class: Optional[int] = None, val_max_fraction: Optional[float] = None,
         val_min_count: Optional[int] = None, seed: int = 0) -> SourceData:
    root = require_dir(src)
    lists = {"train": train_list, "val": val_list, "test": test_list}
    if val_list and test_list and os.path.isfile(val_list) and os.path.isfile(test_list) \
            and os.path.samefile(val_list, test_list):
        raise ValueError(f"--val-list {val_list} and --test-list {test_list} are the same file: model selection "
                         f"would see the test set (give a val list disjoint from the test list, or none)")
    parsed = {s: parse_list(p) for s, p in lists.items() if p}
    max_train = max(lab for _, _, lab in parsed["train"])
    if classes_file:
        classes = read_class_names(classes_file)
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"--num-classes {num_classes} but {classes_file} names {len(classes)} classes")
        c_from = f"{len(classes)} names in {classes_file}"
    else:
        n = num_classes if num_classes is not None else max_train + 1
        classes = [str(c) for c in range(n)]
        c_from = f"--num-classes {n}" if num_classes is not None else f"max label + 1 of {train_list}"
    C = len(classes)
    items = {}
    for split, entries in parsed.items():
        items[split] = []
        for n, rel, label in entries:
            if label >= C:
                raise ValueError(f"{lists[split]} line {n}: label {label} outside [0, {C}) ({C} classes: {c_from})")
            items[split].append(Item(f"{split}_{n:07d}", os.path.join(root, rel.lstrip("/")), label,
                                     f"{lists[split]} line {n}"))
    splits, notes, holdout = split_items(items["train"], items.get("val"), items.get("test"), C,
                                         val_per_class=val_per_class, val_max_fraction=val_max_fraction,
                                         val_min_count=val_min_count, seed=seed, val_flag="--val-list")
    source = {"converter": "tools/make_shards.py list", "src": os.path.abspath(root),
              "lists": {s: {"path": os.path.abspath(p), "sha256": sha256_file(p)} for s, p in lists.items() if p},
              "num_classes_from": c_from,
              "keys": "<split>_<line number in that split's list> (held-out val keeps its train_ key)", **notes,
              "seed": seed}
    return SourceData(classes, splits, source, holdout=holdout)
