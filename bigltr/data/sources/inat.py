"""iNaturalist 2018 / 2019 / 2021 COCO-style JSON (``images``, ``annotations``, ``categories``)."""
from __future__ import annotations

import json
import os
from typing import Optional

from ..convert import Item
from ..holdout import split_items
from ..writer import sha256_file
from . import SourceData, require_dir

HELP = "iNaturalist 2018/2019/2021 COCO-style JSON"
DESCRIPTION = (
    "Shards from iNaturalist COCO-style JSON (images[{id, file_name}], annotations[{image_id, category_id}], "
    "categories[{id, name}]); file names are relative to --src. Category ids of the training JSON, sorted, "
    "become labels 0..C-1 (_info.json keeps category_ids[label] = original id and the names).\n"
    "Splits: by the iNat convention the official validation set (--val-json) is the TEST split, and a validation "
    "split for model selection is held out of the decodable training images, never from the tail: nothing from a "
    "class under --val-min-count (default 10) images, at most --val-max-fraction (default 0.1) and at most "
    "--val-per-class (default 5) of any class; 0 = no val split. Model selection never sees the test set; the "
    "Many/Medium/Few groups use the official training counts (_info.json official_train_counts). With a labelled "
    "--test-json, --val-json is the val split instead and nothing is held out (the same file for both is "
    "refused).\n\nExample (iNat 2018):\n  python tools/make_shards.py inat "
    "--src /data/inat2018 --train-json train2018.json --val-json val2018.json --out data/inat2018 --resize 256 "
    "--jpeg-quality 90 --workers 16 --maxsize 1e9")


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


def _categories(train_json: str, data: dict) -> tuple[list[int], list[str]]:
    """The training JSON's category ids, sorted (label -> id), and their names."""
    cats = data.get("categories")
    if not isinstance(cats, list) or not cats:
        raise ValueError(f"{train_json}: missing or empty list 'categories'")
    by_id = {}
    for k, cat in enumerate(cats):
        if not isinstance(cat, dict) or isinstance(cat.get("id"), bool) or not isinstance(cat.get("id"), int):
            raise ValueError(f"{train_json}: categories[{k}] needs an integer 'id'")
        if cat["id"] in by_id:
            raise ValueError(f"{train_json}: categories[{k}] repeats category id {cat['id']}")
        by_id[cat["id"]] = cat
    category_ids = sorted(by_id)
    return category_ids, [str(by_id[cid].get("name", cid)) for cid in category_ids]


def load(src: str, *, train_json: str, val_json: Optional[str] = None, test_json: Optional[str] = None,
         val_per_class: Optional[int] = None, val_max_fraction: Optional[float] = None,
         val_min_count: Optional[int] = None, seed: int = 0) -> SourceData:
    root = require_dir(src)
    if val_json and test_json and os.path.isfile(val_json) and os.path.isfile(test_json) \
            and os.path.samefile(val_json, test_json):
        raise ValueError(f"--val-json {val_json} and --test-json {test_json} are the same file: model selection "
                         f"would see the test set (give a validation JSON disjoint from the test JSON, or only "
                         f"--val-json: it is then the test split and val is held out of train)")
    train_data = load_coco_json(train_json)
    category_ids, classes = _categories(train_json, train_data)
    cat_to_label = {cid: i for i, cid in enumerate(category_ids)}
    train = inat_items(train_json, train_data, root, "train", cat_to_label)
    del train_data
    evals = {}
    for flag, path in (("--val-json", val_json), ("--test-json", test_json)):
        if path:
            evals[flag] = inat_items(path, load_coco_json(path), root, "val" if flag == "--val-json" else "test",
                                     cat_to_label)
    if test_json:  # a labelled test set: --val-json is the validation split
        val, test, flag = evals.get("--val-json"), evals["--test-json"], "--val-json"
    else:  # iNat convention: the official val set is the test set
        val, test, flag = None, evals.get("--val-json"), "--test-json (--val-json then becomes val)"
        if test is not None:
            test = [it._replace(key="test" + it.key[3:]) for it in test]
    splits, notes, holdout = split_items(train, val, test, len(classes), val_per_class=val_per_class,
                                         val_max_fraction=val_max_fraction, val_min_count=val_min_count, seed=seed,
                                         val_flag=flag)
    source = {"converter": "tools/make_shards.py inat", "src": os.path.abspath(root),
              "json": {f: {"path": os.path.abspath(p), "sha256": sha256_file(p)} for f, p in
                       (("train", train_json), ("val", val_json), ("test", test_json)) if p},
              "test_split": "--test-json" if test_json else "--val-json (iNat convention: val is the test set)",
              "labels": "categories sorted by id -> 0..C-1; category_ids[label] = original id",
              "keys": "<split>_<position in that JSON's images list> (held-out val keeps its train_ key)", **notes,
              "seed": seed}
    return SourceData(classes, splits, source, extra={"category_ids": category_ids}, holdout=holdout)
