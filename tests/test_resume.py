"""Preemption and resume: SIGTERM / the PREEMPT file stop a run at a step boundary with a checkpoint and exit 75,
`resume=auto` continues it, and the result equals the uninterrupted run. A rank killed with SIGKILL makes the
survivors exit within the collective timeout, and the job resumes from its last checkpoint."""
import json
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

from bigltr.engine.resume import latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _args(shards, out, *extra):
    return ["recipe=tiny_test", f"data.root={shards}", "data.train_aug=none", "stage1.epochs=4", "stage2.epochs=3",
            "stage1.batch_size=8", "stage2.batch_size=8", f"out={out}", "preempt_check_every=1", *extra]


def _meta(run, stage):
    return torch.load(latest_checkpoint(run / stage) / "meta.pt", weights_only=True)


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
    assert "resuming" in log and latest_checkpoint(run / "stage2") is not None

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
    # every training sample of every epoch was used once across the interruptions (same sample budget)
    for stage in ("stage1", "stage2"):
        rows = lambda d: (d / stage / "summary.csv").read_text().strip().splitlines()[1:]  # noqa: E731
        assert len(rows(run)) == len(rows(straight))


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
    ckpt = latest_checkpoint(run / "stage1")
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
    from bigltr.engine.common import cosine_schedule
    from bigltr.engine.resume import Progress

    torch.manual_seed(0)
    model, dist = nn.Linear(4, 3), Dist("ddp")

    def progress():
        trainer = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        sched = cosine_schedule(trainer.optimizer, 10)
        return Progress(tmp_path, 1, {"recipe": "x"}, dist=dist, model=model, trainer=trainer, scheduler=sched)

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
    assert latest_checkpoint(tmp_path) == root / "e00000-b00000002"

    with torch.no_grad():
        model.weight.add_(1.0)
    again = progress().restore(latest_checkpoint(tmp_path))
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
    from bigltr.engine.common import cosine_schedule
    from bigltr.engine.resume import Progress

    model = nn.Linear(4, 3)

    def progress(dist):
        trainer = Trainable(model, torch.optim.SGD(model.parameters(), lr=0.1))
        return Progress(tmp_path, 1, {}, dist=dist, model=model, trainer=trainer,
                        scheduler=cosine_schedule(trainer.optimizer, 10))

    progress(Dist("ddp")).checkpoint(0, 3)  # one process, mid-epoch
    ckpt = latest_checkpoint(tmp_path)
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
