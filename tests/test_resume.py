"""Preemption and resume: SIGTERM / the PREEMPT file stop a run at a step boundary with a checkpoint and exit 75,
`resume=auto` continues it, and the result equals the uninterrupted run (every summary.csv number but the timings,
the weights, val/test per class) for every loader: torch with 0, 1, 2 workers and DALI (CPU mode), stage 1 and
stage 2 with online or cached features, 1 and 2 ranks. A rank killed with SIGKILL makes the survivors exit within
the collective timeout, and the job resumes from its last checkpoint.

Run as a script under torchrun (`__main__` below), this module is the 2-rank side of
`test_mid_epoch_resume_is_exact_on_two_ranks`."""
import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Proc

from bigltr.engine.resume import resume_candidates

ROOT = Path(__file__).resolve().parent.parent


def _args(shards, out, *extra):
    # the recipe's random crop + flip stay on: a resume must replay the augmentation draws too
    return ["recipe=tiny_test", f"data.root={shards}", "stage1.epochs=4", "stage2.epochs=3",
            "stage1.batch_size=8", "stage2.batch_size=8", f"out={out}", "preempt_check_every=1", *extra]


def _meta(run, stage):
    return torch.load(resume_candidates(run / stage)[0] / "meta.pt", weights_only=True)


def _model(run, stage, which):
    return torch.load(run / stage / which, weights_only=True)["model"]


def test_interrupted_and_resumed_equals_straight(tiny_shards, tmp_path):
    from bigltr.train import main

    straight = tmp_path / "straight"
    assert main(_args(tiny_shards, straight)) == 0

    run = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "bigltr.train", *_args(tiny_shards, run)]
    p = Proc(cmd)
    p.wait_for("stage1 epoch 1/4")
    p.p.send_signal(signal.SIGTERM)  # a real signal, mid-stage-1
    rc, log = p.finish()
    assert rc == 75, log
    assert "stop requested: checkpoint written" in log
    state = _meta(run, "stage1")
    assert (state["epoch"], state["batch"]) != (4, 0)  # stopped before the end of stage 1

    p = Proc(cmd + ["resume=auto"])  # resumes stage 1, then stops in stage 2 through the PREEMPT file
    p.wait_for("stage2 epoch 1/3")
    (run / "PREEMPT").touch()
    rc, log = p.finish()
    assert rc == 75, log
    assert "resuming" in log and resume_candidates(run / "stage2")

    p = Proc(cmd + ["resume=auto"])
    rc, log = p.finish()
    assert rc == 0, log
    assert "stage 2: resuming" in log and "stage 1: resuming" not in log  # finished stage 1 is not rerun
    assert not (run / "PREEMPT").exists()

    for stage, which in (("stage1", "best.pt"), ("stage1", "last.pt"), ("stage2", "last.pt")):
        a, b = _model(straight, stage, which), _model(run, stage, which)
        for k in a:
            if a[k].is_floating_point():
                assert float((a[k] - b[k]).abs().max()) <= 1e-6, (stage, which, k)
    r1 = json.loads((straight / "results.json").read_text())
    r2 = json.loads((run / "results.json").read_text())
    for stage in ("stage1", "stage2"):
        assert r2[stage]["test"]["per_class"] == r1[stage]["test"]["per_class"]
    # every epoch's numbers (loss, accuracy, steps, samples: every training sample used once across the
    # interruptions, val) are the straight run's, the interrupted epochs' included
    _assert_same_run(straight, run)


def test_loader_replay_draws_nothing_from_the_global_rngs(tiny_shards):
    """What mid-epoch resume rests on, at the loader: an epoch of ShardLoader with random augmentation neither reads
    nor advances the process's torch / numpy / python RNGs (those the checkpoint restores) with any num_workers,
    replays the same augmented batches, and gives with num_workers=0 exactly the batches of num_workers=1."""
    import random

    import numpy as np

    from bigltr.data.loader import ShardLoader
    from bigltr.data.transforms import build_transform

    tf = build_transform(img_size=28, in_chans=1, mean=[0.5], std=[0.5], train=True, aug="cifar")

    def epoch(workers):
        ld = ShardLoader(tiny_shards, "train", batch_size=8, transform=tf, train=True, seed=3, num_workers=workers,
                         shuffle_buffer=64)
        ld.set_epoch(2)
        before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        out = [(x, k) for x, _, k in ld]
        assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
        assert random.getstate() == before[2], workers
        return out

    torch.manual_seed(0)
    w0 = epoch(0)
    torch.manual_seed(1)  # another global state: the same batches
    for other in (epoch(0), epoch(1)):
        assert len(other) == len(w0) == 19
        assert all(ka == kb and torch.equal(xa, xb) for (xa, ka), (xb, kb) in zip(w0, other))


_TIMING = {"epoch_time_s", "img_per_s"}


def _summary(run, stage):
    with open(run / stage / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_run(straight, run):
    """The interrupted-and-resumed `run` is the straight one: every summary.csv value but the timings (train loss
    and accuracy, steps, samples, val, norms, MaxNorm counters) in every epoch, last.pt and best.pt weights (<= 1e-6),
    val and test per class."""
    for stage in ("stage1", "stage2"):
        a, b = _summary(straight, stage), _summary(run, stage)
        assert [r["epoch"] for r in b] == [r["epoch"] for r in a], (stage, b)
        for ra, rb in zip(a, b):
            for k in ra.keys() - _TIMING:
                try:
                    same = math.isclose(float(ra[k]), float(rb[k]), rel_tol=1e-5, abs_tol=1e-6)
                except ValueError:
                    same = ra[k] == rb[k]
                assert same, (stage, ra["epoch"], k, ra[k], rb[k])
        for which in ("best.pt", "last.pt"):
            wa, wb = _model(straight, stage, which), _model(run, stage, which)
            for k in wa:
                if wa[k].is_floating_point():
                    assert float((wa[k] - wb[k]).abs().max()) <= 1e-6, (stage, which, k)
    r1 = json.loads((straight / "results.json").read_text())
    r2 = json.loads((run / "results.json").read_text())
    for stage in ("stage1", "stage2"):
        for split in ("val", "test"):
            assert r2[stage][split]["per_class"] == r1[stage][split]["per_class"], (stage, split)


class _StopAfter(logging.Handler):
    """Creates `<out>/PREEMPT` (the real stop file) when the run logs a line containing `text`. Rank 0 logs the
    epoch lines, after the epoch-end check: the next check, after the next optimiser step
    (preempt_check_every=1), stops every rank mid-epoch, deterministically at batch 1 of the next epoch."""

    def __init__(self, out, text):
        super().__init__()
        self.file, self.text = Path(out) / "PREEMPT", text

    def emit(self, record):
        if self.text in record.getMessage():
            self.file.touch()


def _fresh_store(base, tag, world):
    """Before each in-process run of a multi-rank launch: a new rendezvous store. The trainer destroys its process
    group at the end of a run, and the next group in the same process takes the same store prefix: on torchrun's
    store it can read the last group's stale addresses ("connectFullMesh failed ... Connection refused"). Rank 0
    picks a free port and names it in a file; every rank points MASTER_PORT at it (rank 0 hosts the store)."""
    if world == 1:
        return
    from conftest import free_port

    port_file = base / f".port-{tag}"
    if os.environ["RANK"] == "0":
        tmp = base / f".port-{tag}.tmp"
        tmp.write_text(str(free_port()))
        tmp.rename(port_file)
    deadline = time.time() + 300
    while not port_file.exists():
        assert time.time() < deadline, f"no port for run {tag}"
        time.sleep(0.1)
    os.environ.update(MASTER_PORT=port_file.read_text(), TORCHELASTIC_USE_AGENT_STORE="False")


def _resume_cycle(shards, base, name, extra, world=1):
    """In this process (one rank of a launch when world > 1): the straight run `<base>/<name>-straight`, and
    `<base>/<name>-stopped`: stopped mid-epoch 2 of stage 1, resumed and stopped mid-epoch 2 of stage 2, resumed to
    the end (each stop through the PREEMPT file). Returns the two run folders."""
    from bigltr.train import main

    base = Path(base)
    extra = ["stage1.epochs=3", "stage2.epochs=3", *extra] + ([f"dist.world_size={world}"] if world > 1 else [])
    straight, run = base / f"{name}-straight", base / f"{name}-stopped"
    _fresh_store(base, f"{name}-straight", world)
    assert main(_args(shards, straight, *extra)) == 0
    bigltr_log = logging.getLogger("bigltr")
    for i, (stop_in, code) in enumerate((("stage1", 75), ("stage2", 75), (None, 0))):
        _fresh_store(base, f"{name}-{i}", world)
        handler = _StopAfter(run, f"{stop_in} epoch 1/") if stop_in else None
        if handler:
            bigltr_log.addHandler(handler)
        try:
            assert main(_args(shards, run, *extra, "resume=auto")) == code, (name, i)
        finally:
            if handler:
                bigltr_log.removeHandler(handler)
        if stop_in:
            meta = _meta(run, stop_in)
            assert (meta["epoch"], meta["batch"]) == (1, 1), (name, stop_in, meta["epoch"], meta["batch"])
    return straight, run


@pytest.mark.parametrize("setting", [
    # (pipeline, num_workers, stage-2 features); cached "augment" views: the cache's augmentation draws too
    ("torch", 0, "cached_aug"),  # augmentation in the main process: failed before the loader got its own RNG
    ("torch", 1, "online"),
    ("torch", 2, "cached"),
    ("dali", 1, "online"),  # DALI: num_workers = its CPU threads
    ("dali", 2, "cached_aug"),
], ids=lambda s: f"{s[0]}-w{s[1]}-{s[2]}")
def test_mid_epoch_resume_is_exact_for_every_loader(tiny_shards, tmp_path, setting):
    """Stopped mid-epoch in stage 1 and in stage 2 and resumed, a run equals the straight run: the resumed epoch
    and every later one (train loss and accuracy, val), the weights, the final val/test per class."""
    pipeline, workers, features = (str(v) for v in setting)
    extra = [f"data.pipeline={pipeline}", f"data.num_workers={workers}", f"data.dali_index_dir={tmp_path / 'idx'}",
             f"stage2.features={features.split('_')[0]}"]
    if features == "cached_aug":
        extra += ["stage2.cache.views=augment", "stage2.cache.num_aug=2"]
    straight, run = _resume_cycle(tiny_shards, tmp_path, "r", extra)
    _assert_same_run(straight, run)


# 2 ranks, one launch: several settings one after the other in the same two processes
_TWO_RANK_SETTINGS = {
    "torch-w0-cached": "data.num_workers=0 stage2.features=cached stage2.cache.views=augment stage2.cache.num_aug=2",
    "torch-w2-online": "data.num_workers=2 stage2.features=online",
    "dali-w1-cached": "data.pipeline=dali data.num_workers=1 stage2.features=cached",
}


def test_mid_epoch_resume_is_exact_on_two_ranks(tmp_path):
    """The same on 2 ranks (torchrun, gloo), for several loaders in one launch: each rank restores its own RNG states
    and epoch tallies, and both ranks replay their part of the epoch."""
    from conftest import build_tiny_shards

    # 4 train shards of 40/40/40/39: each rank reads whole shards, and the feature cache's eval-order pass yields
    # 80 / 79 samples, the same batch count on both ranks (with the session's 3 uneven shards a rank would pad its
    # cache pass with repeated batches, which FeatureCache does not handle yet)
    shards = build_tiny_shards(tmp_path / "even", maxcount=40)
    settings = [f"{name} {args} data.dali_index_dir={tmp_path / 'idx'}" for name, args in _TWO_RANK_SETTINGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(shards), str(tmp_path), *settings]
    rc, log = Proc(cmd).finish(timeout=600)
    assert rc == 0, log[-4000:]
    for name in _TWO_RANK_SETTINGS:
        straight, run = tmp_path / f"{name}-straight", tmp_path / f"{name}-stopped"
        assert json.loads((run / "results.json").read_text())["world_size"] == 2
        _assert_same_run(straight, run)


def test_killed_rank_survivors_exit_and_job_resumes(tiny_shards, tmp_path):
    run = tmp_path / "dead"
    # --standalone: torchrun picks a free rendezvous port itself (no race with other tests' ports)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bigltr.train", *_args(tiny_shards, run, "stage1.epochs=30", "dist.timeout_s=20",
                                         "dist.world_size=2", "stage=1")]
    p = Proc(cmd)
    p.wait_for("stage1 epoch 2/30")
    workers = subprocess.run(["pgrep", "-P", str(p.p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    t0 = time.time()
    os.kill(int(workers[-1]), signal.SIGKILL)
    rc, log = p.finish(timeout=120)
    waited = time.time() - t0
    assert rc != 0 and waited < 60, (rc, waited, log[-3000:])
    ckpt = resume_candidates(run / "stage1")[0]
    state = _meta(run, "stage1")  # epoch 2's checkpoint may have been cut short by the kill: then epoch 1's
    assert state["epoch"] >= 1 and not list((run / "stage1" / "resume").glob(f"e{state['epoch'] + 1:05d}-*"))
    # resume the same job (fewer epochs left to keep the test short): it continues from the checkpoint
    cmd2 = [c for c in cmd if c != "stage1.epochs=30"] + ["stage1.epochs=" + str(state["epoch"] + 1),
                                                           "resume=auto"]
    rc, log = Proc(cmd2).finish()
    assert rc == 0, log[-3000:]
    assert f"resuming {ckpt} at epoch {state['epoch'] + 1}" in log
    assert json.loads((run / "results.json").read_text())["stage1"]["test"]["num_samples"] == 80


def test_signals_reach_the_workers_through_torchrun_and_accelerate(tiny_shards, tmp_path):
    """A signal to the LAUNCHER (what Slurm and schedulers signal): torchrun's agent forwards only SIGTERM, SIGINT,
    SIGHUP and SIGQUIT by default, and SIGUSR1 kills it without a checkpoint. With PET_SIGNALS_TO_HANDLE naming
    SIGUSR1 (slurm/lib.sh exports it) the agent forwards USR1 too. Both workers then finish the step, checkpoint
    and exit 75; the launcher reports a failure (exit 1: a SignalException or ChildFailedError traceback)."""
    from conftest import free_port

    env = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "ACCELERATE_USE_CPU": "1"}
    args = ("stage1.epochs=30", "stage=1", "dist.world_size=2", "dist.timeout_s=60")
    launches = {
        "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                      "-m", "bigltr.train"], signal.SIGUSR1),
        "accelerate": ([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                        "recipes/accelerate/ddp.yaml", "--num_processes", "2", "--main_process_port", str(free_port()),
                        "bigltr/train.py"], signal.SIGTERM),
    }
    for name, (launcher, sig) in launches.items():
        run = tmp_path / name
        p = Proc(launcher + _args(tiny_shards, run, *args), env)
        p.wait_for("stage1 epoch 1/30")
        p.p.send_signal(sig)  # the launcher only (the test's Proc runs it in its own session)
        rc, log = p.finish()
        assert rc != 0, log[-3000:]
        assert log.count(f"received signal {sig.name}") == 2, (name, log[-3000:])  # both workers
        assert log.count("stop requested: checkpoint written") == 2 and log.count("exiting with 75") == 2, \
            (name, log[-3000:])
        meta = _meta(run, "stage1")
        assert meta["world_size"] == 2 and (meta["epoch"], meta["batch"]) < (30, 0)


def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path):
    """What a kill during a save leaves (a half-written temporary folder, a folder without meta.pt) is never
    picked: resume=auto takes the previous complete checkpoint, which restores exactly what it saved (weights,
    momentum, schedule, position), and the next complete save clears the debris and keeps the newest two."""
    import torch.nn as nn

    from bigltr.distributed import Dist, Trainable
    from bigltr.engine.optim import cosine_schedule
    from bigltr.engine.resume import StageState

    torch.manual_seed(0)
    model, dist = nn.Linear(4, 3), Dist("ddp")

    def progress():
        trainer = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        sched = cosine_schedule(trainer.optimizer, 10)
        return StageState(tmp_path, 1, {"recipe": "x"}, dist=dist, model=model, trainer=trainer, scheduler=sched)

    prog = progress()
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        prog.trainer.step()
        prog.scheduler.step()
    prog.checkpoint(0, 2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    buf = prog.trainer.optimizer.state[model.weight]["momentum_buffer"].clone()
    root = tmp_path / "resume"
    (root / ".tmp-e00000-b00000003" / "dcp").mkdir(parents=True)  # a save killed while writing
    (root / ".tmp-e00000-b00000003" / "dcp" / "__0_0.distcp").write_bytes(b"partial")
    (root / "e00000-b00000004").mkdir()  # a folder with no meta.pt (never made by bigltr, but never trusted)
    assert resume_candidates(tmp_path)[0] == root / "e00000-b00000002"

    with torch.no_grad():
        model.weight.add_(1.0)
    again = progress().restore(resume_candidates(tmp_path)[0])
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert torch.equal(again.trainer.optimizer.state[model.weight]["momentum_buffer"], buf)
    assert again.scheduler.last_epoch == 2 and (again.epoch, again.batch) == (0, 2) and again.resumed

    again.checkpoint(0, 5)
    again.checkpoint(1, 0)
    assert sorted(p.name for p in root.iterdir()) == ["e00000-b00000005", "e00001-b00000000"]


def test_a_checkpoint_the_run_cannot_read_is_a_clear_error(tmp_path):
    """Checked from meta.pt before any collective: DCP vs DeepSpeed format, ZeRO stage, world size mid-epoch."""
    import torch.nn as nn

    from bigltr.config import ConfigError
    from bigltr.distributed import Dist, Trainable
    from bigltr.engine.optim import cosine_schedule
    from bigltr.engine.resume import StageState

    model = nn.Linear(4, 3)

    def progress(dist):
        trainer = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1))
        return StageState(tmp_path, 1, {}, dist=dist, model=model, trainer=trainer,
                        scheduler=cosine_schedule(trainer.optimizer, 10))

    progress(Dist("ddp")).checkpoint(0, 3)  # one process, mid-epoch
    ckpt = resume_candidates(tmp_path)[0]
    cases = [(Dist("deepspeed", world_size=2, zero_stage=2), "written by dist.backend=ddp on 1 process(es) (dcp"),
             (Dist("fsdp2", world_size=2), "written by 1 process(es), this run has 2: a mid-epoch position")]
    for dist, words in cases:
        with pytest.raises(ConfigError, match=re.escape(words)):
            progress(dist).restore(ckpt)
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    torch.save({**meta, "format": "deepspeed", "zero_stage": 3, "world_size": 2}, ckpt / "meta.pt")
    with pytest.raises(ConfigError, match="written with ZeRO stage 3; resume it with dist.zero_stage=3"):
        progress(Dist("deepspeed", world_size=2, zero_stage=1)).restore(ckpt)
    with pytest.raises(ConfigError, match=re.escape("(deepspeed format)")):
        progress(Dist("ddp")).restore(ckpt)


if __name__ == "__main__":  # one rank of test_mid_epoch_resume_is_exact_on_two_ranks's torchrun launch
    _shards, _base, *_settings = sys.argv[1:]
    for _setting in _settings:
        _name, *_extra = _setting.split()
        _resume_cycle(_shards, _base, _name, _extra, world=int(os.environ["WORLD_SIZE"]))
