"""slurm/*.sh: the job scripts run with stand-in srun / scontrol / sbatch / accelerate executables and SLURM_*
variables (launch command lines, per-node machine rank, preemption -> PREEMPT file -> exit 75 -> requeue, exit
codes, stage-2 jobs, errors), plus one real single-node 2-process CPU run through slurm/train.sh.

The stand-in srun strips its options and starts the command once per node (SLURM_NNODES) with SLURM_NODEID and
SLURM_PROCID set, as Slurm does, so the per-task `--machine_rank $SLURM_NODEID` is checked for real.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, stand_in_bin

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
BIN = Path(sys.executable).parent
JOB_SCRIPTS = ["train.sh", "inat_stage1.sh", "inat_stage2.sh", "imagenet_lt_stage1.sh", "imagenet_lt_stage2.sh"]

SRUN = r"""#!/bin/bash
printf '%s\0' "$@" > "$FAKE_LOG/srun.argv"
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
pids=()
for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p"; r=$?; [ "$r" -gt "$rc" ] && rc=$r; done
exit "$rc"
"""
SCONTROL = r"""#!/bin/bash
echo "scontrol $*" >> "$FAKE_LOG/events"
if [ "$1 $2" = "show hostnames" ]; then
    sleep "${FAKE_SCONTROL_SLEEP:-0}"
    printf '%s\n' ${FAKE_HOSTS:-gpu-a07 gpu-b12}
fi
if [ "$1" = requeue ] && [ -n "${FAKE_REQUEUE_FAILS:-}" ]; then exit 1; fi
exit 0
"""
SBATCH = r"""#!/bin/bash
n=$(( $(ls "$FAKE_LOG" | grep -c '^sbatch\.') + 1 ))
printf '%s\0' "$@" > "$FAKE_LOG/sbatch.$n"
echo "$((1000 + n));cluster0"
"""
# Stand-in `accelerate`: records its argv and a few variables per node, then behaves as FAKE_MODE says:
#   exit (default): exit FAKE_RC; preempt: wait for RUN/PREEMPT (optionally deleting it once first, as the trainer
#   does with a stale file at start-up), "checkpoint", exit FAKE_RC (default 75; the real `accelerate launch`
#   reports its workers' 75 as 1). A USR1 reaching it is recorded.
ACCELERATE = r"""#!/bin/bash
node=${SLURM_NODEID:-x}
trap 'echo "accelerate $node got USR1" >> "$FAKE_LOG/events"' USR1
printf '%s\0' "$@" > "$FAKE_LOG/accelerate.$node.argv"
echo "ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-} PWD=$PWD" > "$FAKE_LOG/accelerate.$node.env"
run=
for a in "$@"; do case "$a" in out=*) run=${a#out=} ;; esac; done
echo "accelerate $node started" >> "$FAKE_LOG/events"
wait_preempt() {  # at most 20 s: a broken script must not leave stand-ins behind
    for ((i = 0; i < 400; i++)); do [ -f "$run/PREEMPT" ] && return; sleep 0.05; done
    echo "accelerate $node gave up" >> "$FAKE_LOG/events"
    exit 99
}
if [ "${FAKE_MODE:-exit}" = preempt ]; then
    if [ "$node" = 0 ] && [ -n "${FAKE_DELETE_ONCE:-}" ]; then
        wait_preempt
        rm -f "$run/PREEMPT"
        echo "accelerate $node deleted PREEMPT" >> "$FAKE_LOG/events"
    fi
    wait_preempt
    sleep 0.3  # finish the step, write the checkpoint
    echo "accelerate $node exit ${FAKE_RC:-75}" >> "$FAKE_LOG/events"
    exit "${FAKE_RC:-75}"
fi
if [ -n "${FAKE_TOUCH:-}" ]; then touch "$run/PREEMPT"; fi  # a stop requested from outside (a user)
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def cluster(tmp_path):
    """Stand-in executables on PATH, a fake checkout (its slurm/ is the real one, so default run directories land
    in tmp_path) and the environment of a 2-node x 4-GPU allocation."""
    log, root = tmp_path / "log", tmp_path / "checkout"
    for d in (log, root):
        d.mkdir()
    (root / "slurm").symlink_to(SLURM)
    bin_dir = stand_in_bin(tmp_path / "bin", {"srun": SRUN, "scontrol": SCONTROL, "sbatch": SBATCH,
                                              "accelerate": ACCELERATE})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BIGLTR_", "GPUS_PER_NODE"))}
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), BIGLTR_ROOT=str(root),
               SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a07,gpu-b12",
               SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="40", SLURM_SUBMIT_DIR=str(root),
               SLURM_NODEID="0", SLURM_PROCID="0")
    return {"env": env, "log": log, "root": root, "tmp": tmp_path}


def _run(cluster, script, *args, cwd=None, **env):
    e = {**cluster["env"], **env}
    return subprocess.run(["bash", str(SLURM / script), *args], env=e, cwd=cwd or cluster["tmp"],
                          capture_output=True, text=True, timeout=60)


def _start(cluster, script, **env):
    """The batch script in its own session (so that a hung test can end all of it), stand-ins included."""
    return subprocess.Popen(["bash", str(SLURM / script)], cwd=cluster["tmp"], env={**cluster["env"], **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _communicate(p):
    try:
        return p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise


def _wait_until(p, cond) -> None:
    deadline = time.time() + 20
    while not cond():
        if p.poll() is not None or time.time() > deadline:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            pytest.fail(f"the batch script did not get there (exit {p.returncode})\n{out}\n{err}")
        time.sleep(0.02)


def _argv(path: Path) -> list[str]:
    return path.read_text().split("\0")[:-1]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _events(cluster) -> list[str]:
    f = cluster["log"] / "events"
    return f.read_text().splitlines() if f.exists() else []


def _requeues(cluster) -> list[str]:
    return [e for e in _events(cluster) if e.startswith("scontrol requeue")]


def test_job_script_headers():
    for name in JOB_SCRIPTS:
        lines = (SLURM / name).read_text().splitlines()
        assert lines[0] == "#!/bin/bash"
        first_code = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
        opts = dict(re.match(r"#SBATCH (--[\w-]+)(?:=(\S+))?", ln).groups() for ln in lines if ln.startswith("#SBATCH"))
        # sbatch stops reading directives at the first command
        assert all(i < first_code for i, ln in enumerate(lines) if ln.startswith("#SBATCH")), name
        assert opts["--ntasks-per-node"] == "1" and opts["--signal"] == "B:USR1@90", name
        assert opts["--open-mode"] == "append" and "--requeue" in opts and "%j" in opts["--output"], name
        assert int(opts["--nodes"]) >= 1 and re.fullmatch(r"gpu:\d+", opts["--gres"]), name
        assert int(opts["--cpus-per-task"]) >= 1 and re.fullmatch(r"\d+:\d\d:\d\d", opts["--time"]), name
        subprocess.run(["bash", "-n", str(SLURM / name)], check=True)
        assert os.access(SLURM / name, os.X_OK), name


def test_inat_stage1_launches_one_accelerate_per_node(cluster):
    """(a) 2 nodes x 4 GPUs: the accelerate command line of each node, run from a spool copy as sbatch does."""
    spool = cluster["tmp"] / "spool"
    spool.mkdir()
    shutil.copy(SLURM / "inat_stage1.sh", spool / "slurm_script")
    env = {k: v for k, v in cluster["env"].items() if k != "BIGLTR_ROOT"}  # found from SLURM_SUBMIT_DIR
    r = subprocess.run(["bash", str(spool / "slurm_script"), "stage1.weight_decay=5e-4"], env=env,
                       cwd=cluster["tmp"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    run = cluster["root"] / "runs" / "inat2018"
    assert run.is_dir() and not _requeues(cluster)
    assert "scontrol show hostnames gpu-a07,gpu-b12" in _events(cluster)
    srun = _argv(cluster["log"] / "srun.argv")
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=40"} <= set(srun)
    for node in (0, 1):
        a = _argv(cluster["log"] / f"accelerate.{node}.argv")
        assert a[0] == "launch" and _opt(a, "--machine_rank") == str(node)  # evaluated on each node
        assert _opt(a, "--num_processes") == "8" and _opt(a, "--num_machines") == "2"
        assert _opt(a, "--rdzv_backend") == "c10d" and _opt(a, "--main_process_ip") == "gpu-a07"
        assert _opt(a, "--main_process_port") == "29500" and "--multi_gpu" in a
        i = a.index("bigltr/train.py")
        assert a[i:] == ["bigltr/train.py", "recipe=inat2018", f"out={run}", "stage=1", "resume=auto",
                         "dist.world_size=8", "stage1.weight_decay=5e-4"]
        env_seen = (cluster["log"] / f"accelerate.{node}.env").read_text()
        assert "ACCELERATE_USE_CPU= " in env_seen and f"PWD={cluster['root']}" in env_seen  # the checkout
    assert "stage=1 out=" in r.stdout and "2 node(s) x 4 process(es)" in r.stdout


@pytest.mark.parametrize("sig, rc", [("USR1", 75), ("USR1", 1), ("TERM", 75)])
def test_signal_checkpoints_and_requeues(cluster, sig, rc):
    """(b) USR1 -> RUN/PREEMPT (kept present even if the trainer deletes it at start-up), not forwarded; the
    shell waits for both nodes to exit 75 (or accelerate's 1), then requeues. TERM (scancel / preemption): same,
    but no requeue."""
    run = cluster["tmp"] / "run"
    p = _start(cluster, "inat_stage1.sh", BIGLTR_RUN=str(run), FAKE_MODE="preempt", FAKE_RC=str(rc),
               FAKE_DELETE_ONCE="1", BIGLTR_PREEMPT_RETOUCH_S="0.2")
    _wait_until(p, lambda: {"accelerate 0 started", "accelerate 1 started"} <= set(_events(cluster)))
    time.sleep(0.2)  # the shell is in `wait`
    assert p.poll() is None
    p.send_signal(getattr(signal, f"SIG{sig}"))
    stdout, stderr = _communicate(p)
    ev = _events(cluster)
    assert "accelerate 0 deleted PREEMPT" in ev  # ... and it came back: both nodes saw it
    exits = [ev.index(f"accelerate {n} exit {rc}") for n in (0, 1)]
    assert not [e for e in ev if "got USR1" in e]  # not forwarded
    assert f"SIG{sig}: asking the trainer to checkpoint" in stdout
    if sig == "USR1":
        assert p.returncode == 0, stdout + stderr
        assert _requeues(cluster) == ["scontrol requeue 4242"]
        assert ev.index("scontrol requeue 4242") > max(exits)  # requeued only after srun returned
    else:
        assert p.returncode == rc and not _requeues(cluster) and "not requeueing" in stdout


def test_signal_during_startup_is_not_lost(cluster):
    """USR1 while the shell is still preparing the launch (before srun): not fatal, acted on once srun runs."""
    run = cluster["tmp"] / "run"
    p = _start(cluster, "imagenet_lt_stage1.sh", BIGLTR_RUN=str(run), FAKE_MODE="preempt", SLURM_NNODES="1",
               FAKE_SCONTROL_SLEEP="1", FAKE_DELETE_ONCE="1", BIGLTR_PREEMPT_RETOUCH_S="0.2")
    _wait_until(p, lambda: any(e.startswith("scontrol show") for e in _events(cluster)))
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = _communicate(p)
    assert p.returncode == 0, stdout + stderr
    ev = _events(cluster)
    assert "accelerate 0 started" in ev and "accelerate 0 deleted PREEMPT" in ev
    assert _requeues(cluster) == ["scontrol requeue 4242"]


@pytest.mark.parametrize("rc, extra_env, expect_rc, requeue", [
    (0, {}, 0, False),                                     # finished: no requeue
    (3, {}, 3, False),                                     # a crash: its code, no requeue
    (1, {"STALE": "1"}, 1, False),                         # a PREEMPT left from the previous run does not count
    (75, {}, 0, True),                                     # stopped on request (srun run without accelerate)
    (1, {"FAKE_TOUCH": "1"}, 0, True),                     # a user touched RUN/PREEMPT; accelerate reports 1
    (75, {"SLURM_RESTART_COUNT": "3", "BIGLTR_MAX_REQUEUES": "3"}, 75, False),
    (75, {"FAKE_REQUEUE_FAILS": "1"}, 75, True),           # requeue refused: 75 stays visible
])
def test_exit_codes(cluster, rc, extra_env, expect_rc, requeue):
    """(c) what the batch shell does with srun's exit code."""
    run, extra_env = cluster["tmp"] / "run", dict(extra_env)
    if extra_env.pop("STALE", None):
        run.mkdir()
        (run / "PREEMPT").touch()
    r = _run(cluster, "imagenet_lt_stage1.sh", FAKE_RC=str(rc), BIGLTR_RUN=str(run), SLURM_NNODES="1", **extra_env)
    assert r.returncode == expect_rc, r.stdout + r.stderr
    assert _requeues(cluster) == (["scontrol requeue 4242"] if requeue else [])


def test_stage2_jobs_use_stage1_run_directory(cluster):
    """(d) stage-2 scripts: stage=2, the same out= as stage 1, their own resources."""
    env = {"SLURM_NNODES": "1"}
    for bench, recipe, gpus in (("inat", "inat2018", "4"), ("imagenet_lt", "imagenet_lt", "1")):
        outs = []
        for stage in ("1", "2"):
            r = _run(cluster, f"{bench}_stage{stage}.sh", SLURM_GPUS_ON_NODE=gpus, **env)
            assert r.returncode == 0, r.stdout + r.stderr
            a = _argv(cluster["log"] / "accelerate.0.argv")
            tail = a[a.index("bigltr/train.py"):]
            assert tail[1] == f"recipe={recipe}" and tail[3] == f"stage={stage}" and tail[4] == "resume=auto"
            outs.append(tail[2])
            assert _opt(a, "--num_processes") == gpus and tail[5] == f"dist.world_size={gpus}"
            assert ("--multi_gpu" in a) == (gpus != "1")
        assert outs[0] == outs[1] == f"out={cluster['root']}/runs/{recipe}"
    # a run directory chosen by the user reaches both stages
    r = _run(cluster, "inat_stage2.sh", BIGLTR_RUN="runs/wd5e-4", **env)
    assert f"out={cluster['root']}/runs/wd5e-4" in _argv(cluster["log"] / "accelerate.0.argv")


def test_generic_script_arguments_cpu_mode_and_errors(cluster):
    run = cluster["tmp"] / "gen"
    r = _run(cluster, "train.sh", "recipe=tiny_test", f"out={run}", "stage=2", "stage1.epochs=1",
             BIGLTR_OVERRIDES="seed=3 stage=1", BIGLTR_CPU="1", GPUS_PER_NODE="2", SLURM_NNODES="1",
             MAIN_PROCESS_PORT="31000", BIGLTR_ACCELERATE_ARGS="--debug")
    assert r.returncode == 0, r.stdout + r.stderr
    a = _argv(cluster["log"] / "accelerate.0.argv")
    assert a[a.index("bigltr/train.py"):] == ["bigltr/train.py", "recipe=tiny_test", f"out={run}", "stage=2",
                                              "resume=auto", "dist.world_size=2", "seed=3", "stage1.epochs=1"]
    assert _opt(a, "--num_processes") == "2" and "--multi_gpu" in a and "--debug" in a
    assert _opt(a, "--main_process_port") == "31000" and "--cpu" not in a
    assert "ACCELERATE_USE_CPU=1" in (cluster["log"] / "accelerate.0.env").read_text()
    # the GPU count comes from --gpus-per-node when SLURM_GPUS_ON_NODE is absent
    env = {k: v for k, v in cluster["env"].items() if k != "SLURM_GPUS_ON_NODE"}
    r = subprocess.run(["bash", str(SLURM / "train.sh"), "recipe=x"], env={**env, "SLURM_GPUS_PER_NODE": "h100:2"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and _opt(_argv(cluster["log"] / "accelerate.0.argv"), "--num_processes") == "4"

    for args, env_extra, message in [
        ([], {}, "no recipe"),
        (["recipe=x", "stage=3"], {}, "stage must be 1, 2 or all"),
        (["recipe=x", "oops"], {}, "is not key=value"),
        (["recipe=x"], {"SLURM_JOB_ID": ""}, "submit this script with sbatch"),
        (["recipe=x"], {"GPUS_PER_NODE": "0"}, "positive integer"),
    ]:
        r = _run(cluster, "train.sh", *args, **env_extra)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = subprocess.run(["bash", str(SLURM / "train.sh"), "recipe=x"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--gres=gpu:N" in r.stderr
    # a copy of the script that cannot find the checkout says so
    shutil.copy(SLURM / "train.sh", cluster["tmp"] / "copy.sh")
    env = {k: v for k, v in cluster["env"].items() if k not in ("BIGLTR_ROOT", "SLURM_SUBMIT_DIR")}
    r = subprocess.run(["bash", str(cluster["tmp"] / "copy.sh")], env=env, cwd=cluster["tmp"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "slurm/lib.sh not found" in r.stderr


def test_submit_chains_stage2_after_stage1(cluster):
    r = subprocess.run(["bash", str(SLURM / "submit.sh"), "inat", "--partition=gpu", "--", "stage1.epochs=5"],
                       env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s1, s2 = _argv(cluster["log"] / "sbatch.1"), _argv(cluster["log"] / "sbatch.2")
    assert s1 == ["--parsable", "--partition=gpu", str(SLURM / "inat_stage1.sh"), "stage1.epochs=5"]
    assert s2 == ["--parsable", "--partition=gpu", "--dependency=afterok:1001", str(SLURM / "inat_stage2.sh"),
                  "stage1.epochs=5"]
    assert "stage 1 job 1001, stage 2 job 1002" in r.stdout
    r = subprocess.run(["bash", str(SLURM / "submit.sh"), "cifar"], env=cluster["env"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


def test_real_two_process_cpu_job(cluster, tiny_shards):
    """(e) slurm/train.sh -> stand-in srun -> the venv's accelerate -> 2 gloo processes, both stages."""
    import make_shards

    # tiny_shards' val split is one shard; every rank needs one: the same images in smaller shards
    shards = cluster["tmp"] / "shards"
    make_shards.main(["idx", "--src", str(tiny_shards.parent / "idx"), "--out", str(shards), "--imbalance", "10",
                      "--n-max", "40", "--val-per-class", "6", "--maxcount", "26", "--seed", "0", "--no-progress"])
    run = cluster["tmp"] / "real"
    env = {**cluster["env"], "BIGLTR_ROOT": str(ROOT), "BIGLTR_CPU": "1", "GPUS_PER_NODE": "2", "SLURM_NNODES": "1",
           "FAKE_HOSTS": "localhost", "ACCELERATE": str(BIN / "accelerate"), "MAIN_PROCESS_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(SLURM / "train.sh"), "recipe=tiny_test", f"out={run}", "stage=all",
                        f"data.root={shards}", "stage1.epochs=1", "stage2.epochs=1", "dist.timeout_s=120"],
                       env=env, cwd=cluster["tmp"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"STDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-5000:]}"
    res = json.loads((run / "results.json").read_text())
    assert res["world_size"] == 2 and "stage1" in res and "stage2" in res
    assert (run / "stage1" / "best.pt").is_file() and not (run / "PREEMPT").exists()
    assert not _requeues(cluster)
