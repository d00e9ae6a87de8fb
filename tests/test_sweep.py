"""tools/sweep.py: local sweep on tiny shards (selection on val, resume), failures, Slurm array, fail-fast errors."""
import csv
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import stand_in_bin

import sweep  # tools/ is on sys.path (conftest)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep_shards(tiny_shards):
    return tiny_shards  # the session's tiny long-tailed shards (tests/conftest.py)


@pytest.fixture
def one_thread(monkeypatch):
    # Trials are subprocesses: two OpenMP threads each on a busy 2-core machine is many times slower than one.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _val(trial_dir: Path, stage: str) -> float:
    return json.loads((trial_dir / "results.json").read_text())[f"stage{stage}"]["val"]["all"]


def test_local_sweep_selects_on_val_and_resumes(sweep_shards, tmp_path, capsys, one_thread):
    out = tmp_path / "sw"
    argv = ["recipe=tiny_test", f"out={out}", "--grid", "1e-2,1e-4", "--stage2-wd", "0.05",
            f"data.root={sweep_shards}", "stage1.epochs=1", "stage2.epochs=1"]
    assert sweep.main(argv) == 0
    trials = out / "trials"
    p1 = [trials / "s1_wd=1e-04", trials / "s1_wd=1e-02"]  # grid sorted ascending, names stable
    vals = [_val(d, "1") for d in p1]
    best1 = p1[vals.index(max(vals))]  # ties go to the first listed
    p2 = trials / f"{best1.name}__s2_wd=5e-02"
    assert sorted(d.name for d in trials.iterdir()) == sorted([p1[0].name, p1[1].name, p2.name])
    cfg2 = (p2 / "config.yaml").read_text()
    assert "stage: '2'" in cfg2 and str(best1 / "stage1" / "best.pt") in cfg2 and "weight_decay: 0.05" in cfg2
    assert "weight_decay: 0.0001" in (p1[0] / "config.yaml").read_text()

    res = json.loads((out / "sweep_result.json").read_text())
    assert res["phase1"]["trial"] == best1.name and res["phase1"]["val"]["all"] == max(vals)
    assert res["phase2"]["trial"] == p2.name and res["phase2"]["val"]["all"] == _val(p2, "2")
    wd = sweep.yaml_float(res["phase1"]["params"]["stage1.weight_decay"])
    assert f"stage1.weight_decay={wd}" in res["command"] and "stage2.weight_decay=0.05" in res["command"]
    with open(out / "sweep_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == [p1[0].name, p1[1].name, p2.name]
    assert all(r["status"] == "ok" for r in rows) and [r["selected"] for r in rows] == \
        ["yes" if d == best1 else "" for d in p1] + ["yes"]
    test_all = json.loads((p2 / "results.json").read_text())["stage2"]["test"]["all"]
    assert float(rows[2]["test_all_info_only"]) == pytest.approx(test_all, abs=0.01)
    md = (out / "sweep_summary.md").read_text()
    assert "test all (info only)" in md and "**\u2605**" in md
    assert (out / "sweep.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "selected stage1.weight_decay=" in printed and "python -m bigltr.train recipe=tiny_test" in printed

    # Rerun: nothing is trained again.
    mtimes = {d: (d / "results.json").stat().st_mtime_ns for d in p1 + [p2]}
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (finished") == 3 and "running" not in printed
    assert {d: (d / "results.json").stat().st_mtime_ns for d in mtimes} == mtimes

    # A partial trial folder (no results.json) is rerun; a finished one with another config is refused.
    other = p1[1] if best1 == p1[0] else p1[0]
    (other / "results.json").unlink()
    assert sweep.main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{other.name}: would run" in printed and printed.count("skipped (finished") == 2
    assert sweep.main(argv[:-1] + ["stage2.epochs=2"]) == 2
    assert "different config" in capsys.readouterr().err


def test_failing_trials_are_recorded_and_the_sweep_goes_on(sweep_shards, tmp_path, capsys, one_thread):
    # model.name is a free string for the config: the unknown model only fails when the trial builds it
    # (a clean config error, exit 2).
    out = tmp_path / "bad"
    rc = sweep.main(["recipe=tiny_test", f"out={out}", "--grid", "0,1e-3", f"data.root={sweep_shards}",
                     "model.name=nonexistent_model_xyz"])
    assert rc == 1  # nothing to select
    printed = capsys.readouterr().out
    assert printed.count("FAILED (exit 2)") == 2  # the second trial ran after the first failed
    for name in ("s1_wd=0", "s1_wd=1e-03"):
        assert (out / "trials" / name / "exit_code").read_text().strip() == "2"
    with open(out / "sweep_summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["failed (exit 2)"] * 2
    md = (out / "sweep_summary.md").read_text()
    assert "## Failed trials" in md and "nonexistent_model_xyz" in md


def _fake_trial(out: Path, name: str, stage: str, val: float, test: float) -> None:
    d = out / "trials" / name
    d.mkdir(parents=True)
    m = lambda a: {"all": a, "many": a, "medium": a, "few": a, "per_class": [a]}  # noqa: E731
    (d / "results.json").write_text(json.dumps({f"stage{stage}": {"val": m(val), "test": m(test)}}))


def test_selection_uses_validation_never_test(tmp_path, capsys):
    out = tmp_path / "fake"
    _fake_trial(out, "s1_wd=1e-04", "1", val=40.0, test=90.0)  # best on test: must not be chosen
    _fake_trial(out, "s1_wd=1e-03", "1", val=60.0, test=50.0)
    _fake_trial(out, "s1_wd=1e-03__s2_radius=1e-01", "2", val=61.0, test=10.0)
    _fake_trial(out, "s1_wd=1e-03__s2_radius=2e-01", "2", val=65.0, test=5.0)
    _fake_trial(out, "s1_wd=1e-04__s2_radius=5e-01", "2", val=99.0, test=99.0)  # from the unselected trial
    argv = ["recipe=tiny_test", f"out={out}", "--grid", "1e-4,1e-3,1e-2", "--radius", "0.1,0.2,0.5", "--collect"]
    assert sweep.main(argv) == 0
    res = json.loads((out / "sweep_result.json").read_text())
    assert res["phase1"]["trial"] == "s1_wd=1e-03" and res["phase2"]["trial"] == "s1_wd=1e-03__s2_radius=2e-01"
    assert res["command"].endswith("stage1.weight_decay=0.001 stage2.maxnorm.radius=0.2")
    with open(out / "sweep_summary.csv") as f:
        status = {r["trial"]: r["status"] for r in csv.DictReader(f)}
    assert status["s1_wd=1e-02"] == "pending" and status["s1_wd=1e-03__s2_radius=5e-01"] == "pending"
    assert (out / "sweep.png").stat().st_size > 0


def test_slurm_dry_run_and_array_task(tmp_path, capsys):
    out = tmp_path / "sl"
    data = tmp_path / "nodata"  # the data need not exist on the submitting machine (warning only)
    assert sweep.main(["recipe=tiny_test", f"out={out}", "--grid", "1e-4,1e-3,1e-2", "--launcher", "slurm",
                       "--dry-run", f"data.root={data}", "stage1.epochs=1"]) == 0
    printed = capsys.readouterr().out
    lines = (out / "trials.txt").read_text().splitlines()
    assert len(lines) == 3 and "stage1.weight_decay=0.001" in lines[1] and "stage=1" in lines[1]
    sbatch = [ln for ln in printed.splitlines() if ln.startswith("sbatch ")]
    assert len(sbatch) == 1 and "--array=0-2" in sbatch[0] and "slurm/sweep.sh" in sbatch[0]
    assert not (out / "trials").exists()  # nothing ran

    # The array task: a stand-in python records its arguments (and sleeps when asked); a stand-in scontrol too.
    bin_dir = stand_in_bin(tmp_path / "bin", {
        "fakepy": '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\nexec sleep "${FAKE_SLEEP:-0}"\n',
        "scontrol": '#!/bin/sh\necho "$@" > "$RECORD.scontrol"\n'})
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "BIGLTR_PYTHON": str(bin_dir / "fakepy"),
           "SLURM_ARRAY_JOB_ID": "77", "RECORD": str(tmp_path / "argv")}
    script = [str(ROOT / "slurm" / "sweep.sh"), str(out / "trials.txt")]
    r = subprocess.run(script, env={**env, "SLURM_ARRAY_TASK_ID": "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "argv").read_text().splitlines() == ["-m", "bigltr.train", *shlex.split(lines[1])]
    assert (out / "trials" / "s1_wd=1e-03" / "exit_code").read_text().strip() == "0"

    # A trial whose results already hold its stage is not run again (e.g. requeued after it had finished).
    (tmp_path / "argv").unlink()
    done = out / "trials" / "s1_wd=1e-04"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"stage1": {"val": {"all": 1.0}}}, indent=1))
    r = subprocess.run(script, env={**env, "SLURM_ARRAY_TASK_ID": "0"}, capture_output=True, text=True)
    assert r.returncode == 0 and "nothing to do" in r.stdout and not (tmp_path / "argv").exists()

    # USR1 (Slurm's warning before the time limit): the trial is stopped and the array task requeued.
    p = subprocess.Popen(script, env={**env, "SLURM_ARRAY_TASK_ID": "2", "FAKE_SLEEP": "30"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while not (tmp_path / "argv").exists() and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    stdout, _ = p.communicate(timeout=10)
    assert p.returncode == 0 and "requeueing" in stdout
    assert (tmp_path / "argv.scontrol").read_text().split() == ["requeue", "77_2"]
    assert not (out / "trials" / "s1_wd=1e-02" / "exit_code").exists()


def test_slurm_submit_and_no_second_array_while_one_runs(tmp_path, capsys, monkeypatch):
    bin_dir = stand_in_bin(tmp_path / "bin", {
        "sbatch": '#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\necho 4242\n',
        "squeue": '#!/bin/sh\n[ -n "$QUEUED" ] && echo "4242_1 RUNNING"\nexit 0\n'})
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(tmp_path / "sbatch_args"))
    out = tmp_path / "sl"
    argv = ["recipe=tiny_test", f"out={out}", "--grid", "1e-4,1e-3", "--launcher", "slurm", "--max-parallel", "1",
            "--sbatch-args=--partition=gpu --time=1:00:00", f"data.root={tmp_path}"]
    assert sweep.main(argv) == 0
    args = (tmp_path / "sbatch_args").read_text().splitlines()
    assert "--array=0-1%1" in args and "--partition=gpu" in args and args[-2:] == [
        str(ROOT / "slurm" / "sweep.sh"), str(out / "trials.txt")]
    assert json.loads((out / "slurm_launches.json").read_text())[0]["job"] == "4242"
    # a trial finished meanwhile, the array still runs: refused; once it is gone only the unfinished one goes
    _fake_trial(out, "s1_wd=1e-04", "1", val=50.0, test=50.0)
    monkeypatch.setenv("QUEUED", "1")
    assert sweep.main(argv) == 2 and "still queued/running" in capsys.readouterr().err
    monkeypatch.delenv("QUEUED")
    assert sweep.main(argv) == 0
    assert "--array=1%1" in (tmp_path / "sbatch_args").read_text().splitlines()


@pytest.mark.parametrize("extra, message", [
    (["--grid", "1e-3", "stage1.weight_decy=0"], "did you mean 'stage1.weight_decay'"),
    (["--grid", "1e-3", "--radius", "0.1", "stage2.maxnorm.radiu=1"], "did you mean 'stage2.maxnorm.radius'"),
    (["stage1.epochs=1"], "no search given"),
    (["--grid", "1e-3,,1e-2"], "empty item"),
    (["--grid", "1e-3;1e-2"], "is not a number"),
    (["--grid", "1e-3,-1e-3"], ">= 0"),
    (["--log-uniform", "1e-1:1e-5", "--trials", "3"], "0 < LO < HI"),
    (["--log-uniform", "1e-5:1e-1"], "--trials"),
    (["--grid", "1e-3", "stage1.weight_decay=0"], "searched key"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, capsys, extra, message):
    out = tmp_path / "typo"
    assert sweep.main(["recipe=tiny_test", f"out={out}", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_log_uniform_samples_are_stable(tmp_path):
    a = sweep.log_uniform("1e-5:1e-1", 5, seed=3)
    assert a == sweep.log_uniform("1e-5:1e-1", 5, seed=3) != sweep.log_uniform("1e-5:1e-1", 5, seed=4)
    assert len(a) == 5 and all(1e-5 <= v <= 1e-1 for v in a)
    assert [t.name for t in sweep.phase1_trials([0.0, 5e-3, 1.5e-3])] == ["s1_wd=0", "s1_wd=5e-03", "s1_wd=1.5e-03"]
    assert sweep.yaml_float(1e-5) == "1.0e-05" and sweep.index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
