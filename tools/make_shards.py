#!/usr/bin/env python
"""Convert image datasets into bigltr's WebDataset shards (``<split>-NNNNNN.tar`` + ``_info.json``).

Subcommands (one per source format; the shared machinery lives in ``bigltr.data``):

  imagefolder  ROOT/{train,val,test}/<class>/<image> trees (val/ and test/ optional)
  list         OLTR-style text lists "relative/path label" (ImageNet-LT, Places-LT) under an image root
  inat         iNaturalist 2018/2019/2021 COCO-style JSON (iNat's val set becomes the test split)
  cifar        CIFAR-10 / CIFAR-100 python pickles -> CIFAR-LT (LDAM-DRW or official weight-balancing subset)
  idx          MNIST / Fashion-MNIST idx files -> long-tailed train (LDAM-DRW profile), balanced val held out
               from the official training set, and the official test set
  verify       check an existing shard folder: every shard present, sizes/sha256 as recorded, sample counts
               and labels as _info.json says (exit 1 and one line per problem otherwise)

Every image is decoded once during conversion: a file that exists but does not decode is skipped and listed
in OUT/conversion_report.json (the conversion fails if more than --max-skip-fraction of a split is skipped);
a missing file, a malformed list line or an out-of-range label is an error naming the file and line.
See docs/data.md for the shard format and full examples.

Example (Fashion-MNIST-LT, imbalance 100, as in the project's measurements)::

    python tools/make_shards.py idx --src /usr/share/datasets/fashion-mnist --out data/fmnist_lt
    python tools/make_shards.py cifar --src cifar-100-python --out data/cifar100_lt_if100 --imbalance 100
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

try:
    import bigltr.data  # noqa: F401
except ImportError:
    # Run as `python tools/make_shards.py` from a checkout without `pip install -e .`: make the repository
    # root (the parent of tools/) importable so that `bigltr` resolves to this checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bigltr.data.convert import (  # noqa: E402
    IMG_EXTENSIONS, EncodeOptions, Item, convert, holdout_per_class, train_shuffle,
)
from bigltr.data.longtail import holdout_and_longtail, longtail_counts  # noqa: E402
from bigltr.data.writer import write_dataset  # noqa: E402

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]


# --------------------------------------------------------------------------------------------- shared parts
_FORMAT_HELP = {
    "png": "image encoding inside the shards (default png, lossless)",
    "keep": "image encoding inside the shards: keep (default) stores each original JPEG/PNG/WebP file's bytes "
            "unchanged after checking that it decodes (other formats become PNG; with --resize or "
            "--jpeg-quality, JPEGs are re-encoded as JPEG and others as PNG); png or jpg re-encode every image",
}


def add_output_args(p: argparse.ArgumentParser, *, formats: tuple = ("png", "jpg"), default_format: str = "png"
                    ) -> None:
    """Options every subcommand shares: output folder, shard size, image format."""
    p.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    p.add_argument("--name", default=None, help="dataset name stored in _info.json (default: basename of --out)")
    p.add_argument("--maxcount", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--maxsize", type=float, default=None,
                   help="optional max bytes per shard: a new shard starts once one holds this much (e.g. 1e9)")
    p.add_argument("--format", dest="image_format", choices=formats, default=default_format,
                   help=_FORMAT_HELP[default_format])
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_longtail_args(p: argparse.ArgumentParser, *, n_max: int, val_per_class: int) -> None:
    """Options of subcommands that cut a long-tailed training split out of a balanced pool."""
    p.add_argument("--imbalance", type=float, default=100.0,
                   help="imbalance factor n_max / n_min of the exponential profile (default 100; 1 = balanced)")
    p.add_argument("--n-max", type=int, default=n_max, help=f"training images of class 0 (default {n_max})")
    p.add_argument("--val-per-class", type=int, default=val_per_class,
                   help=f"balanced validation images per class, held out first (default {val_per_class})")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out, long-tail and shard order (default 0)")


def add_convert_args(p: argparse.ArgumentParser, *, val_help: str, val_default_text: str) -> None:
    """Options of the converters that decode images in parallel (imagefolder, list, inat, cifar)."""
    p.add_argument("--val-per-class", type=int, default=None, help=f"{val_help} (default {val_default_text})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the validation hold-out and of the training split's shard order (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes that read, check and encode images (default: all cores); the output does "
                        "not depend on it")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="shrink every image so that its shorter side is S pixels, keeping the aspect ratio "
                        "(smaller images are left as they are); forces a re-encode")
    p.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="JPEG quality of re-encoded JPEGs (default 95); giving it re-encodes JPEG originals")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="fail if more than this fraction of a split's images cannot be decoded (default 0.01); "
                        "skipped images are listed in OUT/conversion_report.json")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def print_summary(info: dict, seconds: float) -> None:
    """Per-class counts of every split, then totals."""
    classes = info["classes"]
    splits = info["splits"]
    per_split = {
        s: [sum(h[c] for h in e.get("class_hist", [])) for c in range(len(classes))] for s, e in splits.items()
    }
    shown = list(range(len(classes)))
    if len(classes) > 40:  # iNat has 8,142 classes: head and tail only
        shown = shown[:10] + [-1] + shown[-10:]
    width = min(30, max(8, max(len(classes[c]) for c in shown if c >= 0)))
    header = f"{'class':>{width}}  " + "  ".join(f"{s:>7}" for s in splits)
    print(f"\n{info['name']}: {len(classes)} classes")
    print(header)
    for c in shown:
        if c < 0:
            print(f"{'...':>{width}}")
            continue
        print(f"{classes[c][:width]:>{width}}  " + "  ".join(f"{per_split[s][c]:>7d}" for s in splits))
    print(f"{'total':>{width}}  " + "  ".join(f"{splits[s]['num_samples']:>7d}" for s in splits))
    print("shards: " + ", ".join(f"{s} {len(e['filenames'])}" for s, e in splits.items())
          + f"; written in {seconds:.1f} s")


# --------------------------------------------------------------------------------------------- idx format
_IDX_DTYPES = {0x08: np.uint8}


def find_idx_file(src: str, stem: str) -> str:
    """``src/stem`` or ``src/stem.gz``, whichever exists."""
    for cand in (stem, stem + ".gz"):
        path = os.path.join(src, cand)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {stem} or {stem}.gz in {src}")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Parse an idx file (gzipped or not): magic 0x0000 <dtype 0x08> <ndim>, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # bad gzip stream, truncated file
        raise ValueError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an idx file ({len(raw)} bytes)")
    zero, dtype_code, nd = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or nd != ndim:
        raise ValueError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000080{ndim}: unsigned byte data "
            f"with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    head = 4 + 4 * nd
    if len(raw) < head:
        raise ValueError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(nd)]
    expected = int(np.prod(dims))
    if len(raw) - head != expected:
        raise ValueError(
            f"{path}: idx header says dims {dims} ({expected} bytes of data) but the file holds {len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[dtype_code], offset=head).reshape(dims)


def load_idx_pair(src: str, prefix: str) -> tuple[np.ndarray, np.ndarray, dict]:
    img_path = find_idx_file(src, f"{prefix}-images-idx3-ubyte")
    lbl_path = find_idx_file(src, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path, 3), read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    files = {os.path.basename(p): sha256_file(p) for p in (img_path, lbl_path)}
    return images, labels.astype(np.int64), files


def cmd_idx(args: argparse.Namespace) -> dict:
    src = args.src
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a folder")
    classes = args.classes.split(",") if args.classes else (
        FASHION_MNIST_CLASSES if args.dataset == "fashion-mnist" else MNIST_CLASSES
    )
    num_classes = len(classes)
    tr_images, tr_labels, tr_files = load_idx_pair(src, "train")
    te_images, te_labels, te_files = load_idx_pair(src, "t10k")
    for what, lab in (("train", tr_labels), ("t10k", te_labels)):
        if lab.size and lab.max() >= num_classes:
            raise ValueError(f"{what} labels reach {int(lab.max())}, but there are only {num_classes} class names")

    counts = longtail_counts(args.n_max, args.imbalance, num_classes)
    train_idx, val_idx = holdout_and_longtail(tr_labels, num_classes, counts, args.val_per_class, args.seed)
    # Train shards in a seeded shuffled order (so each shard mixes classes); val/test in file order.
    train_order = train_idx[np.random.default_rng([args.seed, 1]).permutation(train_idx.size)]
    val_order = np.sort(val_idx)

    def samples(images, labels, order, prefix):
        for i in order:
            i = int(i)
            yield f"{prefix}_{i:05d}", images[i], int(labels[i])

    name = args.name or os.path.basename(os.path.normpath(args.out))
    source = {
        "converter": "tools/make_shards.py idx",
        "dataset": args.dataset if not args.classes else "custom",
        "src": os.path.abspath(src),
        "files_sha256": {**tr_files, **te_files},
        "longtail": {"formula": "int(n_max * (1/imbalance) ** (c / (C-1)))  # LDAM-DRW",
                     "n_max": args.n_max, "imbalance": args.imbalance, "counts": counts},
        "val_per_class": args.val_per_class,
        "seed": args.seed,
        "split_rule": "per class: numpy default_rng(seed) permutation; first val_per_class -> val, next n_c -> "
                      "train; train shard order default_rng([seed, 1]); test = official t10k set",
        "keys": "train_<index in train-*-ubyte> (train and val), t10k_<index in t10k-*-ubyte> (test)",
        "image_format": args.image_format,
        "maxcount": args.maxcount,
    }
    info = write_dataset(
        args.out, name=name, classes=classes, source=source,
        splits={
            "train": (samples(tr_images, tr_labels, train_order, "train"), train_order.size),
            "val": (samples(tr_images, tr_labels, val_order, "train"), val_order.size),
            "test": (samples(te_images, te_labels, np.arange(te_labels.size), "t10k"), te_labels.size),
        },
        maxcount=args.maxcount, maxsize=args.maxsize, image_format=args.image_format,
        overwrite=args.overwrite, progress=args.progress,
    )
    if info["class_counts"] != counts:  # cheap self-check of the whole chain
        raise RuntimeError(f"written class counts {info['class_counts']} differ from the profile {counts}")
    return info


# --------------------------------------------------------------------------------------------- shared by the
# --------------------------------------------------------------------------------------------- image converters
def _warn(msg: str) -> None:
    print(f"make_shards.py: warning: {msg}", file=sys.stderr)


def finish_splits(train: list, val: list | None, test: list | None, num_classes: int, args: argparse.Namespace,
                  *, val_flag: str, default_k: int = 5) -> tuple[dict, dict]:
    """Hold a validation split out of ``train`` when none is given, then shuffle ``train`` (seeded).

    Returns ``({split: [Item, ...]}, provenance notes for _info.json)``.
    """
    notes: dict = {"source_train_class_counts": np.bincount([it.label for it in train],
                                                            minlength=num_classes).tolist()}
    if val is not None:
        if args.val_per_class is not None:
            raise ValueError(f"--val-per-class holds a validation split out of train, but {val_flag} already "
                             f"gives one: pass only one of them")
        notes["val_rule"] = f"given by {val_flag}"
    else:
        k = default_k if args.val_per_class is None else int(args.val_per_class)
        tr, va = holdout_per_class(np.array([it.label for it in train], dtype=np.int64), num_classes, k, args.seed)
        val = [train[i] for i in va]
        train = [train[i] for i in tr]
        notes["val_rule"] = (f"held out of the training images: min({k}, n_c // 2) per class, drawn with "
                             f"numpy default_rng({args.seed}); train = the rest" if k else "none")
    empty = [c for c, n in enumerate(np.bincount([it.label for it in train], minlength=num_classes)) if n == 0]
    if empty:
        _warn(f"{len(empty)} class(es) have no training image (first: {empty[:5]})")
    train = [train[i] for i in train_shuffle(len(train), args.seed)]
    splits = {"train": train}
    if val:
        splits["val"] = val
    else:
        _warn(f"no val split (give {val_flag} or --val-per-class K > 0): bigltr's trainer needs train, val and test")
    if test:
        splits["test"] = test
    else:
        _warn("no test split: bigltr's trainer needs train, val and test")
    notes["train_order"] = f"shuffled with numpy default_rng([{args.seed}, 1]); val and test in source order"
    return splits, notes


def run_convert(args: argparse.Namespace, *, classes: list[str], splits: dict, source: dict,
                extra: dict | None = None) -> dict:
    """The common tail of every image converter: encode options, workers, shard size, report, _info.json."""
    opts = EncodeOptions(image_format=args.image_format, resize=args.resize, jpeg_quality=args.jpeg_quality)
    name = args.name or os.path.basename(os.path.normpath(args.out))
    source = {**source, "seed": args.seed, "maxcount": args.maxcount, "maxsize": args.maxsize}
    return convert(args.out, name=name, classes=classes, splits=splits, source=source, opts=opts,
                   workers=args.workers, max_skip_fraction=args.max_skip_fraction, maxcount=args.maxcount,
                   maxsize=args.maxsize, overwrite=args.overwrite, progress=args.progress, extra=extra)


def _require_dir(path: str, flag: str = "--src") -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path} is not a folder")
    return path


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# --------------------------------------------------------------------------------------------- imagefolder
def list_imagefolder(split_dir: str, split: str, class_to_idx: dict | None) -> tuple[list, list[str], int]:
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
                if not _is_image_name(fname):
                    ignored += 1
                    continue
                path = os.path.join(dirpath, fname)
                rel = os.path.relpath(path, os.path.dirname(split_dir))
                items.append(Item(f"{split}_{len(items):07d}", path, label, rel))
        if split == "train" and len(items) == start:
            raise ValueError(f"{os.path.join(split_dir, cname)}: training class folder '{cname}' holds no image "
                             f"file ({', '.join(IMG_EXTENSIONS)})")
    return items, names, ignored


def cmd_imagefolder(args: argparse.Namespace) -> dict:
    root = _require_dir(args.src)
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
    splits, notes = finish_splits(train, found.get("val"), found.get("test"), len(classes), args,
                                  val_flag="a val/ folder")
    source = {"converter": "tools/make_shards.py imagefolder", "src": os.path.abspath(root),
              "splits_found": ["train", *found], "ignored_non_image_files": ignored,
              "keys": "<split>_<position in torchvision ImageFolder order of ROOT/<split>> (held-out val keeps "
                      "its train_ key)", **notes}
    return run_convert(args, classes=classes, splits=splits, source=source)


# --------------------------------------------------------------------------------------------- list
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


def cmd_list(args: argparse.Namespace) -> dict:
    root = _require_dir(args.src)
    lists = {"train": args.train_list, "val": args.val_list, "test": args.test_list}
    parsed = {s: parse_list(p) for s, p in lists.items() if p}
    max_train = max(lab for _, _, lab in parsed["train"])
    if args.classes_file:
        classes = read_class_names(args.classes_file)
        if args.num_classes is not None and args.num_classes != len(classes):
            raise ValueError(f"--num-classes {args.num_classes} but {args.classes_file} names {len(classes)} classes")
        c_from = f"{len(classes)} names in {args.classes_file}"
    else:
        n = args.num_classes if args.num_classes is not None else max_train + 1
        classes = [str(c) for c in range(n)]
        c_from = f"--num-classes {n}" if args.num_classes is not None else f"max label + 1 of {args.train_list}"
    num_classes = len(classes)
    items = {}
    for split, entries in parsed.items():
        items[split] = []
        for n, rel, label in entries:
            if label >= num_classes:
                raise ValueError(f"{lists[split]} line {n}: label {label} outside [0, {num_classes}) "
                                 f"({num_classes} classes: {c_from})")
            items[split].append(Item(f"{split}_{n:07d}", os.path.join(root, rel.lstrip("/")), label,
                                     f"{lists[split]} line {n}"))
    splits, notes = finish_splits(items["train"], items.get("val"), items.get("test"), num_classes, args,
                                  val_flag="--val-list")
    source = {"converter": "tools/make_shards.py list", "src": os.path.abspath(root),
              "lists": {s: {"path": os.path.abspath(p), "sha256": sha256_file(p)} for s, p in lists.items() if p},
              "num_classes_from": c_from,
              "keys": "<split>_<line number in that split's list> (held-out val keeps its train_ key)", **notes}
    return run_convert(args, classes=classes, splits=splits, source=source)


# --------------------------------------------------------------------------------------------- inat
def load_coco_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"JSON file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object with images, annotations and categories")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing list '{key}' (COCO-style: images[{{id, file_name}}], "
                             f"annotations[{{image_id, category_id}}], categories[{{id, name}}])")
    return data


def inat_items(path: str, data: dict, root: str, split: str, cat_to_label: dict) -> list:
    """One item per image of a COCO-style JSON; every image needs exactly one known-category annotation."""
    ids = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        if im["id"] in ids:
            raise ValueError(f"{path}: images[{i}] repeats image id {im['id']} (first at images[{ids[im['id']]}])")
        ids[im["id"]] = i
    label_of: dict = {}
    for j, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise ValueError(f"{path}: annotations[{j}] needs 'image_id' and 'category_id'")
        if a["image_id"] not in ids:
            raise ValueError(f"{path}: annotations[{j}]: image_id {a['image_id']} is not in images")
        if a["category_id"] not in cat_to_label:
            raise ValueError(f"{path}: annotations[{j}] (image_id {a['image_id']}): unknown category_id "
                             f"{a['category_id']!r} (not among the {len(cat_to_label)} categories of the "
                             f"training JSON)")
        if a["image_id"] in label_of:
            raise ValueError(f"{path}: annotations[{j}]: image_id {a['image_id']} has a second annotation")
        label_of[a["image_id"]] = cat_to_label[a["category_id"]]
    items = []
    for i, im in enumerate(data["images"]):
        if im["id"] not in label_of:
            raise ValueError(f"{path}: images[{i}] (id {im['id']}, {im['file_name']}) has no annotation "
                             f"(an unlabelled test set cannot be converted)")
        items.append(Item(f"{split}_{i:07d}", os.path.join(root, im["file_name"].lstrip("/")), label_of[im["id"]],
                          f"{path} images[{i}] (id {im['id']})"))
    return items


def cmd_inat(args: argparse.Namespace) -> dict:
    root = _require_dir(args.src)
    train_data = load_coco_json(args.train_json)
    cats = train_data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{args.train_json}: missing or empty list 'categories'")
    by_id = {}
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict) or isinstance(cat.get("id"), bool) or not isinstance(cat.get("id"), int):
            raise ValueError(f"{args.train_json}: categories[{k}] needs an integer 'id'")
        if cat["id"] in by_id:
            raise ValueError(f"{args.train_json}: categories[{k}] repeats category id {cat['id']}")
        by_id[cat["id"]] = cat
    category_ids = sorted(by_id)
    cat_to_label = {cid: i for i, cid in enumerate(category_ids)}
    classes = [str(by_id[cid].get("name", cid)) for cid in category_ids]
    train = inat_items(args.train_json, train_data, root, "train", cat_to_label)
    del train_data
    evals = {}
    for flag, path in (("--val-json", args.val_json), ("--test-json", args.test_json)):
        if path:
            evals[flag] = inat_items(path, load_coco_json(path), root, "val" if flag == "--val-json" else "test",
                                     cat_to_label)
    if args.test_json:  # a labelled test set: --val-json is the validation split
        val, test, flag = evals.get("--val-json"), evals["--test-json"], "--val-json"
    else:  # iNat convention: the official val set is the test set
        val, test, flag = None, evals.get("--val-json"), "--test-json (--val-json then becomes val)"
        if test is not None:
            test = [it._replace(key="test" + it.key[3:]) for it in test]
    splits, notes = finish_splits(train, val, test, len(classes), args, val_flag=flag)
    source = {"converter": "tools/make_shards.py inat", "src": os.path.abspath(root),
              "json": {f: {"path": os.path.abspath(p), "sha256": sha256_file(p)} for f, p in
                       (("train", args.train_json), ("val", args.val_json), ("test", args.test_json)) if p},
              "test_split": "--test-json" if args.test_json else "--val-json (iNat convention: val is the test set)",
              "labels": "categories sorted by id -> 0..C-1; category_ids[label] = original id",
              "keys": "<split>_<position in that JSON's images list> (held-out val keeps its train_ key)", **notes}
    return run_convert(args, classes=classes, splits=splits, source=source, extra={"category_ids": category_ids})


# --------------------------------------------------------------------------------------------- cifar
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


def cifar_subset(labels: np.ndarray, counts: list[int], convention: str, ldam_seed: int = 0
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Training indices of CIFAR-LT (grouped by class) and, per class, the unused indices (sorted).

    ldam: ``np.random.seed(ldam_seed)``, then per class 0..C-1 ``np.random.shuffle(idx)``, first n_c (LDAM-DRW).
    official: first n_c of each class in file order (ShadeAlsha/LTR-weight-balancing, no shuffle).
    """
    rs = np.random.RandomState(ldam_seed)  # the legacy global-seed stream LDAM-DRW uses
    train, rest = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if idx.size < n:
            raise ValueError(f"class {c} has {idx.size} training images, fewer than the {n} the profile needs "
                             f"(lower --n-max)")
        if convention == "ldam":
            rs.shuffle(idx)
        train.append(idx[:n])
        rest.append(np.sort(idx[n:]))
    return np.concatenate(train), rest


def cmd_cifar(args: argparse.Namespace) -> dict:
    src = _require_dir(args.src)
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
    n_max = args.n_max if args.n_max is not None else n_max_default
    counts = longtail_counts(n_max, args.imbalance, C)
    train_idx, rest = cifar_subset(tr_labels, counts, args.convention, args.ldam_seed)
    k = args.val_per_class if args.val_per_class is not None else (20 if C == 100 else 200)
    if k < 0:
        raise ValueError(f"--val-per-class must be >= 0, got {k}")
    rng = np.random.default_rng(args.seed)
    val_idx = np.sort(np.concatenate([r[np.sort(rng.permutation(r.size)[:min(k, r.size)])] for r in rest]))
    short = [c for c, r in enumerate(rest) if r.size < k]
    if short and k:
        _warn(f"val: {len(short)} class(es) have fewer than {k} unused training images and get fewer "
              f"validation images (class {short[0]}: {rest[short[0]].size})")
    if val_idx.size == 0:
        _warn("no val split (--val-per-class 0): bigltr's trainer needs train, val and test")
    train_order = train_idx[train_shuffle(train_idx.size, args.seed)]

    def items(images, labels, order, prefix, origin):
        return [Item(f"{prefix}_{int(i):05d}", images[int(i)], int(labels[int(i)]), f"{origin}[{int(i)}]")
                for i in order]

    splits = {"train": items(tr_images, tr_labels, train_order, "train", f"{variant} training images"),
              "val": items(tr_images, tr_labels, val_idx, "train", f"{variant} training images"),
              "test": items(te_images, te_labels, np.arange(te_labels.size), "test", f"{test_file} images")}
    if not splits["val"]:
        del splits["val"]
    source = {
        "converter": "tools/make_shards.py cifar", "dataset": variant, "src": os.path.abspath(src),
        "files_sha256": {f: sha256_file(os.path.join(src, f)) for f in [*train_files, test_file, meta_file]},
        "longtail": {"formula": "int(n_max * (1/imbalance) ** (c / (C-1)))  # LDAM-DRW", "n_max": n_max,
                     "imbalance": args.imbalance, "counts": counts},
        "convention": args.convention,
        "subset_rule": (f"ldam: numpy.random.seed({args.ldam_seed}), per class 0..C-1 np.random.shuffle(indices), "
                        f"first n_c (LDAM-DRW)" if args.convention == "ldam" else
                        "official: first n_c images of each class in file order (LTR-weight-balancing)"),
        "val_rule": (f"up to {k} per class from the training images the long-tailed subset leaves unused "
                     f"(numpy default_rng({args.seed})), so the standard train set is unchanged; a class with "
                     f"no unused image (n_c = pool size, e.g. class 0) gets no validation image"),
        "train_order": f"shuffled with numpy default_rng([{args.seed}, 1]); val and test in file order",
        "keys": "train_<index in the concatenated training files> (train and val), test_<index in the test file>",
    }
    info = run_convert(args, classes=classes, splits=splits, source=source)
    if info["class_counts"] != counts:
        raise RuntimeError(f"written class counts {info['class_counts']} differ from the profile {counts}")
    return info


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="FORMAT", required=True)

    p = sub.add_parser("idx", help="MNIST / Fashion-MNIST idx files (gzipped or not)",
                       description="Long-tailed shards from MNIST-style idx files: "
                                   "train-{images-idx3,labels-idx1}-ubyte[.gz] and t10k-... in --src.")
    p.add_argument("--src", required=True, help="folder holding the four idx files")
    p.add_argument("--dataset", choices=("fashion-mnist", "mnist"), default="fashion-mnist",
                   help="names the classes (default fashion-mnist)")
    p.add_argument("--classes", default=None, help="comma-separated class names (overrides --dataset)")
    add_longtail_args(p, n_max=5000, val_per_class=200)
    add_output_args(p)
    p.set_defaults(func=cmd_idx)

    p = sub.add_parser(
        "imagefolder", help="ROOT/{train,val,test}/<class>/<image> folder trees",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Shards from ImageFolder trees: --src ROOT holds train/ (required), val/ and test/ "
                    "(optional), each with one folder per class (images found recursively, torchvision "
                    "ImageFolder order and extensions). Class ids follow the sorted training class names; a "
                    "class folder in val/ or test/ that train/ lacks is an error. Without val/, --val-per-class "
                    "images per class are held out of train.\n\nExample:\n  python tools/make_shards.py "
                    "imagefolder --src /data/my_lt --out data/my_lt --resize 256 --format jpg --workers 16")
    p.add_argument("--src", required=True, help="folder holding train/ and optionally val/ and test/")
    add_convert_args(p, val_help="without val/: validation images held out of train per class, at most half "
                                 "of a class; 0 = no val split", val_default_text="5")
    add_output_args(p, formats=("keep", "png", "jpg"), default_format="keep")
    p.set_defaults(func=cmd_imagefolder)

    p = sub.add_parser(
        "list", help="OLTR text lists 'relative/path label' (ImageNet-LT, Places-LT)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Shards from OLTR-style split lists (one 'relative/path label' per line, paths relative to "
                    "--src), as redistributed by facebookresearch/classifier-balancing. C = the number of names "
                    "in --classes-file, else --num-classes, else max training label + 1; class names default "
                    "to '0'..'C-1'.\n\nExamples:\n"
                    "  python tools/make_shards.py list --src /data/imagenet --train-list ImageNet_LT_train.txt "
                    "--val-list ImageNet_LT_val.txt --test-list ImageNet_LT_test.txt --out data/imagenet_lt "
                    "--resize 256 --workers 16\n"
                    "  python tools/make_shards.py list --src /data/places365_standard --train-list "
                    "Places_LT_train.txt --val-list Places_LT_val.txt --test-list Places_LT_test.txt "
                    "--out data/places_lt --resize 256 --workers 16")
    p.add_argument("--src", required=True,
                   help="image root the list paths are relative to (a leading '/' in a list path is ignored)")
    p.add_argument("--train-list", required=True, help="training list (e.g. ImageNet_LT_train.txt)")
    p.add_argument("--val-list", default=None, help="validation list (e.g. ImageNet_LT_val.txt)")
    p.add_argument("--test-list", default=None, help="test list (e.g. ImageNet_LT_test.txt)")
    p.add_argument("--classes-file", default=None, help="class names, one per line (line i names label i)")
    p.add_argument("--num-classes", type=int, default=None, help="number of classes (default: max train label + 1)")
    add_convert_args(p, val_help="without --val-list: validation images held out of train per class, at most "
                                 "half of a class; 0 = no val split", val_default_text="5")
    add_output_args(p, formats=("keep", "png", "jpg"), default_format="keep")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "inat", help="iNaturalist 2018/2019/2021 COCO-style JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Shards from iNaturalist COCO-style JSON (images[{id, file_name}], annotations[{image_id, "
                    "category_id}], categories[{id, name}]); file names are relative to --src. Category ids "
                    "of the training JSON, sorted, become labels 0..C-1 (_info.json keeps category_ids[label] "
                    "= original id and the names).\n"
                    "Splits: by the iNat convention the official validation set (--val-json) is the TEST split, "
                    "and a validation split for model selection is held out of train (--val-per-class, default "
                    "5 per class, never more than half of a class), so model selection never sees the test "
                    "set. With a labelled --test-json, --val-json is the val split instead and nothing is held "
                    "out.\n\nExample (iNat 2018):\n  python tools/make_shards.py inat --src /data/inat2018 "
                    "--train-json train2018.json --val-json val2018.json --out data/inat2018 --resize 256 "
                    "--jpeg-quality 90 --workers 16 --maxsize 1e9")
    p.add_argument("--src", required=True, help="image root the JSON file_name paths are relative to")
    p.add_argument("--train-json", required=True, help="training JSON (e.g. train2018.json)")
    p.add_argument("--val-json", default=None, help="official validation JSON (e.g. val2018.json): the test split, "
                                                    "or the val split when --test-json is given")
    p.add_argument("--test-json", default=None, help="a labelled test JSON (optional; iNat's own test sets are "
                                                     "unlabelled)")
    add_convert_args(p, val_help="without --test-json: validation images held out of train per class, at most "
                                 "half of a class; 0 = no val split", val_default_text="5")
    add_output_args(p, formats=("keep", "png", "jpg"), default_format="keep")
    p.set_defaults(func=cmd_inat)

    p = sub.add_parser(
        "cifar", help="CIFAR-10/100 python pickles -> CIFAR-LT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="CIFAR-LT shards from the CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 "
                    "(train, test, meta) python files in --src. Train: n_c = int(n_max * (1/IF)^(c/(C-1))) "
                    "images of class c (CIFAR-100 IF 100/50/10: 10,847 / 12,608 / 19,573), chosen by "
                    "--convention: ldam (LDAM-DRW, the usual benchmark: per-class indices shuffled with "
                    "numpy seed 0 before truncation) or official (the weight-balancing code: first n_c in file "
                    "order). Test: the balanced official test set. Val: up to --val-per-class images per class "
                    "from the training images the subset leaves unused, so the standard train set is unchanged "
                    "and model selection never sees the test set; a class whose n_c equals its pool (class 0) "
                    "gets none.\n\nExample (CIFAR-100-LT IF100):\n  python tools/make_shards.py cifar --src "
                    "cifar-100-python --out data/cifar100_lt_if100 --imbalance 100")
    p.add_argument("--src", required=True, help="folder holding the CIFAR python files")
    p.add_argument("--imbalance", type=float, default=100.0, help="imbalance factor n_max / n_min (default 100)")
    p.add_argument("--n-max", type=int, default=None, help="training images of class 0 (default 5000 CIFAR-10, "
                                                           "500 CIFAR-100)")
    p.add_argument("--convention", choices=("ldam", "official"), default="ldam",
                   help="which images form the long-tailed subset (default ldam)")
    p.add_argument("--ldam-seed", type=int, default=0, help="numpy seed of the ldam convention (default 0)")
    add_convert_args(p, val_help="validation images per class, from the training images the long-tailed subset "
                                 "leaves unused; 0 = no val split", val_default_text="20 CIFAR-100, 200 CIFAR-10")
    add_output_args(p, formats=("png", "jpg"), default_format="png")
    p.set_defaults(func=cmd_cifar)

    p = sub.add_parser("verify", help="check a shard folder against its _info.json",
                       description="Check every shard listed in DIR/_info.json: present, byte size and sha256 as "
                                   "recorded, and exactly shard_lengths[i] samples with a label in range. Prints "
                                   "one line per problem and a summary; exit status 0 when clean, 1 otherwise.")
    p.add_argument("dir", metavar="DIR", help="folder holding _info.json and the shards")
    p.add_argument("--split", action="append", default=None, help="check only this split (repeatable)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow on large data)")
    p.set_defaults(func=cmd_verify)
    return parser


def cmd_verify(args: argparse.Namespace) -> int:
    from bigltr.data.verify import verify_dataset

    report = verify_dataset(args.dir, args.split, decode=args.decode, report=print)
    print(report.summary())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> dict:
    """Entry point; returns the ``_info.json`` dict written. User errors exit with a one-line message."""
    args = build_parser().parse_args(argv)
    if args.command == "verify":  # checks, writes nothing: exit status 0 (clean) or 1 (problems)
        raise SystemExit(cmd_verify(args))
    t0 = time.perf_counter()
    try:
        info = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"make_shards.py {args.command}: error: {e}") from e
    print_summary(info, time.perf_counter() - t0)
    skipped = info["source"].get("skipped")
    if skipped is not None:
        n = sum(skipped.values())
        print(f"skipped {n} undecodable image(s)" + (f" ({skipped})" if n else "")
              + f"; report: {os.path.join(args.out, 'conversion_report.json')}")
    print(f"wrote {os.path.join(args.out, '_info.json')}")
    return info


if __name__ == "__main__":
    main()
