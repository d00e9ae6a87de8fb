"""Issue 12's data options of the idx converter: --class-order-seed (which class gets which count of the long-tail
profile) and --pairs (100 classes of Fashion-MNIST item pairs side by side, CIFAR-100-LT's profile), the
non-square transforms they need (bigltr.data.transforms), and a training step on 28x56 input.

Runs on generated idx files (bigltr.data.synthetic.make_fake_idx); the shards are re-read with tarfile + PIL,
independently of the loader, and checked against the source images."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigltr.data import read_info
from bigltr.data.longtail import class_order, counts_by_class, holdout_and_longtail, longtail_counts
from bigltr.data.pairs import draw_pairs, pair_item_needs
from bigltr.data.sources.cli import main as make_shards_main
from bigltr.data.sources.idx import load_idx_pair
from bigltr.data.synthetic import make_fake_idx

PAIRS_ARGS = ["--n-max", "8", "--imbalance", "8", "--val-per-class", "1", "--test-per-class", "2"]


def _make(src, out, *args):
    return make_shards_main(["idx", "--src", str(src), "--out", str(out), "--maxcount", "64", "--no-progress",
                             *map(str, args)])


def _digest(root) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).iterdir())}


def _read(root, split) -> dict:
    """key -> (label, uint8 image) of one split, read with tarfile and PIL."""
    info = read_info(root)
    out = {}
    for fname in info["splits"][split]["filenames"]:
        with tarfile.open(Path(root) / fname) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".png"):
                key = name[:-4]
                out[key] = (int(members[key + ".cls"]), np.asarray(Image.open(io.BytesIO(data))))
    return out


@pytest.fixture(scope="module")
def idx_src(tmp_path_factory):
    """60 training and 8 test images per class (as the tiny_shards fixture)."""
    return make_fake_idx(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def pairs_src(tmp_path_factory):
    """130 training and 30 test images per class: room for distinct items in train (at most 101 per class after
    20 are held out for val), and a test set that must reuse items (40 slots per class)."""
    return make_fake_idx(tmp_path_factory.mktemp("pidx"), per_class_train=130, per_class_test=30)


# ----------------------------------------------------------------------------------------------- class order
def test_class_order_rule():
    profile = longtail_counts(5000, 100, 10)
    assert class_order(10, None).tolist() == list(range(10))
    assert counts_by_class(profile, class_order(10, None)) == profile  # label order: today's counts
    order = class_order(10, 7)
    assert order.tolist() == np.random.default_rng(7).permutation(10).tolist() == class_order(10, 7).tolist()
    counts = counts_by_class(profile, order)
    assert sorted(counts) == sorted(profile) and counts[order[0]] == 5000 and counts[order[-1]] == 50
    assert class_order(10, 8).tolist() != order.tolist()
    with pytest.raises(ValueError, match="class-order-seed"):
        class_order(10, -1)
    with pytest.raises(ValueError, match="permutation"):
        counts_by_class(profile, [0] * 10)


def test_class_order_seed_converter(idx_src, tmp_path):
    common = ["--imbalance", "10", "--n-max", "40", "--val-per-class", "6", "--name", "x"]
    default = _make(idx_src, tmp_path / "default", *common)
    seeded = _make(idx_src, tmp_path / "s3", *common, "--class-order-seed", 3)
    again = _make(idx_src, tmp_path / "s3b", *common, "--class-order-seed", 3)
    other = _make(idx_src, tmp_path / "s4", *common, "--class-order-seed", 4)
    profile = longtail_counts(40, 10, 10)

    # default: label order and the _info.json layout of before (no class order keys): byte-identical output
    assert default["class_counts"] == profile
    assert list(default["source"]) == ["converter", "dataset", "src", "files_sha256", "longtail", "val_per_class",
                                       "seed", "split_rule", "keys", "image_format", "maxcount"]
    assert list(default["source"]["longtail"]) == ["formula", "n_max", "imbalance", "counts"]
    assert "longtail" not in json.loads((tmp_path / "default" / "conversion_report.json").read_text())
    labels = load_idx_pair(str(idx_src), "train")[1]
    ref_train, ref_val = holdout_and_longtail(labels, 10, profile, 6, 0)  # the rule as it was
    assert {k for k in _read(tmp_path / "default", "train")} == {f"train_{i:05d}" for i in ref_train}
    _make(idx_src, tmp_path / "d2", *common)
    assert _digest(tmp_path / "default") == _digest(tmp_path / "d2")

    # seeded: a permutation of the same counts, recorded in _info.json and the report; deterministic per seed
    order = np.random.default_rng(3).permutation(10).tolist()
    assert seeded["class_counts"] == counts_by_class(profile, order) != profile
    assert sorted(seeded["class_counts"]) == sorted(profile)
    lt = seeded["source"]["longtail"]
    assert lt["class_order"] == order and lt["class_order_seed"] == 3 and lt["counts"] == seeded["class_counts"]
    report = json.loads((tmp_path / "s3" / "conversion_report.json").read_text())
    assert report["status"] == "ok" and report["longtail"]["class_order"] == order
    assert report["longtail"]["counts"] == seeded["class_counts"]
    assert _digest(tmp_path / "s3") == _digest(tmp_path / "s3b") and again["class_counts"] == seeded["class_counts"]
    assert other["class_counts"] != seeded["class_counts"]
    # the shards hold those counts; labels are the dataset's (class names unchanged); val and test are the same
    train = _read(tmp_path / "s3", "train")
    assert Counter(lab for lab, _ in train.values()) == Counter(dict(enumerate(seeded["class_counts"])))
    assert all(labels[int(k.split("_")[1])] == lab for k, (lab, _) in train.items())
    assert seeded["classes"] == default["classes"]
    for split in ("val", "test"):
        assert _digest_split(tmp_path / "s3", split) == _digest_split(tmp_path / "default", split)


def _digest_split(root, split):
    return {k: (lab, img.tobytes()) for k, (lab, img) in _read(root, split).items()}


def test_groups_follow_counts_not_labels():
    """Many / Medium / Few come from each class's own training count, whatever the order (bigltr.metrics)."""
    from bigltr.metrics import class_groups

    counts = counts_by_class(longtail_counts(5000, 100, 10), class_order(10, 3))
    groups = class_groups(counts, 1000, 200)
    assert groups["many"] == sorted(c for c in range(10) if counts[c] > 1000)
    assert groups["few"] == sorted(c for c in range(10) if counts[c] < 200)
    assert sorted(groups["many"] + groups["medium"] + groups["few"]) == list(range(10))


# ----------------------------------------------------------------------------------------------- pairs
def test_pairs_profile_is_cifar100_lt():
    counts = longtail_counts(500, 100, 100)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5  # CIFAR-100-LT IF100
    assert (sum(n > 100 for n in counts), sum(n < 20 for n in counts)) == (35, 30)  # the paper's 35/35/30 groups
    # Fashion-MNIST's 6,000 training images per class hold 20 val pairs per class (400 items) plus distinct
    # items for every training pair (5,415 for class 0, the most used)
    assert int(pair_item_needs(counts, 10).max()) + 2 * 10 * 20 <= 6000


def test_draw_pairs_rule():
    labels = np.repeat(np.arange(3), 4)  # 4 items per class: 9 classes x 2 pairs need 12 slots per class
    left, right, lab, uses = draw_pairs(labels, np.arange(12), 3, [2] * 9, seed=5)
    assert (labels[left] * 3 + labels[right] == lab).all() and (left != right).all()
    assert len(set(zip(left.tolist(), right.tolist()))) == 18 and uses == 3
    again = draw_pairs(labels, np.arange(12), 3, [2] * 9, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((left, right, lab), again[:3]))
    with pytest.raises(ValueError, match="source class 2 has no item"):
        draw_pairs(labels, np.arange(8), 3, [1] * 9, seed=0)


@pytest.fixture(scope="module")
def pairs_out(pairs_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "p"
    info = _make(pairs_src, out, "--pairs", *PAIRS_ARGS)
    return out, info


def test_pairs_converter(pairs_src, pairs_out, tmp_path):
    out, info = pairs_out
    tr_images, tr_labels = load_idx_pair(str(pairs_src), "train")[:2]
    te_images, te_labels = load_idx_pair(str(pairs_src), "t10k")[:2]
    profile = longtail_counts(8, 8, 100)
    assert info["num_classes"] == 100 and info["class_counts"] == profile
    assert info["classes"][10 * 7 + 8] == "Sneaker+Bag"
    src = info["source"]
    assert src["pairs"]["image_size"] == [28, 56] and src["pairs"]["max_item_uses"] == {"train": 1, "val": 1,
                                                                                         "test": 2}
    assert src["longtail"]["class_order"] == list(range(100)) and src["longtail"]["class_order_seed"] is None
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["status"] == "ok" and {s: r["written"] for s, r in report["splits"].items()} == {
        "train": sum(profile), "val": 100, "test": 200}
    assert report["longtail"]["counts"] == profile

    items = {}
    for split, prefix, images, labels in (("train", "train", tr_images, tr_labels), ("val", "train", tr_images,
                                                                                    tr_labels),
                                          ("test", "t10k", te_images, te_labels)):
        samples = _read(out, split)
        used = []
        for key, (lab, img) in samples.items():
            p, a, b = key.split("_")
            a, b = int(a), int(b)
            assert p == prefix and a != b and img.shape == (28, 56) and img.dtype == np.uint8
            assert np.array_equal(img[:, :28], images[a]) and np.array_equal(img[:, 28:], images[b])
            assert lab == 10 * labels[a] + labels[b]  # class = 10 * left + right
            used += [a, b]
        items[split] = used
        hist = Counter(lab for lab, _ in samples.values())
        expected = {"train": profile, "val": [1] * 100, "test": [2] * 100}[split]
        assert [hist[c] for c in range(100)] == expected  # the profile; val and test balanced
    assert len(set(items["train"])) == len(items["train"])  # distinct training items (pools large enough)
    assert not set(items["train"]) & set(items["val"])  # val pairs use held-out items only
    assert max(Counter(items["test"]).values()) == 2  # 40 slots per class from 30 test items: reused, <= 2x

    # deterministic given --seed, another seed draws other pairs; --class-order-seed permutes the counts
    again = _make(pairs_src, tmp_path / "again", "--pairs", *PAIRS_ARGS, "--name", "p")
    assert _digest(tmp_path / "again") == _digest(out) and again["class_counts"] == profile
    seed1 = _make(pairs_src, tmp_path / "seed1", "--pairs", *PAIRS_ARGS, "--seed", 1)
    assert set(_read(tmp_path / "seed1", "test")) != set(_read(out, "test"))
    assert seed1["class_counts"] == profile
    perm = _make(pairs_src, tmp_path / "perm", "--pairs", *PAIRS_ARGS, "--class-order-seed", 5)
    order = np.random.default_rng(5).permutation(100).tolist()
    assert perm["class_counts"] == counts_by_class(profile, order)
    assert perm["source"]["longtail"]["class_order"] == order


def test_pairs_errors(pairs_src, idx_src, tmp_path):
    with pytest.raises(SystemExit, match="--test-per-class goes with --pairs"):
        _make(idx_src, tmp_path / "a", "--test-per-class", 3)
    with pytest.raises(SystemExit, match="holding out 400 .* leaves none"):
        _make(pairs_src, tmp_path / "b", "--pairs", "--n-max", "8", "--imbalance", "8")  # 20 val/class: 400 > 130


# ----------------------------------------------------------------------------------------------- 28 x 56 input
def test_non_square_transforms():
    import torch

    from bigltr.data.transforms import build_transform, image_hw

    assert image_hw(28) == image_hw([28]) == (28, 28) and image_hw([28, 56]) == (28, 56)
    for bad in ([28, 56, 3], [0, 5], "28", True, [2.5]):
        with pytest.raises(ValueError):
            image_hw(bad)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 56), dtype=np.uint8))
    for aug in ("none", "cifar", "crop", "imagenet"):
        for train in (False, True):
            x = build_transform(img_size=[28, 56], in_chans=1, mean=(0.5,), std=(0.5,), train=train, aug=aug)(img)
            assert x.shape == (1, 28, 56)
    eval_x = build_transform(img_size=[28, 56], in_chans=1, mean=(0.5,), std=(0.5,), train=False, aug="none")(img)
    assert torch.allclose(eval_x, torch.from_numpy(np.asarray(img) / 255.0).float()[None] * 2 - 1, atol=1e-6)
    # crop: shifted by at most 4 px, never mirrored (a mirrored pair is another class)
    tf = build_transform(img_size=[28, 56], in_chans=1, mean=(0.0,), std=(1.0,), train=True, aug="crop")
    src = torch.nn.functional.pad(torch.from_numpy(np.array(img)).float().div(255), (4, 4, 4, 4))
    for _ in range(20):
        x = tf(img)[0]
        assert any(torch.equal(x, src[i:i + 28, j:j + 56]) for i in range(9) for j in range(9))


def test_training_step_on_pairs(pairs_out):
    """ResNet-32 trains a step on 28x56 batches read from the pairs shards (torch reader; DALI's CPU mode too when
    installed, checked against the torch reader's eval tensors)."""
    import torch

    from bigltr.data import ShardLoader
    from bigltr.data.transforms import build_transform
    from bigltr.models import build_model

    out, info = pairs_out
    torch.manual_seed(0)
    kw = dict(img_size=[28, 56], in_chans=1, mean=(0.29,), std=(0.35,))
    ld = ShardLoader(out, "train", batch_size=16, transform=build_transform(**kw, train=True, aug="crop"),
                     train=True, num_workers=0)
    model = build_model("resnet32_cifar", info["num_classes"], in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y, _ = next(iter(ld))
    assert x.shape == (16, 1, 28, 56) and int(y.max()) < 100
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and model(x).shape == (16, 100)

    from bigltr.data.dali import dali_available

    if dali_available():
        from bigltr.data.dali import DaliShardLoader

        ev = ShardLoader(out, "test", batch_size=50, transform=build_transform(**kw, train=False, aug="none"),
                         train=False, num_workers=0)
        dd = DaliShardLoader(out, "test", batch_size=50, train=False, aug="none", num_workers=1, **kw)
        tx, _, tk = next(iter(ev))
        dx, _, dk = next(iter(dd))
        assert list(dk) == list(tk) and dx.shape == (50, 1, 28, 56)
        assert float((dx.cpu() - tx).abs().max()) < 1e-5
        dtr = DaliShardLoader(out, "train", batch_size=16, train=True, aug="crop", num_workers=1, **kw)
        assert next(iter(dtr))[0].shape == (16, 1, 28, 56)


def _config_takes_hw() -> bool:
    from bigltr.config import ConfigError, build_config

    try:
        build_config(["data.img_size=[28, 56]", "data.train_aug=crop"])
    except ConfigError:
        return False
    return True


@pytest.mark.skipif(not _config_takes_hw(), reason="bigltr.config: data.img_size [H, W] and train_aug crop not "
                                                   "in the schema yet")
def test_recipe_trains_on_tiny_pairs(pairs_out, tmp_path):
    """recipes/fmnist_pairs_lt.yaml end to end on the tiny pairs shards: both stages, 1 epoch each, 28x56 input."""
    from bigltr.config import build_config
    from bigltr.train import main

    cfg = build_config(["recipe=fmnist_pairs_lt"])
    assert list(cfg.data.img_size) == [28, 56] and cfg.data.train_aug == "crop" and not cfg.eval.tta_flip
    out, _ = pairs_out
    run = tmp_path / "run"
    assert main(["recipe=fmnist_pairs_lt", f"data.root={out}", f"out={run}", "data.num_workers=0",
                 "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=32", "stage2.batch_size=32",
                 "data.many_thr=6", "data.few_thr=2"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["stage2"]["test"]["num_samples"] == 200
