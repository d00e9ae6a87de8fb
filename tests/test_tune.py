"""bigltr-tune (bigltr/tune/): Optuna studies of real trainer runs on tiny shards (two workers sharing the journal,
resume, phase 2 from the best phase-1 checkpoint, a failing trial); pruning, stopped workers and stale trials with a
stand-in trainer through --launch (fast and deterministic); fail-fast errors; slurm/tune.sh; ablation --tuned."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import stand_in_bin

from bigltr import tune

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for `python -m bigltr.train` (started as `--launch "python fake_train.py"`, so argv[1] is bigltr.train):
# writes summary.csv rows (one per FAKE_EPOCH_S) and results.json as the trainer does. Trial folder n gets
# val_all = FAKE_VALS[n] + epoch and FAKE_EPOCHS[n] epochs (comma lists, cycled); FAKE_IGNORE_TERM=1 ignores SIGTERM
# (so only SIGKILL stops it); FAKE_CALLS=FILE appends the arguments of each invocation to FILE (one line each);
# FAKE_NO_PDEATHSIG=1 clears the signal the tuner asks for when its worker dies (a launcher's grandchild: it outlives
# a killed worker). Like resume=auto, a run in a folder continues after the epochs summary.csv already has; a file
# `finish` in the folder ends it after the current epoch.
FAKE_TRAIN = r'''
import json, os, signal, sys, time
from pathlib import Path

args = dict(a.split("=", 1) for a in sys.argv[2:])
if os.environ.get("FAKE_CALLS"):
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(args) + "\n")
out, stage = Path(args["out"]), args["stage"]
if os.environ.get("FAKE_NO_PDEATHSIG"):
    import ctypes
    ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG, none
if os.environ.get("FAKE_IGNORE_TERM"):
    signal.signal(signal.SIGTERM, lambda *_: print("got SIGTERM, ignoring it", file=sys.stderr, flush=True))
vals = [float(v) for v in os.environ.get("FAKE_VALS", "50").split(",")]
val = vals[int(out.name) % len(vals)]
summary = out / f"stage{stage}" / "summary.csv"
summary.parent.mkdir(parents=True, exist_ok=True)
(out / "pid").write_text(str(os.getpid()))
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
if not summary.exists():
    summary.write_text("epoch,lr,val_all,val_many,val_medium,val_few\n")
epochs = [int(v) for v in os.environ.get("FAKE_EPOCHS", "2").split(",")]
e = len(summary.read_text().splitlines()) - 1  # resume=auto: the epochs a run in this folder did are not run again
for e in range(e + 1, epochs[int(out.name) % len(epochs)] + 1):
    time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0.1")))
    with open(summary, "a") as f:
        f.write(f"{e},0.01,{val + e},{val},{val},{val}\n")
    if (out / "finish").exists():  # a test's cue: end after this epoch
        break
m = {"all": val + e, "many": val, "medium": val, "few": None}
(out / "results.json").write_text(json.dumps({f"stage{stage}": {"val": m, "test": {**m, "all": 1.0}}}))
'''


@pytest.fixture
def fake(tmp_path, tiny_shards, monkeypatch):
    """Common arguments of a study whose trials are the stand-in trainer."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    for k in ("FAKE_VALS", "FAKE_EPOCHS", "FAKE_EPOCH_S", "FAKE_IGNORE_TERM", "FAKE_CALLS", "FAKE_NO_PDEATHSIG"):
        monkeypatch.delenv(k, raising=False)
    return ["recipe=tiny_test", f"data.root={tiny_shards}", "--launch", f"{sys.executable} {script}",
            "--poll", "0.1"]


def _storage(out: Path):
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))


def _trials(out: Path, name: str = "phase1"):
    return optuna.load_study(study_name=name, storage=_storage(out)).get_trials()


def _summary(out: Path) -> list[dict]:
    with open(out / "tune_summary.csv") as f:
        return list(csv.DictReader(f))


def _calls(path: Path) -> list[dict]:
    """The key=value arguments of each stand-in invocation (FAKE_CALLS)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------------------- real trainer runs
def test_two_workers_resume_and_phase2(tiny_shards, tmp_path, capfd, monkeypatch):
    out = tmp_path / "t"
    common = ["recipe=tiny_test", f"out={out}", f"data.root={tiny_shards}", "stage1.epochs=2", "stage2.epochs=1",
              "--poll", "0.5"]
    # 2 local worker processes share the journal: 2 trials, then the same command with --trials 3 adds one
    assert tune.main(common + ["--trials", "2", "--workers", "2"]) == 0
    first = _trials(out)
    assert [t.state.name for t in first] == ["COMPLETE"] * 2
    assert {t.user_attrs["worker_pid"] for t in first} != {os.getpid()}  # run by the worker processes
    mtimes = {t.number: (Path(t.user_attrs["dir"]) / "results.json").stat().st_mtime_ns for t in first}
    assert tune.main(common + ["--trials", "3", "--workers", "2"]) == 0
    trials = [t for t in _trials(out) if not t.user_attrs.get("surplus")]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # one more, not three
    assert {t.number: (Path(t.user_attrs["dir"]) / "results.json").stat().st_mtime_ns for t in first} == mtimes
    wds = [t.params["stage1.weight_decay"] for t in trials]
    assert len(set(wds)) == 3
    for t in trials:  # objective = results.json stage1.val.all; every epoch's val_all was reported while it ran
        d = Path(t.user_attrs["dir"])
        assert d == out / "trials" / "phase1" / str(t.number)
        assert t.value == json.loads((d / "results.json").read_text())["stage1"]["val"]["all"]
        with open(d / "stage1" / "summary.csv") as f:
            assert t.intermediate_values == {int(r["epoch"]): float(r["val_all"]) for r in csv.DictReader(f)}
        assert f"weight_decay: {t.user_attrs['overrides']['stage1.weight_decay']}" in (d / "config.yaml").read_text()
    best = max(trials, key=lambda t: t.value)  # ties: the lowest number (max keeps the first)
    res = json.loads((out / "tune_result.json").read_text())
    assert res["phase1"]["trial"] == best.number and res["phase2"] is None
    rows = _summary(out)
    assert [r["trial"] for r in rows] == ["0", "1", "2"] and [r["selected"] for r in rows].count("yes") == 1
    assert rows[best.number]["selected"] == "yes" and rows[0]["epochs"] == "2"
    assert "test all (info only)" in (out / "tune_summary.md").read_text()
    assert (out / "plots" / "phase1_history.png").stat().st_size > 0
    wd = tune.fmt(best.user_attrs["overrides"]["stage1.weight_decay"])
    # the refit: the tuned values on the whole training set, the last epoch kept; trials ran without plots
    cmd = f"python -m bigltr.train recipe=tiny_test out=runs/tiny_test_refit protocol=refit data.root={tiny_shards} " \
          f"stage1.epochs=2 stage2.epochs=1 stage1.weight_decay={wd}"
    assert res["command"] == cmd and f"last epoch):\n  {cmd}" in capfd.readouterr().out
    assert not list((out / "trials").rglob("*.png"))
    assert "plots: false" in (Path(best.user_attrs["dir"]) / "config.yaml").read_text()

    # phase 2 starts from the best phase-1 trial's checkpoint
    assert tune.main(common + ["--phase", "2", "--trials", "1"]) == 0
    name = f"phase2_from_p1t{best.number}"
    (t2,) = _trials(out, name)
    cfg = yaml.safe_load((out / "trials" / name / "0" / "config.yaml").read_text())
    assert cfg["stage"] == "2" and cfg["stage1_checkpoint"] == str(out / "trials" / "phase1" / str(best.number) /
                                                                    "stage1" / "best.pt")
    radius = t2.user_attrs["overrides"]["stage2.maxnorm.radius"]  # the sampled value, to 4 significant digits
    assert t2.state.name == "COMPLETE" and cfg["stage2"]["maxnorm"]["radius"] == radius
    assert radius == pytest.approx(t2.params["stage2.maxnorm.radius"], rel=1e-3)
    res = json.loads((out / "tune_result.json").read_text())
    assert res["phase2"]["study"] == name and "stage2.maxnorm.radius=" in res["command"]
    assert f"stage1.weight_decay={wd}" in res["command"]

    # the tuned ablation from these studies: rows 2 and 7 are the studies' best runs (not trained again); row 1 (no
    # WD-0 trial in the study) and rows 5-6 are trained; a study whose best run is not the row's is not reused
    import bigltr.train
    from bigltr import ablation

    trained, real_train = [], bigltr.train.main
    monkeypatch.setattr(bigltr.train, "main", lambda argv: trained.append(Path(argv[-1][4:]).name) or real_train(argv))
    capfd.readouterr()
    rows = ablation.main(["recipe=tiny_test", f"out={tmp_path / 'abl'}", f"data.root={tiny_shards}", "stage1.epochs=2",
                          "stage2.epochs=1", "--online", "--tuned", str(out), "--tuned-row5", str(out)])
    log = capfd.readouterr().out
    assert trained == ["s1_naive", "s2_cb_wd", "s2_cb_maxnorm"]
    p1_dir, p2_dir = out / "trials" / "phase1" / str(best.number), out / "trials" / name / "0"
    assert rows[1][1] == json.loads((p1_dir / "results.json").read_text())["stage1"] and f"reusing {p1_dir}" in log
    assert rows[6][1] == json.loads((p2_dir / "results.json").read_text())["stage2"] and f"reusing {p2_dir}" in log
    assert f"not reusing {p2_dir}: it ran with stage2.maxnorm.when='step', this row needs 'off'" in log
    # what the tuning cost, per row, from the studies' summaries (3 phase-1 trials; rows 5 and 7: the 1 phase-2 trial)
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert " tuning (on val) |" in table and table.count("| 3 trials, ") == 1 and table.count("| 1 trial, ") == 2
    # the cost columns (CPU-hours): row 2's tune is the phase-1 study's trials (their wall_s, from tune_trials.json),
    # which hold row 2's run (its total counts it once); rows 5 and 7 the phase-2 study's, plus row 2's stage 1
    with open(tmp_path / "abl" / "ablation.csv") as f:
        cost = [{k: float(r[k]) for k in ("train_h", "stage1_h", "tune_h", "total_h")} for r in csv.DictReader(f)]
    trials = json.loads((out / "tune_trials.json").read_text())["trials"]
    p1_h = sum(t["wall_s"] for t in trials if t["study"] == "phase1") / 3600
    p2_h = sum(t["wall_s"] for t in trials if t["study"] == name) / 3600
    res1 = json.loads((p1_dir / "results.json").read_text())
    s1_h = sum(res1["stage1"]["wall_time_s"][k] for k in ("train_incl_val", "final_eval")) * res1["world_size"] / 3600
    assert cost[1] == pytest.approx({"train_h": s1_h, "stage1_h": 0, "tune_h": p1_h, "total_h": p1_h}, abs=2e-6)
    assert p1_h > s1_h > 0 and cost[0]["tune_h"] == 0 and cost[0]["total_h"] == cost[0]["train_h"] > 0
    for i in (4, 6):
        assert cost[i]["stage1_h"] == pytest.approx(s1_h, abs=2e-6)
        assert cost[i]["tune_h"] == pytest.approx(p2_h, abs=2e-6)
    assert cost[6]["total_h"] == pytest.approx(s1_h + p2_h, abs=2e-6)  # row 7's run is the study's trial
    assert cost[4]["total_h"] == pytest.approx(s1_h + p2_h + cost[4]["train_h"], abs=2e-6)  # row 5 trained here
    assert "| train CPU-h | stage 1 CPU-h | tune CPU-h | total CPU-h |" in table
    # the trained stage-2 rows start from the reused row 2's checkpoint
    cb_wd = yaml.safe_load((tmp_path / "abl" / "s2_cb_wd" / "config.yaml").read_text())
    assert cb_wd["stage1_checkpoint"] == str(p1_dir / "stage1" / "best.pt")
    # a study of another schedule or data is never taken for this one
    from bigltr.ablation_reuse import reuse_problem

    argv = ["recipe=tiny_test", f"data.root={tiny_shards}", f"stage1.weight_decay={wd}"]
    assert reuse_problem(p1_dir, argv + ["stage1.epochs=2"], "1") is None
    assert reuse_problem(p1_dir, argv + ["stage1.epochs=3"], "1") == \
        "it ran with stage1.epochs=2, this row needs 3"
    assert reuse_problem(p1_dir, argv + ["stage1.epochs=2", f"data.root={tmp_path}"], "1").startswith(
        "it ran with data.root=")


def test_baseline_knobs_are_tuned_on_val(tiny_shards, tmp_path):
    """The baselines' knobs are searched like the weight decay (docs/tuning.md): a study over the LA loss's tau and
    the feature regulariser of one-stage WB runs real trials, each trains with its values (config.yaml) and its
    objective is its val accuracy."""
    out = tmp_path / "la"
    assert tune.main(["recipe=tiny_test", f"out={out}", f"data.root={tiny_shards}", "stage1.epochs=1",
                      "stage1.loss=la_ce", "--trials", "2", "--poll", "0.5", "--space", "stage1.la_tau=float:0.5:2",
                      "--space", "stage1.feature_reg=log:1e-4:1e-1"]) == 0
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    for t in trials:
        d, values = Path(t.user_attrs["dir"]), t.user_attrs["overrides"]
        s1 = yaml.safe_load((d / "config.yaml").read_text())["stage1"]
        assert s1["loss"] == "la_ce" and s1["la_tau"] == values["stage1.la_tau"]
        assert s1["feature_reg"] == values["stage1.feature_reg"]
        assert 0.5 <= values["stage1.la_tau"] <= 2 and 1e-4 <= values["stage1.feature_reg"] <= 1e-1
        assert t.value == json.loads((d / "results.json").read_text())["stage1"]["val"]["all"]
    assert len({t.user_attrs["overrides"]["stage1.la_tau"] for t in trials}) == 2
    cmd = json.loads((out / "tune_result.json").read_text())["command"]
    assert "stage1.loss=la_ce" in cmd and "stage1.la_tau=" in cmd and "stage1.feature_reg=" in cmd


def test_stage2_la_tau_is_a_phase2_knob(fake, tmp_path, monkeypatch):
    """stage2.la_tau belongs to phase 2: each stage-2 trial gets its value (the stand-in trainer records its
    arguments)."""
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "la2"
    assert tune.main(fake + [f"out={out}", "--phase", "2", f"stage1_checkpoint={ckpt}", "stage2.loss=la_ce",
                             "--trials", "2", "--space", "stage2.la_tau=float:0:2"]) == 0
    got = _calls(calls)
    assert len(got) == 2 and all(c["stage"] == "2" and c["stage2.loss"] == "la_ce" for c in got)
    study = json.loads((out / "tune_result.json").read_text())["phase2"]["study"]
    assert sorted(float(c["stage2.la_tau"]) for c in got) == sorted(
        t.user_attrs["overrides"]["stage2.la_tau"] for t in _trials(out, study))


def test_failing_trial_is_recorded_and_the_study_goes_on(tiny_shards, tmp_path, capfd):
    # model.name is a free string for the config: the unknown model fails only when the trial builds it (exit 2)
    out = tmp_path / "f"
    rc = tune.main(["recipe=tiny_test", f"out={out}", f"data.root={tiny_shards}", "stage1.epochs=1", "--poll", "0.5",
                    "--sampler", "grid", "--space", "model.name=grid:nonexistent_model_xyz,resnet32_cifar"])
    assert rc == 0
    by_model = {t.params["model.name"]: t for t in _trials(out)}
    bad, good = by_model["nonexistent_model_xyz"], by_model["resnet32_cifar"]
    assert bad.state.name == "FAIL" and bad.user_attrs["exit_code"] == 2
    assert "nonexistent_model_xyz" in bad.user_attrs["stderr_tail"] and good.state.name == "COMPLETE"
    assert json.loads((out / "tune_result.json").read_text())["phase1"]["trial"] == good.number
    row = {r["trial"]: r for r in _summary(out)}[str(bad.number)]
    assert row["state"] == "FAIL" and row["note"] == "exit 2 (bad input)"
    md = (out / "tune_summary.md").read_text()
    assert "## Failed trials" in md and "nonexistent_model_xyz" in md
    assert "FAIL (exit 2 (bad input))" in capfd.readouterr().out


# ----------------------------------------------------------------------------------------------- stand-in trainer
def test_pruned_trial_is_stopped(fake, tmp_path, monkeypatch):
    # trial 0 completes at val 80+; trial 1 reports 21 at epoch 1, below the median of trial 0 at that epoch
    monkeypatch.setenv("FAKE_VALS", "80,20")
    monkeypatch.setenv("FAKE_EPOCHS", "30")
    monkeypatch.setenv("FAKE_EPOCH_S", "0.1")
    monkeypatch.setenv("FAKE_IGNORE_TERM", "1")  # so the SIGKILL after the grace period is what stops it
    out = tmp_path / "p"
    assert tune.main(fake + [f"out={out}", "--trials", "2", "--pruner", "median", "--prune-startup", "1",
                             "--grace", "1"]) == 0
    t0, t1 = _trials(out)
    assert t0.state.name == "COMPLETE" and len(t0.intermediate_values) == 30
    assert t1.state.name == "PRUNED" and t1.user_attrs["epochs"] < 30 and not (Path(t1.user_attrs["dir"]) /
                                                                                "results.json").exists()
    pid = int((Path(t1.user_attrs["dir"]) / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "got SIGTERM, ignoring it" in (Path(t1.user_attrs["dir"]) / "stderr.log").read_text()
    row = _summary(out)[1]
    assert row["state"] == "PRUNED" and row["note"].startswith("pruned after epoch") and row["val_all"]
    assert (out / "plots" / "phase1_intermediate.png").is_file()


def test_stale_running_trials_are_failed_and_retried(fake, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    study = optuna.create_study(storage=_storage(out), study_name="phase1", direction="maximize")
    for host, pid, beat in ((socket.gethostname(), _dead_pid(), time.time()),  # its worker process is gone
                            ("other-node", 12345, time.time() - 10_000)):   # no heartbeat for too long
        t = study.ask()
        t.suggest_float("stage1.weight_decay", 1e-5, 1e-1, log=True)
        for k, v in (("worker_host", host), ("worker_pid", pid), ("heartbeat", beat)):
            t.set_user_attr(k, v)
    assert tune.main(fake + [f"out={out}", "--trials", "2"]) == 0
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]  # budget 2: the retries only
    assert "is gone" in trials[0].user_attrs["stale"] and "no heartbeat" in trials[1].user_attrs["stale"]
    for old, new in ((trials[0], trials[2]), (trials[1], trials[3])):
        assert new.params == old.params and new.user_attrs["retry_of"] == old.number
        argv = json.loads((out / "trials" / "phase1" / str(old.number) / "argv.json").read_text())
        assert "resume=auto" in argv  # the retry runs in the old trial's folder and resumes from its checkpoint
    notes = [r["note"] for r in _summary(out)]
    assert notes[0].endswith("queued again") and notes[2] == "retry of trial 0"


def test_stopped_worker_queues_its_trial_again(fake, tmp_path):
    out = tmp_path / "w"
    env = {**os.environ, "FAKE_EPOCHS": "100", "FAKE_EPOCH_S": "0.1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "bigltr.tune", *fake, f"out={out}", "--trials", "1", "--grace", "5"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    summary = out / "trials" / "phase1" / "0" / "stage1" / "summary.csv"
    deadline = time.time() + 60
    while not (summary.is_file() and len(summary.read_text().splitlines()) > 2) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # what slurm/tune.sh does on USR1 (time limit near) or TERM
    printed = p.communicate(timeout=60)[0]
    assert p.returncode == tune.EX_STOPPED, printed
    assert [t.state.name for t in _trials(out)] == ["FAIL", "WAITING"]
    assert tune.main(fake + [f"out={out}", "--trials", "1"]) == 0  # the requeued worker: the queued trial only
    t0, t1 = _trials(out)
    assert t1.state.name == "COMPLETE" and t1.params == t0.params and t1.user_attrs["dir"] == t0.user_attrs["dir"]


def test_grid_with_two_workers_runs_each_point_once(fake, tmp_path, monkeypatch):
    # Optuna's GridSampler lets concurrent workers draw the same point: the points are queued instead, and a worker
    # pops each WAITING trial atomically. --trials 2 queues a (seeded) half; the restart queues only the rest.
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_EPOCH_S", "0.3")
    out, grid = tmp_path / "g", {0, 1e-4, 1e-3, 1e-2}
    common = fake + [f"out={out}", "--sampler", "grid", "--space", "stage1.weight_decay=grid:0,1e-4,1e-3,1e-2",
                     "--workers", "2"]
    assert tune.main(common + ["--trials", "2"]) == 0
    first = {float(c["stage1.weight_decay"]) for c in _calls(calls)}
    assert len(_calls(calls)) == 2 and len(first) == 2 and first < grid
    assert tune.main(common) == 0  # the budget is the grid size
    ran = [float(c["stage1.weight_decay"]) for c in _calls(calls)]
    assert len(ran) == 4 and set(ran) == grid  # each point exactly once
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4 and not any(t.user_attrs.get("surplus") for t in trials)
    for t in trials:  # every trial was a queued point, run with the value it was queued with
        assert t.system_attrs["fixed_params"] == t.params and t.user_attrs["worker_pid"] != os.getpid()
        assert t.user_attrs["overrides"] == t.params
    assert {float(r["params"].split("=")[1]) for r in _summary(out)} == grid


def test_values_already_run_are_not_run_again(fake, tmp_path, monkeypatch):
    # the trainer is deterministic: values equal (after the 4-digit rounding) to those of a COMPLETE trial are
    # recorded with that trial's result, without a process; log0's 0.0 included (TPE proposes "is 0" again)
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.setenv("FAKE_VALS", "50,60,70,80")
    out = tmp_path / "d"
    out.mkdir()
    study = optuna.create_study(storage=_storage(out), study_name="phase1", direction="maximize")
    for p in ({"stage1.weight_decay is 0": True}, {"stage1.weight_decay is 0": True},
              {"stage1.weight_decay is 0": False, "stage1.weight_decay": 0.0012341},
              {"stage1.weight_decay is 0": False, "stage1.weight_decay": 0.0012343}):
        study.enqueue_trial(p)  # the proposals (any sampler's): trial 1 repeats trial 0, trial 3 repeats trial 2
    assert tune.main(fake + [f"out={out}", "--trials", "4", "--space", "stage1.weight_decay=log0:1e-5:1e-1"]) == 0
    assert [c["stage1.weight_decay"] for c in _calls(calls)] == ["0.0", "0.001234"]  # two processes, not four
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert [t.value for t in trials] == [52.0, 52.0, 72.0, 72.0]  # the earlier trial's result (FAKE_VALS: 62, 82)
    assert trials[1].user_attrs["overrides"] == {"stage1.weight_decay": 0.0}
    rows = _summary(out)
    assert [r["note"] for r in rows] == ["", "same values as trial 0: not run again", "",
                                         "same values as trial 2: not run again"]
    assert [r["val_all"] for r in rows] == ["52.0000", "52.0000", "72.0000", "72.0000"]  # 4 decimals
    assert [r["selected"] for r in rows] == ["", "", "yes", ""] and rows[3]["dir"] == rows[2]["dir"]

    # a sampler's own repeats: two categorical values, five trials, two processes
    calls.unlink()
    out = tmp_path / "c"
    assert tune.main(fake + [f"out={out}", "--trials", "5", "--sampler", "random",
                             "--space", "stage1.weight_decay=cat:0,0.001"]) == 0
    ran = [c["stage1.weight_decay"] for c in _calls(calls)]
    assert len(ran) == len(set(ran)) == 2
    trials = _trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    assert sum("not run again" in r["note"] for r in _summary(out)) == 3


def test_restarted_random_study_proposes_new_points(fake, tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "r"
    common = fake + [f"out={out}", "--sampler", "random"]
    assert tune.main(common + ["--trials", "3"]) == 0
    first = [t.user_attrs["overrides"] for t in _trials(out)]
    # the premise: a sampler seeded as in the first run proposes the first run's points again
    space = tune.parse_param("stage1.weight_decay=log:1e-5:1e-1")
    again = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    assert [{space.key: space.suggest(again.ask())} for _ in range(3)] == first
    assert tune.main(common + ["--trials", "6"]) == 0  # the restart: three more, new points
    trials = _trials(out)
    wds = [t.user_attrs["overrides"]["stage1.weight_decay"] for t in trials]
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6 and len(set(wds)) == 6
    assert len(_calls(calls)) == 6 and not any(r["note"] for r in _summary(out))


# ------------------------------------------------------------------------------------------ errors, Slurm, ablation
@pytest.mark.parametrize("extra, message", [
    (["stage1.weight_decy=0"], "did you mean 'stage1.weight_decay'"),
    (["--space", "stage1.weight_decy=log:1e-5:1e-1"], "did you mean 'stage1.weight_decay'"),
    (["--space", "stage2.maxnorm.radius=float:-1:0.5", "--phase", "2", "stage1_checkpoint=x.pt"], "must be >= 0"),
    (["--space", "stage1.weight_decay=log:0:1e-1"], "LO > 0"),
    (["--space", "stage1.weight_decay=logx:1:2"], "unknown kind"),
    (["--sampler", "grid"], "grid:A,B"),
    (["stage1.weight_decay=1e-3"], "is searched"),
    (["stage=2"], "cannot be overridden"),
    (["stage1_checkpoint=x.pt"], "goes with --phase 2"),
    (["--phase", "2", "stage1_checkpoint=missing.pt"], "does not exist"),
    (["data.root=/nonexistent"], "_info.json"),
    (["--space", "stage1.weight_decay=float:0:1e-2:0"], "0 < STEP <= HI - LO"),
    (["--space", "stage1.weight_decay=float:0:1e-2:-1e-3"], "0 < STEP <= HI - LO"),
    (["--space", "stage1.weight_decay=float:0:1e-2:nan"], "0 < STEP <= HI - LO"),
    (["--space", "stage1.warmup_epochs=int:0:1:0.5"], "an int STEP must be an integer"),
    (["--sampler", "grid", "--space", "stage1.weight_decay=grid:0,1e-3", "--trials", "0"], "--trials must be >= 1"),
    (["--trials", "-1"], "--trials must be >= 1"),
    (["--space", "eval.posthoc_tau=float:0:2"], "choose the post-hoc tau on val with one sweep"),
    (["--space", "stage1.la_tau=float:0:2"], "stage1.la_tau only acts with stage1.loss=la_ce"),
])
def test_bad_studies_fail_before_anything_runs(tiny_shards, tmp_path, capsys, extra, message):
    out = tmp_path / "typo"
    trials = [] if any(a.startswith("--sampler") for a in extra) else ["--trials", "2"]
    if "--trials" in extra:
        trials = []
    assert tune.main(["recipe=tiny_test", f"out={out}", f"data.root={tiny_shards}", *trials, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_space_syntax_and_summary_reader(tmp_path):
    assert tune.parse_param("stage2.weight_decay=log0:1e-4:1").examples() == [0.0, 1e-4, 1.0]
    assert tune.parse_param("stage1.wd_scope=cat:all,no_norm_bias").choices == ["all", "no_norm_bias"]
    assert tune.parse_param("stage1.wd_p=float:1:3:0.5").step == 0.5
    f = tmp_path / "summary.csv"
    f.write_text("epoch,val_all\n1,10\n2,2")  # the last line is still being written
    assert [r["epoch"] for r in tune.read_epochs(f)] == ["1"]


def test_slurm_worker_script(tmp_path):
    bin_dir = stand_in_bin(tmp_path / "bin", {
        "fakepy": '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\nexec sleep "${FAKE_SLEEP:-0}"\n',
        "scontrol": '#!/bin/sh\necho "$@" > "$RECORD.scontrol"\n'})
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BIGLTR_PYTHON": str(bin_dir / "fakepy"),
           "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "2", "RECORD": str(tmp_path / "argv")}
    script = [str(ROOT / "slurm" / "tune.sh"), "recipe=tiny_test", "out=tune/x", "--trials", "8"]
    r = subprocess.run(script, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "argv").read_text().split() == ["-m", "bigltr.tune", "recipe=tiny_test", "out=tune/x",
                                                        "--trials", "8", "--worker-only"]
    assert not (tmp_path / "argv.scontrol").exists()
    # USR1 (Slurm's warning before the time limit): the worker is stopped and the array task requeued
    p = subprocess.Popen(script, env={**env, "FAKE_SLEEP": "30"}, stdout=subprocess.PIPE, text=True)
    (tmp_path / "argv").unlink()
    deadline = time.time() + 10
    while not (tmp_path / "argv").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    stdout, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and "requeue" in stdout
    assert (tmp_path / "argv.scontrol").read_text().split() == ["requeue", "77_2"]


def test_ablation_takes_tuned_values(tmp_path, monkeypatch):
    import bigltr.train
    from bigltr import ablation

    def result(tdir, p1, p2):
        tdir.mkdir()
        (tdir / "tune_result.json").write_text(json.dumps({
            "phase1": p1 and {"params": p1}, "phase2": p2 and {"params": p2}}))
        return str(tdir)

    tuned = result(tmp_path / "t", {"stage1.weight_decay": 0.0012},
                   {"stage2.weight_decay": 0.05, "stage2.maxnorm.radius": 0.3})
    row5 = result(tmp_path / "t5", None, {"stage2.weight_decay": 0.2})
    calls = {}
    metrics = {"all": 1.0, "many": 1.0, "medium": 1.0, "few": 1.0}

    def fake_train(argv):
        out = Path(next(a for a in argv if a.startswith("out="))[4:])
        stage = next(a for a in argv if a.startswith("stage="))[6:]
        calls[out.name] = argv
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({f"stage{stage}": {"val": metrics, "test": metrics}}))
        return 0

    monkeypatch.setattr(bigltr.train, "main", fake_train)
    monkeypatch.setattr(ablation, "posthoc_rows", lambda argv, ckpt, method="tau_norm": {
        "l2": {"val": metrics, "test": metrics}, "tau": {"val": metrics, "test": metrics}, "best_tau": 1.0})
    rows = ablation.main(["recipe=tiny_test", f"out={tmp_path / 'abl'}", "--tuned", tuned, "--tuned-row5", row5])
    assert rows[1][0] == "CE + WD (0.0012, tuned)" and "radius 0.3" in rows[5][0]
    def last(run, key):  # the value the trainer gets: the last override of the key wins
        return [a.split("=", 1)[1] for a in calls[run] if a.startswith(key + "=")][-1]

    assert last("s1_wd", "stage1.weight_decay") == "0.0012" and last("s1_naive", "stage1.weight_decay") == "0"
    assert last("s2_cb_wd", "stage2.weight_decay") == "0.2" and last("s2_cb_wd", "stage2.maxnorm.when") == "off"
    assert last("s2_cb_maxnorm", "stage2.maxnorm.radius") == "0.3"
    assert last("s2_cb_maxnorm", "stage2.weight_decay") == "0"
    assert last("s2_full", "stage2.weight_decay") == "0.05" and last("s2_full", "stage2.maxnorm.radius") == "0.3"


def test_phase2_needs_a_finished_phase1(tiny_shards, tmp_path, capsys):
    assert tune.main(["recipe=tiny_test", f"out={tmp_path / 'p2'}", f"data.root={tiny_shards}", "--trials", "1",
                      "--phase", "2"]) == 2
    assert "no finished phase-1 trial" in capsys.readouterr().err


def test_phase2_trials_share_one_feature_cache(tiny_shards, tmp_path):
    """Phase-2 trials get stage2.cache.dir=<out>/feature_cache: the first trial computes the frozen backbone's
    features, the second (another weight decay / radius, same stage-1 checkpoint) reuses them."""
    from bigltr.train import main as train_main

    s1 = tmp_path / "s1"
    assert train_main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={s1}", "stage=1", "stage1.epochs=1"]) == 0
    out = tmp_path / "t"
    assert tune.main(["recipe=tiny_test", f"out={out}", f"data.root={tiny_shards}", "stage2.epochs=1",
                      "stage2.features=cached", "stage2.cache.location=disk",
                      f"stage1_checkpoint={s1 / 'stage1' / 'best.pt'}",
                      "--phase", "2", "--trials", "2", "--poll", "0.5"]) == 0
    (name,) = [p.name for p in (out / "trials").iterdir()]
    trials = sorted(_trials(out, name), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    cache = out / "feature_cache"
    assert len(list(cache.glob("train-*"))) == 1 and len(list(cache.glob("val-*"))) == 1  # one build per split
    logs = []
    for t in trials:
        d = Path(t.user_attrs["dir"])
        assert yaml.safe_load((d / "config.yaml").read_text())["stage2"]["cache"]["dir"] == str(cache)
        logs.append((d / "stderr.log").read_text() + (d / "stdout.log").read_text())
    assert "feature cache: reusing" not in logs[0] and f"feature cache: reusing {cache}" in logs[1]
    assert "eval feature cache: reusing" in logs[1]
    assert not (Path(trials[0].user_attrs["dir"]) / "stage2" / "feature_cache").exists()


def test_phase2_cache_dir_is_the_users_when_given(fake, tmp_path, monkeypatch):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    mine = tmp_path / "my_cache"
    for out, extra, expected in ((tmp_path / "a", [], str(tmp_path / "a" / "feature_cache")),
                                 (tmp_path / "b", [f"stage2.cache.dir={mine}"], str(mine))):
        assert tune.main(fake + [f"out={out}", "--phase", "2", f"stage1_checkpoint={ckpt}", "--trials", "1",
                                 *extra]) == 0
        assert _calls(calls)[-1]["stage2.cache.dir"] == expected
    # phase 1 trials never get it (the full run's command neither)
    assert tune.main(fake + [f"out={tmp_path / 'c'}", "--trials", "1"]) == 0
    assert "stage2.cache.dir" not in _calls(calls)[-1]
    assert "feature_cache" not in json.loads((tmp_path / "a" / "tune_result.json").read_text())["command"]
