"""The two protocols (docs/reproduce.md "Protocol"): `holdout` trains on the train split and keeps the epoch with the
best val accuracy; `refit` trains on the whole official training set (train + the val held out of it), a fixed
schedule, and keeps the LAST epoch, with the Many/Medium/Few groups from the official counts in both. Real
conversion (imagefolder with the default hold-out policy) and real runs of the trainer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COUNTS = [40, 24, 12, 6, 3]  # hold-out policy (K 5, fraction 0.1, min 10): val 4, 2, 1, 0, 0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """ImageFolder source (5 classes, learnable colour per class) converted with the default hold-out policy."""
    from bigltr.data.sources.cli import main as make_shards

    base = tmp_path_factory.mktemp("protocol")
    rng = np.random.default_rng(0)
    for split, counts in (("train", COUNTS), ("test", [4] * len(COUNTS))):
        for c, n in enumerate(counts):
            d = base / "src" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.full((28, 28), 40 * c + 20, np.float32) + rng.normal(0, 10, (28, 28))
                Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    assert make_shards(["imagefolder", "--src", str(base / "src"), "--out", str(base / "shards"), "--maxcount", "16",
                        "--workers", "1", "--no-progress"])
    info = json.loads((base / "shards" / "_info.json").read_text())
    assert info["official_train_splits"] == ["train", "val"] and info["official_train_counts"] == COUNTS
    assert info["class_counts"] == [36, 22, 11, 6, 3] and info["splits"]["val"]["num_samples"] == 7
    return base / "shards"


def _args(root, out, *extra):
    return ["recipe=tiny_test", f"data.root={root}", "data.train_aug=none", "model.name=test_efficientnet_gn",
            "stage1.epochs=3", "stage2.epochs=2", "stage1.batch_size=8", "stage2.batch_size=8", "data.many_thr=20",
            "data.few_thr=10", f"out={out}", *extra]


def test_refit_trains_on_train_plus_val_and_keeps_the_last_epoch(held_out, tmp_path, capfd):
    from bigltr.train import main

    out = tmp_path / "refit"
    assert main(_args(held_out, out, "protocol=refit")) == 0
    log = capfd.readouterr().err
    res = json.loads((out / "results.json").read_text())
    # trained on all 85 official training images: train (78) + the val held out of it (7); loss weights from them
    assert "85 train images/rank" in log
    assert res["class_counts"] == COUNTS
    for stage, epochs in (("stage1", 3), ("stage2", 2)):
        assert "val" not in res[stage] and res[stage]["best_epoch"] == epochs  # no selection: the last epoch
        last = torch.load(out / stage / "last.pt", weights_only=True)
        best = torch.load(out / stage / "best.pt", weights_only=True)
        assert last["epoch"] == best["epoch"] == epochs
        assert torch.equal(last["model"]["classifier.weight"], best["model"]["classifier.weight"])
        assert 0 < res[stage]["test"]["all"] <= 100
    assert "no val" in log
    # groups from the official counts: 40, 24 > 20 Many; 12 Medium; 6, 3 Few
    assert res["groups"] == {"many_thr": 20, "few_thr": 10, "many": 2, "medium": 1, "few": 2}


def test_holdout_selects_on_val_and_needs_a_val_split(held_out, tmp_path, capsys):
    from bigltr.data.sources.cli import main as make_shards
    from bigltr.train import main

    out = tmp_path / "holdout"
    assert main(_args(held_out, out, "stage=1")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["class_counts"] == [36, 22, 11, 6, 3]  # trained on the train split only
    assert res["stage1"]["val"]["num_samples"] == 7
    assert res["groups"]["many"] == 2 and res["groups"]["few"] == 2  # still the official counts' groups
    # data converted without a val split: holdout refuses it by name, refit trains on it
    src = Path(held_out).parent / "src"
    noval = tmp_path / "noval"
    assert make_shards(["imagefolder", "--src", str(src), "--out", str(noval), "--val-per-class", "0", "--workers",
                        "1", "--no-progress"])
    capsys.readouterr()
    assert main(_args(noval, tmp_path / "r1", "stage=1")) == 2
    assert "use protocol=refit" in capsys.readouterr().err
    assert main(_args(noval, tmp_path / "r2", "stage=1", "stage1.epochs=1", "protocol=refit")) == 0


def test_baselines_run_through_the_trainer(tiny_shards, tmp_path):
    """The baselines as config options of the real trainer (docs/baselines.md): one-stage weight balancing (fixed
    simplex-ETF classifier + feature-norm penalty + WD, then multiplicative logit adjustment), the logit-adjusted
    stage-1 loss with post-hoc LA, and cRT (re-initialised classifier, class-balanced sampling on cached features)."""
    from bigltr.objective.etf import simplex_etf
    from bigltr.train import main

    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "data.train_aug=none", "model.name=test_efficientnet_gn",
              "stage1.epochs=2", "stage2.epochs=2", "stage1.lr=0.05"]
    one = tmp_path / "one_stage"
    assert main(common + [f"out={one}", "stage=1", "stage1.classifier=etf", "stage1.feature_reg=0.01",
                          "eval.posthoc=mla", "eval.posthoc_tau=0.65"]) == 0
    ckpt = torch.load(one / "stage1" / "best.pt", weights_only=True)["model"]
    w = ckpt["classifier.weight"]  # the ETF stayed fixed; only the bias trained
    torch.testing.assert_close(w, simplex_etf(w.shape[0], w.shape[1], 0), rtol=0, atol=0)
    assert ckpt["classifier.bias"].abs().sum() > 0
    res = json.loads((one / "results.json").read_text())
    assert res["stage1"]["posthoc"]["method"] == "mla" and 0 <= res["stage1"]["posthoc"]["test"]["all"] <= 100

    la = tmp_path / "la"
    assert main(common + [f"out={la}", "stage1.loss=la_ce", "stage1.la_tau=1.0", "eval.posthoc=la",
                          "stage2.classifier_init=reinit", "stage2.loss=ce", "stage2.features=cached",
                          "stage2.sampler=class_balanced", "stage2.maxnorm.when=off", "stage2.weight_decay=0"]) == 0
    res = json.loads((la / "results.json").read_text())
    assert res["stage1"]["posthoc"]["method"] == "la" and res["stage2"]["posthoc"]["method"] == "la"
    s1 = torch.load(la / "stage1" / "best.pt", weights_only=True)["model"]["classifier.weight"]
    s2 = torch.load(la / "stage2" / "best.pt", weights_only=True)["model"]["classifier.weight"]
    assert not torch.allclose(s1, s2)  # cRT retrained a fresh classifier


def test_class_balanced_feature_cache_order_is_balanced_and_resumable():
    """The cached-feature stream with stage2.sampler=class_balanced: every class drawn floor/ceil(N/C) times per
    epoch, the same order when an epoch is replayed (resume skips the first batches of the same sequence)."""
    from bigltr.engine.feature_cache import FeatureCache

    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 3 + [3] * 1)
    feats = torch.arange(len(labels), dtype=torch.float32).view(1, -1, 1)  # feature = sample id
    cache = FeatureCache(feats, labels, batch_size=8, seed=3)
    cache.sampler = "class_balanced"
    cache.set_epoch(1)
    drawn = torch.cat([y for _, y, _ in cache])
    assert drawn.numel() == 64 and torch.bincount(drawn).tolist() == [16, 16, 16, 16]
    ids = torch.cat([x.flatten() for x, _, _ in cache])
    assert torch.equal(labels[ids.long()], drawn)  # features and labels stay paired
    again = torch.cat([x.flatten() for x, _, _ in cache])
    assert torch.equal(ids, again)
    cache.set_epoch(2)
    assert not torch.equal(torch.cat([x.flatten() for x, _, _ in cache]), ids)  # a new draw each epoch


def test_class_balanced_order_follows_the_sample_keys_not_the_rows():
    """With sample keys, the class-balanced draws are a function of the samples, not of the order a loader read them
    in (rank split, workers): the same samples in another row order give the same draws; keys already in row order
    give the draws of a cache without keys (earlier releases). The shuffle stream still follows the rows."""
    from bigltr.engine.feature_cache import FeatureCache

    labels = torch.tensor([0] * 20 + [1] * 7 + [2] * 3 + [3] * 2)
    keys = [f"s{i:03d}" for i in range(len(labels))]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))

    def drawn(order, with_keys=True):
        feats = torch.stack([torch.arange(len(labels), dtype=torch.float32)[order]] * 2).unsqueeze(-1)
        feats[1] += 1000  # view 1 is told apart from view 0
        c = FeatureCache(feats, labels[order], batch_size=4, seed=5,
                         keys=[keys[i] for i in order.tolist()] if with_keys else None)
        c.sampler = "class_balanced"
        c.set_epoch(3)
        return torch.cat([x.flatten() for x, _, _ in c]), torch.cat([y for _, y, _ in c])

    ident = torch.arange(len(labels))
    x0, y0 = drawn(ident)
    x1, y1 = drawn(perm)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)  # features = sample ids: the same samples and views
    assert torch.equal(x0, drawn(ident, with_keys=False)[0])
    assert (x0 >= 1000).any() and (x0 < 1000).any()  # both views drawn
    assert not torch.equal(drawn(perm, with_keys=False)[0], x0)  # without keys: the row order decides
