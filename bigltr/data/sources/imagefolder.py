"""ImageFolder trees ``ROOT/{train,val,test}/<class>/<image>`` (torchvision order and extensions)."""
from __future__ import annotations

import os
from typing import Optional

from ..convert import Item
from ..decode import IMG_EXTENSIONS
from ..holdout import split_items
from . import SourceData, require_dir

HELP = "ROOT/{train,val,test}/<class>/<image> folder trees"
DESCRIPTION = (
    "Shards from ImageFolder trees: --src ROOT holds train/ (required), val/ and test/ (optional), each with one "
    "folder per class (images found recursively, torchvision ImageFolder order and extensions). Class ids follow "
    "the sorted training class names; a class folder in val/ or test/ that train/ lacks is an error. Without "
    "val/, a validation split is held out of the decodable training images (at most --val-per-class, default 5, and "
    "at most --val-max-fraction, default 0.1, of a class; nothing from a class under --val-min-count, default 10, "
    "images).\n\nExample:\n  python tools/make_shards.py "
    "imagefolder --src /data/my_lt --out data/my_lt --resize 256 --format jpg --workers 16")


def list_imagefolder(split_dir: str, split: str, class_to_idx: Optional[dict]) -> tuple[list, list[str], int]:
    """Items of one split folder, in torchvision ImageFolder order (sorted classes, sorted os.walk).

    ``class_to_idx`` None: the classes are this folder's subfolders (the training split).
    Returns ``(items, class names found, ignored non-image files)``.
    """
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(names)}
    items, ignored = [], 0
    for cname in names:
        if cname not in class_to_idx:
            raise ValueError(f"{os.path.join(split_dir, cname)}: class folder '{cname}' of split '{split}' is not "
                             f"a class of the training split ({len(class_to_idx)} classes in train/)")
        label, start = class_to_idx[cname], len(items)
        for dirpath, _, fnames in sorted(os.walk(os.path.join(split_dir, cname), followlinks=True)):
            for fname in sorted(fnames):
                if not fname.lower().endswith(IMG_EXTENSIONS):
                    ignored += 1
                    continue
                path = os.path.join(dirpath, fname)
                rel = os.path.relpath(path, os.path.dirname(split_dir))
                items.append(Item(f"{split}_{len(items):07d}", path, label, rel))
        if split == "train" and len(items) == start:
            raise ValueError(f"{os.path.join(split_dir, cname)}: training class folder '{cname}' holds no image "
                             f"file ({', '.join(IMG_EXTENSIONS)})")
    return items, names, ignored


def load(src: str, *, val_per_class: Optional[int] = None, val_max_fraction: Optional[float] = None,
         val_min_count: Optional[int] = None, seed: int = 0) -> SourceData:
    root = require_dir(src)
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"--src {root} has no train/ folder (expected ROOT/train/<class>/<image>, "
                                f"optional ROOT/val/... and ROOT/test/...)")
    train, classes, ignored = list_imagefolder(train_dir, "train", None)
    if not classes:
        raise ValueError(f"{train_dir} holds no class folder")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    found = {}
    for split in ("val", "test"):
        d = os.path.join(root, split)
        if os.path.isdir(d):
            found[split], _, n = list_imagefolder(d, split, class_to_idx)
            ignored += n
    if "val" in found and "test" in found and os.path.samefile(os.path.join(root, "val"), os.path.join(root, "test")):
        raise ValueError(f"{root}: val/ and test/ are the same folder: model selection would see the test set")
    splits, notes, holdout = split_items(train, found.get("val"), found.get("test"), len(classes),
                                         val_per_class=val_per_class, val_max_fraction=val_max_fraction,
                                         val_min_count=val_min_count, seed=seed, val_flag="a val/ folder")
    source = {"converter": "tools/make_shards.py imagefolder", "src": os.path.abspath(root),
              "splits_found": ["train", *found], "ignored_non_image_files": ignored,
              "keys": "<split>_<position in torchvision ImageFolder order of ROOT/<split>> (held-out val keeps "
                      "its train_ key)", **notes, "seed": seed}
    return SourceData(classes, splits, source, holdout=holdout)
