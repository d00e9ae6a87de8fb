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
from bigltr.engine.common import evaluate
from bigltr.engine.context import RunContext
from bigltr.engine.feature_cache import EvalFeatures, FeatureCache, entry_name
from bigltr.models import build_model

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


def _ctx(tiny_shards, tmp_path, dist, *extra):
    cfg = build_config(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={tmp_path}", *extra])
    ctx = RunContext.create(cfg, dist)
    ctx.device = CPU
    return ctx


def _model(ctx, ckpt):
    model = build_model(ctx.cfg.model.name, ctx.num_classes, in_chans=ctx.cfg.data.in_chans, pretrained=False)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    model.eval()
    # a head that tells images apart (the 1-epoch stage-1 head predicts nearly one class): random directions
    # through the mean feature
    images = next(iter(ctx.loader("val", train=False, batch_size=60)))[0]
    with torch.no_grad():
        mean = model.backbone(images).mean(0)
        w = model.classifier.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        model.classifier.bias.copy_(-model.classifier.weight @ mean)
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
    online = ctx.final_eval(model, 16, "none")
    cache = {s: _features(ctx, model, s, flip=True) for s in ("val", "test")}
    cached = ctx.final_eval(model, 16, "none", features=cache.__getitem__)
    assert cached == online
    assert len(set(online["test"]["per_class"])) > 2 and 0 < online["test"]["all"] < 100  # not a degenerate head
    # the flipped view is the backbone on flipped images (not a flip of features)
    images = next(iter(ctx.loader("val", train=False, batch_size=16)))[0]
    (centre, flipped), _, _ = next(iter(cache["val"]))
    with torch.no_grad():
        assert torch.equal(flipped, model.backbone(torch.flip(images, dims=[3])))
        assert torch.equal(centre, model.backbone(images))
    # per-epoch validation (no TTA) on a flip cache: the centre view only
    per_epoch = ctx.evaluate(torch.nn.Identity(), {"m": model.classifier}, cache["val"], "none", "val")
    assert per_epoch == ctx.evaluate(model.backbone, {"m": model.classifier},
                                     ctx.loader("val", train=False, batch_size=16), "none", "val")
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
    ref = single.evaluate(model.backbone, clf, single.loader("test", train=False, batch_size=16), "none", "test")
    for cached in (False, True):
        r1 = FakeDist(rank=1, world_size=2)
        ctx1 = _ctx(tiny_shards, tmp_path, r1)
        loader1 = _features(ctx1, model, "test", flip=False) if cached else ctx1.loader("test", train=False,
                                                                                          batch_size=16)
        evaluate(backbone=model.backbone, classifiers=clf, loader=loader1, num_classes=10, device=CPU, dist=r1)
        ctx0 = _ctx(tiny_shards, tmp_path, FakeDist(rank=0, world_size=2, others=[r1.sent]))
        loader0 = _features(ctx0, model, "test", flip=False) if cached else ctx0.loader("test", train=False,
                                                                                          batch_size=16)
        assert ctx0.evaluate(model.backbone, clf, loader0, "none", "test") == ref
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
        assert on_cached[split]["per_class"] == online[split]["per_class"], split
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
