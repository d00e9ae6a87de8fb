"""Real 2-process gloo runs: DDP (torchrun), FSDP2 (`accelerate launch`) and DeepSpeed ZeRO-1/2/3 (torchrun and
`accelerate launch`) train the same model as one process on the same data and seed, and evaluate every sample
exactly once.

Full-batch training makes the comparison exact: `stage1.batch_size` is the GLOBAL batch, so the same value (156, the
whole training set) on 1 and 2 processes gives each rank half of it; the gradient average over ranks equals the
single-process gradient, and the order of samples does not matter. The
backbone (timm's test_efficientnet_gn) uses GroupNorm, whose statistics are per sample, so nothing depends on
how the batch is split. Shards are sized so each rank gets exactly half of the training set and uneven val/test
shards exercise the padding + de-duplication of exact evaluation.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Proc, free_port
import torch

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory):
    from conftest import build_tiny_shards  # noqa: E402

    # train: 156 images in 6 shards of 26 (3 per rank); val 60 = 26+26+8, test 80 = 26+26+26+2 (uneven)
    out = build_tiny_shards(tmp_path_factory.mktemp("dist"), n_max=39, maxcount=26)
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [26] * 6
    return out


def _common(shards, batch):
    return ["recipe=tiny_test", f"data.root={shards}", "data.train_aug=none", "model.name=test_efficientnet_gn",
            "stage1.epochs=2", "stage2.epochs=2", f"stage1.batch_size={batch}", f"stage2.batch_size={batch}",
            "stage1.lr=0.05", "stage2.lr=0.5", "stage2.maxnorm.radius=0.0", "dist.timeout_s=120", "log_every=1",
            "preempt_check_every=1"]


def _launch(cmd, env_extra, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-5000:]}"
    return r


def _interrupted_then_resumed(cmd, out: Path, env_extra: dict, stage: int = 1) -> None:
    """Stop the run through RUN/PREEMPT at the first step of `stage` (checkpoint, exit), then resume it to the end."""
    p = Proc(cmd + [f"out={out}"], env_extra)
    p.wait_for(f"stage {stage}: ")  # the stage's model is built and wrapped: its first stop check sees the file
    (out / "PREEMPT").touch()
    rc, log = p.finish()
    assert rc != 0 and "stop requested: checkpoint written at epoch 1" in log, log[-3000:]
    assert "75" in log  # the trainer's EX_TEMPFAIL, reported through the launcher
    r = _launch(cmd + [f"out={out}", "resume=auto"], env_extra)
    assert f"stage {stage}: resuming" in r.stderr and f"stage{stage}/resume/e00000-b" in r.stderr


def _weights(run: Path, stage: str, which: str) -> dict:
    return torch.load(run / stage / which, weights_only=True)["model"]


@pytest.fixture(scope="module")
def single(even_shards, tmp_path_factory):
    """The reference: one process, full batch."""
    from bigltr.train import main

    out = tmp_path_factory.mktemp("single")
    assert main(_common(even_shards, 156) + [f"out={out}"]) == 0
    # the comparison is not vacuous: stage 2 moved the classifier, and MaxNorm clipped rows
    s1, s2 = _weights(out, "stage1", "best.pt"), _weights(out, "stage2", "last.pt")
    assert not torch.allclose(s1["classifier.weight"], s2["classifier.weight"], rtol=1e-3)
    return out


def _assert_same_as_single(single: Path, run: Path) -> None:
    ref = json.loads((single / "results.json").read_text())
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2
    # the global batch the optimizer saw is the single process's: 2 processes x 78 (x 1 step, or 39 x 2 steps)
    for stage in ("stage1", "stage2"):
        plan = res[stage]["batch"]
        assert plan["global"] == ref[stage]["batch"]["global"] == 156 and plan["processes"] == 2
        assert plan["per_process"] * plan["accum_steps"] == 78
    assert "# stage1: global batch 156 = 2 process(es) x" in (run / "config.yaml").read_text()
    for stage, which in (("stage1", "best.pt"), ("stage2", "last.pt")):
        a, b = _weights(single, stage, which), _weights(run, stage, which)
        assert a.keys() == b.keys()
        for k in a:
            if a[k].is_floating_point():
                err = float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
                assert err <= 1e-5, f"{run.name} {stage} {k}: relative difference {err:.2e}"
    # every stage-2 row inside the ball
    radius = res["stage2"]["maxnorm_radius"]
    w = _weights(run, "stage2", "last.pt")["classifier.weight"]
    assert float(w.norm(dim=1).max()) <= radius + 1e-5
    # exact evaluation: each sample once, per-class numbers equal the single process's
    for stage in ("stage1", "stage2"):
        for split, n in (("val", 60), ("test", 80)):
            assert res[stage][split]["num_samples"] == n
            assert res[stage][split]["per_class"] == ref[stage][split]["per_class"], (run.name, stage, split)
    summary = (run / "stage2" / "summary.csv").read_text().splitlines()
    clipped = [int(float(v)) for v in _column(summary, "maxnorm_clipped_rows")]
    assert clipped[0] > 0  # MaxNorm bound on every rank's view of the rows (FSDP2: summed over shards)


def _column(csv_lines, name):
    header = csv_lines[0].split(",")
    return [row.split(",")[header.index(name)] for row in csv_lines[1:]]


def test_ddp_and_fsdp2_match_single_process(even_shards, single, tmp_path):
    ddp = tmp_path / "ddp"
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "bigltr.train", *_common(even_shards, 156), f"out={ddp}", "dist.backend=ddp",
                 "dist.world_size=2"], {})
    assert "2 process(es) (ddp, gloo)" in r.stderr
    _assert_same_as_single(single, ddp)
    # FSDP2 through accelerate's FSDP config, stopped in stage 1 and resumed from its sharded (DCP) checkpoint
    fsdp = tmp_path / "fsdp2"
    _interrupted_then_resumed(
        [str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/fsdp2.yaml", "--num_processes", "2",
         "--main_process_port", str(free_port()), "bigltr/train.py", *_common(even_shards, 156), "dist.backend=fsdp2",
         "dist.world_size=2", "stage2.features=cached", "stage2.cache.views=center", "stage2.cache.dtype=fp32"],
        fsdp, {"ACCELERATE_USE_CPU": "1"})
    assert (fsdp / "stage2" / "resume").is_dir()
    _assert_same_as_single(single, fsdp)


def test_deepspeed_zero_1_2_3_match_single_process(even_shards, single, tmp_path):
    """ZeRO keeps flat fp32 master partitions that cut across class rows: MaxNorm must reach the master too,
    otherwise the next step (which starts from the master) undoes the projection and the weights diverge.
    ZeRO-2 runs through `accelerate launch` with 2-step gradient accumulation (2 x 39 per rank = the same
    full-batch gradient); ZeRO-3 partitions every parameter (persistence threshold 0), trains on cached
    features, and is stopped in stage 1 and resumed from DeepSpeed's per-rank checkpoint; ZeRO-1 is stopped in
    stage 2 and resumed (classifier engine + the frozen backbone saved outside it)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bigltr.train"]
    runs = {
        1: torchrun + [*_common(even_shards, 156), "dist.zero_stage=1"],
        2: [str(BIN / "accelerate"), "launch", "--config_file", "recipes/accelerate/deepspeed_zero2.yaml",
            "--num_processes", "2", "--gradient_accumulation_steps", "2", "--main_process_port", str(free_port()),
            "bigltr/train.py", *_common(even_shards, 156), "stage1.micro_batch_size=39",
            "dist.zero_stage=2"],
        3: torchrun + [*_common(even_shards, 156), "dist.zero_stage=3", "dist.zero3_persistence_threshold=0",
                       "stage2.features=cached", "stage2.cache.views=center", "stage2.cache.dtype=fp32"],
    }
    for stage, cmd in runs.items():
        out = tmp_path / f"zero{stage}"
        cmd = cmd + ["dist.backend=deepspeed", "dist.world_size=2"]
        if stage == 1:  # stage 2's checkpoint: the classifier engine + the frozen backbone outside it
            _interrupted_then_resumed(cmd, out, {}, stage=2)
            assert (next((out / "stage2" / "resume").glob("e*")) / "outside_engine.pt").is_file()
        elif stage == 3:
            _interrupted_then_resumed(cmd, out, {})
            ckpt = next((out / "stage1" / "resume").glob("e*"))
            assert sorted(f.name for f in (ckpt / "deepspeed" / "state").glob("zero_pp_rank_*_optim_states.pt")) == \
                ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
        else:
            r = _launch(cmd + [f"out={out}"], {"ACCELERATE_USE_CPU": "1"})
            assert f"2 process(es) (deepspeed ZeRO-{stage}, gloo)" in r.stderr
        _assert_same_as_single(single, out)


def test_world_size_mismatch_is_a_startup_error(even_shards, tmp_path, capsys):
    from bigltr.train import main

    assert main(_common(even_shards, 78) + [f"out={tmp_path}", "dist.world_size=2"]) == 2
    err = capsys.readouterr().err
    assert "dist.world_size=2" in err and "--cpu --num_processes 2" in err


def test_two_ranks_read_disjoint_complete_and_in_step(tiny_shards, tmp_path):
    """Uneven shards (train 64+64+31, test 64+16), 2 gloo ranks: equal batch counts on every rank, no sample on two
    ranks, eval covers every sample once (after de-duplicating the padding), epochs differ in order."""
    info = json.loads((tiny_shards / "_info.json").read_text())
    out = tmp_path / "seen.json"
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "tests/dist_loader_check.py", str(tiny_shards), str(out)], {})
    ranks = json.loads(out.read_text())
    for split in ("train", "val", "test"):
        n = info["splits"][split]["num_samples"]
        for epoch in (0, 1):
            per_rank = [r[split][epoch] for r in ranks]
            assert per_rank[0]["batches"] == per_rank[1]["batches"] == per_rank[0]["len"], (split, epoch)
            keys = [set(r["keys"]) for r in per_rank]
            assert not (keys[0] & keys[1]), (split, epoch)
            covered = len(keys[0] | keys[1])
            if split != "train":
                assert covered == n  # complete
            else:  # uneven shards -> split by sample: full batches only, under one batch (+1) lost per rank
                assert covered == 2 * 8 * per_rank[0]["len"] and covered >= n - 2 * (8 + 1)
                assert len(per_rank[0]["keys"]) == len(set(per_rank[0]["keys"]))
    assert ranks[0]["train"][0]["keys"] != ranks[0]["train"][1]["keys"]  # reshuffled per epoch


@pytest.mark.parametrize("args, env, words", [
    (("ddp", 2, "none", 1), {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed but dist.backend=ddp"),
    (("deepspeed", 3, "none", 1), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     "ZeRO stage 2 but dist.zero_stage=3"),
    (("deepspeed", 2, "none", 1), {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"},
     "gradient_accumulation_steps=4 but stage1.batch_size"),
    (("ddp", 2, "none", 1), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "set dist.backend=fsdp2"),
    (("fsdp2", 2, "none", 1), {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2"),
    (("ddp", 2, "none", 1), {"ACCELERATE_MIXED_PRECISION": "bf16"}, "set stage1.amp=bf16"),
])
def test_launcher_config_disagreeing_with_bigltr_config_is_a_startup_error(args, env, words, monkeypatch, capsys,
                                                                            even_shards, tmp_path):
    from bigltr.distributed import DistError, check_launcher
    from bigltr.train import main

    with pytest.raises(DistError, match=words):
        check_launcher(*args, env=env)
    # ... and what each accelerate config in recipes/accelerate asks for, with the matching bigltr keys, agrees
    check_launcher("deepspeed", 2, "none", 1, env={"ACCELERATE_USE_DEEPSPEED": "true",
                                                   "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    check_launcher("fsdp2", 2, "none", 1, env={"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    check_launcher("ddp", 2, "bf16", 1, env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    # through the entry point: exit 2 with the message, before any data is read
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    backend, stage, amp, accum = args
    assert main(_common(even_shards, 78) + [f"out={tmp_path}", f"dist.backend={backend}", f"dist.zero_stage={stage}",
                                            f"stage1.amp={amp}"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_every_accelerate_config_loads_and_agrees_with_the_keys_it_documents():
    """Each recipes/accelerate/*.yaml is read by Accelerate's own loader, and what it asks for (in the environment
    `accelerate launch` exports from it) agrees with the bigltr keys on its first line."""
    from accelerate.commands.config.config_args import load_config_from_file

    from bigltr.config import batch_plan, build_config
    from bigltr.distributed import check_launcher

    files = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp2", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3", "bf16"}
    for f in files:
        c = load_config_from_file(str(f))
        env = {"ACCELERATE_MIXED_PRECISION": str(c.mixed_precision)}
        if c.distributed_type.value == "DEEPSPEED":
            ds = c.deepspeed_config
            env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(ds["zero_stage"]),
                       ACCELERATE_GRADIENT_ACCUMULATION_STEPS=str(ds["gradient_accumulation_steps"]))
        elif c.distributed_type.value == "FSDP":
            env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION=str(c.fsdp_config["fsdp_version"]))
        lines = f.read_text().splitlines()
        usage = lines[0] + (" " + lines[1].lstrip("# ") if lines[0].endswith("\\") else "")  # the launch command
        keys = [w for w in usage.split() if "=" in w and not w.endswith("...")]
        assert keys, f"{f.name}: no bigltr keys in its usage line"
        cfg = build_config(["recipe=tiny_test", *keys])
        check_launcher(cfg.dist.backend, cfg.dist.zero_stage, cfg.stage1.amp,
                       batch_plan(cfg.stage1, 2, "stage1").accum_steps, env=env)


def test_class_balanced_cached_features_are_one_global_sequence_on_two_ranks(tmp_path, monkeypatch):
    """cRT's class-balanced sampling (stage2.sampler=class_balanced, cached features) through the real trainer,
    1 process and 2 gloo ranks (torchrun), on shards where each rank's own part lacks a tail class (78 images in
    10 shards of 8; rank 0 reads shards 0, 2, ..., rank 1 shards 1, 3, ...). Every rank gathers every rank's cached
    rows, so: the two ranks' draws interleaved (rank r takes positions r, r+2, ...) are the 1-process global
    sequence draw for draw (key, view, label, features), hence each step's global batch is the 1-process batch;
    ranks take disjoint positions; per epoch each class is drawn floor(T/C) or ceil(T/C) times over both ranks,
    including the class a rank does not hold; a rank reloaded from its disk cache and gathered again (a restarted
    run) yields the same batches after skipping k, as does the sampler's set_epoch(start); and the stage-2 weights
    equal the 1-process ones. Then the image stream (stage2.features=online) on 2 ranks gives the weights of the
    cached centre view on 1 process."""
    from conftest import build_tiny_shards
    from dist_balanced_check import Recorder

    from bigltr.train import main

    shards = build_tiny_shards(tmp_path / "data", n_max=20, maxcount=8)
    s1 = tmp_path / "s1"
    common = ["recipe=tiny_test", f"data.root={shards}", "data.train_aug=none", "dist.timeout_s=120"]
    assert main(common + [f"out={s1}", "stage=1", "stage1.epochs=1"]) == 0
    stage2 = common + ["stage=2", f"stage1_checkpoint={s1 / 'stage1' / 'best.pt'}", "stage2.epochs=2",
                       "stage2.batch_size=16", "stage2.features=cached", "stage2.sampler=class_balanced",
                       "stage2.classifier_init=reinit", "stage2.loss=ce", "stage2.maxnorm.when=off",
                       "stage2.weight_decay=0", "stage2.cache.views=center_flip", "stage2.cache.dtype=fp32",
                       "stage2.cache.location=disk"]
    rec = Recorder()
    rec.install(monkeypatch.setattr)
    one = tmp_path / "one"
    assert main(stage2 + [f"out={one}"]) == 0
    monkeypatch.undo()
    two, seen = tmp_path / "two", tmp_path / "seen"
    seen.mkdir()
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "tests/dist_balanced_check.py", str(seen), *stage2, f"out={two}", "dist.world_size=2"], {})
    assert "gathered every rank's rows for class-balanced sampling: 2 view(s) x 78 samples" in r.stderr
    ranks = [json.loads((seen / f"rank{i}.json").read_text()) for i in (0, 1)]

    info = json.loads((shards / "_info.json").read_text())
    n, classes = info["splits"]["train"]["num_samples"], info["num_classes"]
    assert n == 78 and rec.local_labels is None  # one process gathers nothing
    missing = [set(range(classes)) - set(rk["local_labels"]) for rk in ranks]
    assert missing[0] and missing[1] and sum(len(rk["local_labels"]) for rk in ranks) == n  # each lacks a class
    for epoch in ("0", "1"):
        ref = [d for batch in rec.epochs[int(epoch)] for d in batch]  # the 1-process sequence of draws
        batches = [rk["epochs"][epoch] for rk in ranks]
        assert len(batches[0]) == len(batches[1]) == 4 and all(len(b) == 8 for rb in batches for b in rb)
        inter = [batches[i % 2][k][(i % 16) // 2] for k in range(4) for i in range(k * 16, k * 16 + 16)]
        assert len(ref) == len(inter) == 64 == 4 * 16  # 78 // 16 steps of the global batch 16
        assert [d[:3] for d in inter] == [d[:3] for d in ref], epoch  # key, view, label: draw for draw
        assert all(abs(a[3] - b[3]) <= 1e-4 * max(1.0, abs(b[3])) for a, b in zip(inter, ref))  # and features
        for k in range(4):  # each step's global batch, as a multiset
            assert sorted(d[0] for d in inter[k * 16:(k + 1) * 16]) == sorted(d[0] for d in ref[k * 16:(k + 1) * 16])
        counts = torch.bincount(torch.tensor([d[2] for d in inter]), minlength=classes).tolist()
        assert set(counts) <= {64 // classes, -(-64 // classes)} and sum(counts) == 64, counts
        for i, rk in enumerate(batches):  # a rank draws the tail classes it does not hold
            assert missing[i] & {d[2] for b in rk for d in b}
        assert [d[0] for b in batches[0] for d in b] != [d[0] for b in batches[1] for d in b]
    assert ranks[0]["epochs"]["0"] != ranks[0]["epochs"]["1"]  # a new draw each epoch
    for rk in ranks:
        assert rk["resume"] == {"reloaded_tail_equal": True, "batches_compared": 2, "sampler_start_equal": True,
                                "all_gather_rows_bf16": True}
    a, b = _weights(one, "stage2", "last.pt"), _weights(two, "stage2", "last.pt")
    for k in ("classifier.weight", "classifier.bias"):
        err = float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
        assert err <= 1e-5, f"stage2 {k}: relative difference {err:.2e}"

    # The image stream (stage2.features=online, BalancedShardLoader) on 2 ranks with a worker each draws the same
    # global sequence as the cached features on 1 process: without augmentation and with the centre view only, the
    # stage-2 weights agree (the backbone runs per batch instead of once per sample)
    center = [a.replace("views=center_flip", "views=center") for a in stage2]
    cached = tmp_path / "cached"
    assert main(center + [f"out={cached}"]) == 0
    online = tmp_path / "online"
    r = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "bigltr.train", *center, "stage2.features=online", "data.num_workers=1",
                 f"data.dali_index_dir={tmp_path / 'index'}", f"out={online}", "dist.world_size=2"], {})
    assert "class-balanced image stream over split 'train'" in r.stderr and "78 usable samples of 10 classes" in r.stderr
    a, b = _weights(cached, "stage2", "last.pt"), _weights(online, "stage2", "last.pt")
    for k in ("classifier.weight", "classifier.bias"):
        err = float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
        assert err <= 1e-5, f"online stage2 {k}: relative difference {err:.2e}"
