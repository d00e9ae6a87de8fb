"""Preemption and resume: SIGTERM / the PREEMPT file stop a run at a step boundary with a checkpoint and exit 75,
`resume=auto` continues it, and the result equals the uninterrupted run. A rank killed with SIGKILL makes the
survivors exit within the collective timeout, and the job resumes from its last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _args(shards, out, *extra):
    return ["recipe=tiny_test", f"data.root={shards}", "data.train_aug=none", "stage1.epochs=4", "stage2.epochs=3",
            "stage1.batch_size=8", "stage2.batch_size=8", f"out={out}", "preempt_check_every=1", *extra]


class Proc:
    """A trainer subprocess whose stderr is watched for a line."""

    def __init__(self, cmd, env_extra=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
        env.pop("TRITON_INTERPRET", None)
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
        self.lines, self.seen = [], threading.Event()
        self.wanted = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)
            if self.wanted and self.wanted in line:
                self.seen.set()

    def wait_for(self, text, timeout=240):
        self.wanted = text
        if any(text in ln for ln in self.lines):
            return
        assert self.seen.wait(timeout), f"never saw {text!r}:\n{''.join(self.lines[-40:])}"

    def finish(self, timeout=240):
        rc = self.p.wait(timeout)
        time.sleep(0.2)
        return rc, "".join(self.lines)


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
    assert "stop requested: checkpoint written" in log and (run / "stage1" / "resume.pt").is_file()
    state = torch.load(run / "stage1" / "resume.pt", weights_only=True)
    assert (state["epoch"], state["batch"]) != (4, 0)  # stopped before the end of stage 1

    p = Proc(cmd + ["resume=auto"])  # resumes stage 1, then stops in stage 2 through the PREEMPT file
    p.wait_for("stage2 epoch 1/3")
    (run / "PREEMPT").touch()
    rc, log = p.finish()
    assert rc == 75, log
    assert "resuming" in log and (run / "stage2" / "resume.pt").is_file()

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
    state = torch.load(run / "stage1" / "resume.pt", weights_only=True)
    assert state["epoch"] >= 2
    # resume the same job (fewer epochs left to keep the test short): it continues from the checkpoint
    cmd2 = [c for c in cmd if c != "stage1.epochs=30"] + ["stage1.epochs=" + str(state["epoch"] + 1),
                                                           "resume=auto"]
    rc, log = Proc(cmd2).finish()
    assert rc == 0, log[-3000:]
    assert f"resuming {run / 'stage1' / 'resume.pt'} at epoch {state['epoch'] + 1}" in log
    assert json.loads((run / "results.json").read_text())["stage1"]["test"]["num_samples"] == 80
