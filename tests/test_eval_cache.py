"""Stage 2's cached evaluation features (bigltr.engine.feature_cache.EvalFeatures) on tiny shards: the same
predictions as the online evaluation (fp32 cache; flip-TTA, post-hoc classifier, two simulated ranks with padded
batches), reuse of a disk cache by a second run, rebuild for another key, and concurrent builders into one dir."""
import contextlib
import json
import shutil
import threading
import time

import pytest
import torch

from bigltr.config import build_config
from bigltr.engine.evaluation import Evaluator, evaluate
from bigltr.engine.loop import data_losses
from bigltr.engine.context import RunContext
from bigltr.engine.feature_cache import EvalFeatures, FeatureCache
from bigltr.engine.feature_store import entry_name
from bigltr.models import build_model
from bigltr.results import per_class_accuracy

CPU = torch.device("cpu")


class FakeDist:
    """What evaluate/RunContext need of bigltr.distributed.Dist, for one simulated rank; gather_objects returns
    the records of the ranks evaluated before (`others`) and this one's, in rank order."""

    def __init__(self, rank=0, world_size=1, others=()):
        self.rank, self.world_size, self.device, self.others, self.sent = rank, world_size, CPU, list(others), None

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def gather_objects(self, obj):
        self.sent = obj
        return [obj] + self.others if self.rank == 0 else [obj]

    def all_reduce_(self, t, op):  # one process: the sum / min over ranks is this rank's value
        return t


def _ctx(tiny_shards, tmp_path, dist, *extra):
    cfg = build_config(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={tmp_path}", *extra])
    ctx = RunContext.create(cfg, dist)
    ctx.device = CPU
    return ctx


def _model(ctx, ckpt):
    model = build_model(ctx.cfg.model.name, ctx.num_classes, in_chans=ctx.cfg.data.in_chans, pretrained=False)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    model.eval()
    # a head that tells images apart (a short stage-1 head predicts nearly one class): nearest class mean of the
    # val features, w_c = mu_c, b_c = -||mu_c||^2 / 2
    images, labels, _ = next(iter(ctx.loader("val", train=False, batch_size=60)))
    with torch.no_grad():
        feats = model.backbone(images)
        mu = torch.stack([feats[labels == c].mean(0) for c in range(ctx.num_classes)])
        model.classifier.weight.copy_(mu)
        model.classifier.bias.copy_(-0.5 * mu.pow(2).sum(1))
    return model


@pytest.fixture(scope="module")
def stage1_ckpt(tiny_shards, tmp_path_factory):
    from bigltr.train import main

    out = tmp_path_factory.mktemp("s1")
    assert main(["recipe=tiny_test", f"data.root={tiny_shards}", "stage1.epochs=1", f"out={out}", "stage=1"]) == 0
    return out / "stage1" / "best.pt"


def _features(ctx, model, split, flip, bs=16):
    return EvalFeatures.build(model.backbone, ctx.loader(split, train=False, batch_size=bs), flip=flip, dtype="fp32",
                              location="memory", directory=None, device=CPU, amp_ctx=contextlib.nullcontext)


def test_cached_eval_equals_online(tiny_shards, stage1_ckpt, tmp_path):
    ctx = _ctx(tiny_shards, tmp_path, FakeDist(), "eval.tta_flip=true", "eval.posthoc=tau_norm",
               "eval.posthoc_tau=0.5")
    model = _model(ctx, stage1_ckpt)
    # final evaluation (val + test, flip-TTA, post-hoc classifier): identical metrics, per class
    online = Evaluator(ctx).final(model, 16, "none")
    cache = {s: _features(ctx, model, s, flip=True) for s in ("val", "test")}
    cached = Evaluator(ctx).final(model, 16, "none", features=cache.__getitem__)
    assert cached == online
    assert len(set(per_class_accuracy(online["test"]))) > 2 and 0 < online["test"]["all"] < 100  # not a degenerate head
    # the flipped view is the backbone on flipped images (not a flip of features)
    images = next(iter(ctx.loader("val", train=False, batch_size=16)))[0]
    (centre, flipped), _, _ = next(iter(cache["val"]))
    with torch.no_grad():
        assert torch.equal(flipped, model.backbone(torch.flip(images, dims=[3])))
        assert torch.equal(centre, model.backbone(images))
    # per-epoch validation (no TTA) on a flip cache: the centre view only
    ev = Evaluator(ctx)
    per_epoch = ev.split(torch.nn.Identity(), {"m": model.classifier}, cache["val"], "none", "val")
    assert per_epoch == ev.split(model.backbone, {"m": model.classifier}, ctx.loader("val", train=False, batch_size=16),
                                 "none", "val")
    assert per_epoch["m"]["samples"] == 60
    with pytest.raises(ValueError, match="flipped"):
        evaluate(backbone=None, classifiers={"m": model.classifier}, loader=_features(ctx, model, "val", flip=False),
                 num_classes=10, device=CPU, tta_flip=True)


def test_cached_eval_two_ranks_counts_each_sample_once(tiny_shards, stage1_ckpt, tmp_path):
    """Two simulated ranks on the test split (shards of 64 and 16 samples: rank 1 pads 3 repeated batches): the
    cached path replays the padding and the exact gather gives the single-process numbers."""
    single = _ctx(tiny_shards, tmp_path, FakeDist())
    model = _model(single, stage1_ckpt)
    clf = {"m": model.classifier}
    test_loader = single.loader("test", train=False, batch_size=16)
    ref = Evaluator(single).split(model.backbone, clf, test_loader, "none", "test")
    for cached in (False, True):
        r1 = FakeDist(rank=1, world_size=2)
        ctx1 = _ctx(tiny_shards, tmp_path, r1)
        loader1 = _features(ctx1, model, "test", flip=False) if cached else ctx1.loader("test", train=False,
                                                                                          batch_size=16)
        evaluate(backbone=model.backbone, classifiers=clf, loader=loader1, num_classes=10, device=CPU, dist=r1)
        ctx0 = _ctx(tiny_shards, tmp_path, FakeDist(rank=0, world_size=2, others=[r1.sent]))
        loader0 = _features(ctx0, model, "test", flip=False) if cached else ctx0.loader("test", train=False,
                                                                                          batch_size=16)
        assert Evaluator(ctx0).split(model.backbone, clf, loader0, "none", "test") == ref
        if cached:
            assert len(loader0) == len(loader1) == 4 and sum(loader0.sizes) == 64
            assert sum(loader1.sizes) == 64 and len(set(loader1.keys)) == 16  # padded with repeats


def test_eval_cache_reused_and_rebuilt_for_another_key(tiny_shards, stage1_ckpt, tmp_path, capfd):
    """A tuner's trials share stage2.cache.dir: the second trial reuses every split's cache (no rebuild), and
    matches the online stage 2's evaluation exactly (fp32 cache); another checkpoint gets its own caches; a
    rewritten checkpoint file gets new caches and the stale ones are removed."""
    from bigltr.train import main

    shared = tmp_path / "cache"
    common = ["recipe=tiny_test", f"data.root={tiny_shards}", "stage=2", "stage2.epochs=1", "stage2.lr=0.5"]
    cached = common + ["stage2.features=cached", "stage2.cache.views=center", "stage2.cache.dtype=fp32",
                       "stage2.cache.location=disk", f"stage2.cache.dir={shared}"]

    def run(name, ckpt, *extra):
        assert main(cached + [f"stage1_checkpoint={ckpt}", f"out={tmp_path / name}", *extra]) == 0
        return json.loads((tmp_path / name / "results.json").read_text())["stage2"]

    first = run("t1", stage1_ckpt, "stage2.weight_decay=0.1")
    entries = sorted(p.name for p in shared.iterdir())
    assert [e.split("-")[0] for e in entries] == ["test", "train", "val"]
    mtimes = {e: (shared / e / "features.bin").stat().st_mtime_ns for e in entries}
    capfd.readouterr()
    second = run("t2", stage1_ckpt, "stage2.weight_decay=0.01")  # another trial, same cache key
    err = capfd.readouterr().err
    assert "eval feature cache: reusing" in err and err.count("reusing") == 3 and "eval feature cache: val," not in err
    assert sorted(p.name for p in shared.iterdir()) == entries
    assert {e: (shared / e / "features.bin").stat().st_mtime_ns for e in entries} == mtimes
    assert second["wall_time_s"]["feature_cache_build"] < first["wall_time_s"]["feature_cache_build"] + 5

    # the online stage 2 evaluates to the same numbers (full-batch training is order-free: the same classifier)
    on_cached = run("t3", stage1_ckpt, "stage2.weight_decay=0.1", "data.train_aug=none", "stage2.batch_size=159")
    assert main(common + [f"stage1_checkpoint={stage1_ckpt}", f"out={tmp_path / 'online_fb'}",
                          "stage2.weight_decay=0.1", "data.train_aug=none", "stage2.batch_size=159"]) == 0
    online = json.loads((tmp_path / "online_fb" / "results.json").read_text())["stage2"]
    for split in ("val", "test"):
        assert per_class_accuracy(on_cached[split]) == per_class_accuracy(online[split]), split
    n_entries = len(list(shared.iterdir()))

    # another checkpoint: built anew, next to the first one's
    other = tmp_path / "other.pt"
    shutil.copy(stage1_ckpt, other)
    capfd.readouterr()
    run("t4", other)
    assert "reusing" not in capfd.readouterr().err
    assert len(list(shared.iterdir())) == n_entries + 3
    # the same path rewritten (a newer stage 1): new caches, the stale ones of that path removed
    time.sleep(0.01)
    other.write_bytes(other.read_bytes())
    run("t5", other)
    names = [p.name for p in shared.iterdir()]
    assert len(names) == n_entries + 3 and not any(n.startswith(".") for n in names)
    keys = [json.loads((shared / n / "meta.json").read_text())["key"] for n in names]
    assert sum(k["checkpoint"] == str(other) for k in keys) == 3
    assert all(k["checkpoint_mtime_ns"] == other.stat().st_mtime_ns for k in keys if k["checkpoint"] == str(other))


class SlowLoader:
    """An eval-loader stand-in over fixed random images, slow enough that two builders overlap."""

    def __init__(self, n=40, batch_size=8, split="val"):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 4, 4, generator=g), torch.arange(n) % 3
        self.batch_size, self.split, self.num_samples, self.epoch_skipped = batch_size, split, n, 0

    def __len__(self):
        return -(-len(self.y) // self.batch_size)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for i in range(0, len(self.y), self.batch_size):
            time.sleep(0.05)
            yield self.x[i:i + self.batch_size], self.y[i:i + self.batch_size], [f"k{j}" for j in range(i, i + 8)]


class Backbone(torch.nn.Sequential):
    num_features = 5

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(torch.nn.Flatten(), torch.nn.Linear(16, 5))


def test_concurrent_builders_leave_one_complete_cache(tmp_path):
    key = {"checkpoint": "/x.pt", "checkpoint_mtime_ns": 1, "dtype": "bf16"}
    backbone = Backbone()
    # a half-written folder of a crashed builder and an entry without meta.json are never trusted
    (tmp_path / ".val.building-crashed").mkdir()
    (tmp_path / entry_name("val", key)).mkdir()
    (tmp_path / entry_name("val", key) / "features.bin").write_bytes(b"partial")

    def builders(fn, n=2):
        start, out, errors = threading.Barrier(n), [None] * n, []

        def work(i):
            try:
                start.wait()
                out[i] = fn()
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        return out

    ev = builders(lambda: EvalFeatures.build(backbone, SlowLoader(), flip=True, dtype="bf16", location="disk",
                                             directory=tmp_path, device=CPU, amp_ctx=contextlib.nullcontext, key=key))
    tr = builders(lambda: FeatureCache.build(backbone, lambda augment: SlowLoader(split="train"), views="center_flip",
                                             num_aug=1, dtype="bf16", location="disk", directory=tmp_path, device=CPU,
                                             batch_size=8, seed=0, amp_ctx=contextlib.nullcontext, key=key))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([".val.building-crashed", entry_name("val", key), entry_name("train", key)])
    for e in (entry_name("val", key), entry_name("train", key)):
        assert json.loads((tmp_path / e / "meta.json").read_text())["key"] == key
    assert torch.equal(ev[0].features, ev[1].features) and ev[0].keys == ev[1].keys
    assert torch.equal(tr[0].features, tr[1].features)
    again = EvalFeatures.load(tmp_path / entry_name("val", key), key)
    assert torch.equal(again.features, ev[0].features) and again.sizes == [8] * 5 and again.flip
    assert EvalFeatures.load(tmp_path / entry_name("val", key), {**key, "dtype": "fp32"}) is None


def _zero_png(shard, index):
    """Overwrite a shard's `index`-th PNG with the PNG signature followed by zeros (same length: the shard keeps
    its recorded byte size); its key."""
    import io
    import tarfile

    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    i = [j for j, (m, _) in enumerate(members) if m.name.endswith(".png")][index]
    m, data = members[i]
    members[i] = (m, data[:8] + bytes(len(data) - 8))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for mm, d in members:
            tf.addfile(mm, io.BytesIO(d))
    return m.name.split(".", 1)[0]


def test_cache_build_skips_a_corrupt_image_under_the_stage1_rule(tiny_shards, stage1_ckpt, tmp_path):
    """A corrupt training image within data.max_skip_fraction: stage 1 skips and counts it, and so does the
    stage-2 feature-cache build (it used to stop with "expected 159 training samples, read 158"); the cache holds
    the 158 others, reports the skip through bigltr.engine.loop.data_losses (the rule stage 1 applies every epoch), keeps
    the count when reused from disk, and a stricter data.max_skip_fraction stops the run with that one line."""
    from bigltr.data.errors import DataError

    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root)
    bad = _zero_png(root / "train-000001.tar", 5)
    ctx = _ctx(root, tmp_path, FakeDist())
    model = _model(ctx, stage1_ckpt)
    key = {"checkpoint": str(stage1_ckpt), "checkpoint_mtime_ns": 1, "dtype": "fp32"}

    def build(ctx):
        return FeatureCache.build(model.backbone, lambda augment: ctx.loader("train", train=False, batch_size=16,
                                                                           augment=augment),
                                  views="center_flip", num_aug=1, dtype="fp32", location="disk",
                                  directory=tmp_path / "cache", device=CPU, batch_size=16, seed=0,
                                  amp_ctx=contextlib.nullcontext, key=key)

    cache = build(ctx)
    assert cache.features.shape == (2, 158, model.backbone.num_features) and cache.num_samples == 158
    assert data_losses(ctx, cache) == {"skipped": 1, "lost": 0}
    # the rows are the other 158 samples, in the loader's order, with their labels
    loader = ctx.loader("train", train=False, batch_size=16)
    images, labels, keys = (torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader]),
                            [k for b in loader for k in b[2]])
    assert bad not in keys and len(keys) == 158 and torch.equal(cache.labels, labels)
    with torch.no_grad():
        assert torch.allclose(cache.features[0], model.backbone(images), atol=1e-5)
    again = build(ctx)  # reused from disk: same rows, the skip still counted
    assert torch.equal(again.features, cache.features) and (again.epoch_skipped, again.epoch_lost) == (1, 0)
    strict = _ctx(root, tmp_path, FakeDist(), "data.max_skip_fraction=0.001")
    with pytest.raises(DataError, match=r"1 corrupt sample\(s\) skipped and 0 lost .* 1 of 159 > "
                                        r"data.max_skip_fraction=0.001"):
        data_losses(strict, build(strict))


class LabelledLoader(SlowLoader):
    info = {"num_classes": 3}


@pytest.mark.parametrize("damage", ["truncated", "shape", "dtype", "labels_edited", "label_out_of_range",
                                    "labels_short", "old_meta", "garbage"])
def test_damaged_cache_is_rebuilt_with_a_log_line(tmp_path, caplog, damage):
    """A disk cache whose files no longer match its meta.json (cut short, rewritten with another shape or dtype,
    labels edited, out of range or short, a meta.json without the checks, garbage) used to end the run with a
    traceback and stay broken; it is now found when reused, logged, removed and rebuilt, for the training cache
    and an eval split's cache alike."""
    import numpy as np

    key = {"checkpoint": "/x.pt", "checkpoint_mtime_ns": 1, "dtype": "fp32"}
    backbone = Backbone()

    def train():
        return FeatureCache.build(backbone, lambda augment: LabelledLoader(split="train"), views="center_flip",
                                  num_aug=1, dtype="fp32", location="disk", directory=tmp_path, device=CPU,
                                  batch_size=8, seed=0, amp_ctx=contextlib.nullcontext, key=key)

    def val():
        return EvalFeatures.build(backbone, LabelledLoader(), flip=False, dtype="fp32", location="disk",
                                  directory=tmp_path, device=CPU, amp_ctx=contextlib.nullcontext, key=key)

    # copies: the training cache's features map its file, which the damage below rewrites
    good = {s: (c.features.clone(), c.labels.clone()) for s, c in (("train", train()), ("val", val()))}
    for split, make in (("train", train), ("val", val)):
        entry = tmp_path / entry_name(split, key)
        feats, labels, meta = entry / "features.bin", entry / "labels.npy", entry / "meta.json"
        if damage == "truncated":
            feats.write_bytes(feats.read_bytes()[:-100])
        elif damage in ("shape", "dtype"):  # a complete .npy file, but not the one meta.json describes
            arr = np.load(feats)
            with open(feats, "wb") as f:
                np.save(f, arr[:, :-1] if damage == "shape" else arr.astype(np.float16))
        elif damage == "labels_edited":
            edited = (np.load(labels) + 1) % 3
            with open(labels, "wb") as f:
                np.save(f, edited)
        elif damage == "label_out_of_range":  # labels and their checksum edited together
            from bigltr.engine.feature_store import labels_digest

            bad = np.load(labels)
            bad[0] = 99
            with open(labels, "wb") as f:
                np.save(f, bad)
            m = json.loads(meta.read_text())
            meta.write_text(json.dumps({**m, "labels_sha256": labels_digest(bad)}))
        elif damage == "labels_short":
            short = np.load(labels)[:-1]
            with open(labels, "wb") as f:
                np.save(f, short)
        elif damage == "old_meta":  # written by a bigltr before these checks: key and shape only
            m = json.loads(meta.read_text())
            meta.write_text(json.dumps({"key": m["key"], "shape": m["shape"]}))
        else:
            labels.write_bytes(b"garbage")
        caplog.clear()
        with caplog.at_level("WARNING", logger="bigltr"):
            rebuilt = make()
        msgs = [r.getMessage() for r in caplog.records]
        assert any(f"feature cache: {entry} is damaged (" in s and s.endswith("; rebuilding it") for s in msgs), msgs
        assert torch.equal(rebuilt.features, good[split][0]) and torch.equal(rebuilt.labels, good[split][1])
        reloaded = FeatureCache.load(entry, key, batch_size=8, seed=0) if split == "train" else \
            EvalFeatures.load(entry, key)
        assert reloaded is not None and torch.equal(reloaded.features, good[split][0])
