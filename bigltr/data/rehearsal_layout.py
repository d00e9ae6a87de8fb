"""The on-disk layouts of ``bigltr-rehearsal`` (:mod:`bigltr.data.rehearsal`): iNaturalist 2018's COCO-style
``train2018.json`` / ``val2018.json`` and image folders (:func:`_inat`), and the OLTR ``relative/path label`` lists
of ImageNet-LT and Places-LT (:func:`_oltr`). Each writes its lists and returns the layout facts for the manifest
and the (class, split, files) units whose images :func:`bigltr.data.rehearsal_images._paint_all` draws.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .rehearsal_images import _write_file, odd_size

INAT_SUPER = ("Plantae", "Insecta", "Aves", "Reptilia", "Mammalia", "Fungi", "Amphibia", "Mollusca", "Animalia",
              "Arachnida", "Actinopterygii", "Chromista", "Protozoa", "Bacteria")
INAT_SUPER_P = (0.35, 0.13, 0.15, 0.04, 0.03, 0.04, 0.02, 0.02, 0.02, 0.02, 0.03, 0.01, 0.005, 0.145)


def _dump_json(path: str, data) -> None:
    _write_file(path, json.dumps(data, separators=(",", ":")).encode())  # dumps: the C encoder (dump is pure Python)


def _inat(out, C, train_counts, val_k, test_k, seed, odd_at, S, dataset) -> tuple[dict, list]:
    rng = np.random.default_rng([seed, 4])
    cat_ids = np.sort(rng.choice(3 * C, size=C, replace=False))  # label l <-> cat_ids[l] (sorted: the converter's rule)
    supers = rng.choice(len(INAT_SUPER), size=C, p=np.asarray(INAT_SUPER_P) / sum(INAT_SUPER_P))
    root = "train_val2018"
    categories = [{"id": int(cat_ids[c]), "name": f"Synthetica {INAT_SUPER[supers[c]].lower()} {int(cat_ids[c])}",
                   "supercategory": INAT_SUPER[supers[c]], "kingdom": INAT_SUPER[supers[c]]} for c in range(C)]
    cat_order = rng.permutation(C)  # the JSON lists categories unsorted
    hexes = rng.integers(0, 2**63 - 1, size=(int(train_counts.sum()) + test_k * C, 2)).tolist()
    h = 0
    entries: dict = {"train": [], "val": []}
    units, odd = [], []
    for c in range(C):
        folder = f"{root}/{INAT_SUPER[supers[c]]}/{int(cat_ids[c])}"
        for sid, (split, n) in enumerate((("train", int(train_counts[c])), ("val", test_k))):
            rel = [f"{folder}/{a:016x}{b:016x}.jpg" for a, b in hexes[h:h + n]]
            h += n
            kinds = [odd_at.get((c, i), "") if split == "train" else "" for i in range(n)]
            units.append((c, sid, list(zip(rel, kinds))))
            odd += [{"kind": k, "split": split, "file": rel[i], "label": c, "category_id": int(cat_ids[c]),
                     "_entry": len(entries[split]) + i} for i, k in enumerate(kinds) if k]
            entries[split] += [(c, p) for p in rel]
    position: dict = {}
    other = {o["file"]: odd_size(S) for o in odd if o["kind"] == "other_size"}
    for split, name, id_base in (("train", "train2018.json", 0), ("val", "val2018.json", 10_000_000)):
        ents = entries[split]
        order = rng.permutation(len(ents))  # images listed in a mixed order, as in the real files
        img_ids = id_base + rng.permutation(3 * len(ents))[:len(ents)]  # unique, not contiguous
        imgs, anns = [], []
        for pos, e in enumerate(order.tolist()):
            c, rel = ents[e]
            position[(split, e)] = pos
            iid = int(img_ids[e])
            w, hgt = other.get(rel, (S, S))
            imgs.append({"id": iid, "file_name": rel, "width": w, "height": hgt, "license": 1,
                         "rights_holder": "bigltr-rehearsal (synthetic)"})
            anns.append({"id": pos, "image_id": iid, "category_id": int(cat_ids[c])})
        _dump_json(os.path.join(out, name), {
            "info": {"description": f"bigltr-rehearsal: synthetic {name} shaped like iNaturalist 2018",
                     "year": 2018, "version": "rehearsal"},
            "images": imgs, "annotations": anns, "categories": [categories[k] for k in cat_order.tolist()],
            "licenses": [{"id": 1, "name": "synthetic, no rights", "url": ""}]})
    for o in odd:  # the key make-shards inat gives the image: <split>_<position in the JSON's images list>
        o["json"] = "train2018.json" if o["split"] == "train" else "val2018.json"
        o["key"] = f"{o['split']}_{position[(o['split'], o.pop('_entry'))]:07d}"
    return ({"layout": {"train_json": "train2018.json", "val_json": "val2018.json", "image_root": ".",
                        "images": f"{root}/<supercategory>/<category id>/<hex>.jpg",
                        "category_ids": "non-contiguous, sorted id -> label"},
             "eval_totals": {"test (val2018.json)": len(entries["val"])}, "odd": odd}, units)


def _oltr(out, C, train_counts, val_k, test_k, seed, odd_at, S, dataset) -> tuple[dict, list]:
    rng = np.random.default_rng([seed, 4])
    if dataset == "imagenet_lt":
        wnids = [f"n{int(x):08d}" for x in np.sort(rng.choice(10**8 // 7, size=C, replace=False)) * 7 + 1440764]
        prefix, lead = "ImageNet_LT", ""

        def path(split, c, i):
            if split == "test":
                return f"val/{wnids[c]}/ILSVRC2012_val_{test_no[c][i]:08d}.JPEG"
            return f"train/{wnids[c]}/{wnids[c]}_{train_no[c][i]}.JPEG"
    else:
        letters = "abcdefghijklmnopqrstuvwxyz"
        scenes = [f"{letters[c % 26]}/{letters[c % 26]}scene_{c:03d}" for c in range(C)]
        prefix, lead = "Places_LT", "/"

        def path(split, c, i):
            if split == "test":
                return f"val_256/Places365_val_{test_no[c][i]:08d}.jpg"
            return f"data_256/{scenes[c]}/{train_no[c][i]:08d}.jpg"
    # file numbers: train and val images of a class are distinct files of its (ImageNet / Places) training folder
    train_no = [1 + np.sort(rng.choice(max(4 * (int(n) + val_k), 100), size=int(n) + val_k, replace=False))
                for n in train_counts]
    perm = 1 + rng.permutation(C * test_k)
    test_no = [np.sort(perm[c * test_k:(c + 1) * test_k]) for c in range(C)]
    lines: dict = {"train": [], "val": [], "test": []}
    units, odd = [], []
    for c in range(C):
        n = int(train_counts[c])
        for sid, (split, idx) in enumerate((("train", range(n)), ("val", range(n, n + val_k)),
                                            ("test", range(test_k)))):
            if not len(idx):
                continue
            rel = [path(split, c, i) for i in idx]
            kinds = [odd_at.get((c, i), "") if split == "train" else "" for i in range(len(rel))]
            units.append((c, sid, list(zip(rel, kinds))))
            odd += [{"kind": k, "split": split, "file": rel[i], "label": c, "_line": len(lines[split]) + i}
                    for i, k in enumerate(kinds) if k]
            lines[split] += [(p, c) for p in rel]
    line_no: dict = {}
    for split, ents in lines.items():
        if not ents:
            continue
        order = rng.permutation(len(ents))  # lists in a mixed order
        text = []
        for ln, e in enumerate(order.tolist(), 1):
            text.append(f"{lead}{ents[e][0]} {ents[e][1]}\n")
            line_no[(split, e)] = ln
        _write_file(os.path.join(out, f"{prefix}_{split}.txt"), "".join(text).encode())
    for o in odd:  # the key make-shards list gives the image: <split>_<line number in that split's list>
        o["list"] = f"{prefix}_{o['split']}.txt"
        o["key"] = f"{o['split']}_{line_no[(o['split'], o.pop('_line'))]:07d}"
    lists = {s: f"{prefix}_{s}.txt" for s in lines if lines[s]}
    return ({"layout": {"lists": lists, "image_root": ".", "line": f"'{lead}relative/path label'"},
             "eval_totals": {s: len(v) for s, v in lines.items() if s != "train" and v}, "odd": odd}, units)

