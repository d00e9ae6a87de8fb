"""log.trackers: Accelerate's trackers fed from the epoch-end component, checked against the run's own files."""
import csv
import json

import pytest


def test_tracker_names_are_accelerates():
    """bigltr.config names the trackers without importing accelerate; they must stay Accelerate's."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from bigltr.config import TRACKERS

    assert sorted(TRACKERS) == sorted(LOGGER_TYPE_TO_CLASS)


def test_unknown_or_missing_tracker_fails_at_start_up(capsys, monkeypatch, tmp_path):
    from bigltr.config import validation
    from bigltr.train import main

    out = tmp_path / "never"
    assert main([f"out={out}", "log.trackers=[tensorbord]"]) == 2
    err = capsys.readouterr().err
    assert "config key 'log.trackers': unknown tracker 'tensorbord'; did you mean 'tensorboard'?" in err, err
    # a known tracker whose package is absent: said with what to install
    monkeypatch.setattr(validation, "_importable", lambda module: module != "comet_ml")
    assert main([f"out={out}", "log.trackers=[tensorboard, comet_ml]"]) == 2
    err = capsys.readouterr().err
    assert "'comet_ml' is not installed: pip install comet-ml" in err, err
    assert not out.exists()  # stopped before any work


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def fresh_accelerate_state():
    """A tracked run makes Accelerate's PartialState, a process-wide singleton: later tests start without it."""
    from accelerate.state import PartialState

    yield
    PartialState._reset_state()


def test_tensorboard_scalars_equal_the_summary_rows(tiny_shards, tmp_path, fresh_accelerate_state):
    """A two-stage run with log.trackers=[tensorboard]: the event files hold, per stage and epoch, the values of
    that run's summary.csv rows, the final test results of results.json, and the resolved config."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bigltr.engine.tracking import TRACKED
    from bigltr.train import main

    out = tmp_path / "run"
    assert main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "log.trackers=[tensorboard]",
                 "stage2.maxnorm.radius=0.0"]) == 0  # t=0: the radius binds, clipped rows are counted
    events = EventAccumulator(str(out / "trackers" / "run"))  # <out>/trackers/<log.project: the run dir's name>
    events.Reload()
    tags = set(events.Tags()["scalars"])
    results = json.loads((out / "results.json").read_text())
    for stage in ("stage1", "stage2"):
        rows = _csv_rows(out / stage / "summary.csv")
        logged = [k for k in TRACKED if k in rows[0]]
        assert {"train_loss", "lr", "train_acc", "val_all", "val_few", "img_per_s"} <= set(logged)
        if stage == "stage2":
            assert {"maxnorm_radius", "maxnorm_clipped_rows", "maxnorm_rows_at_radius", "wnorm_min", "wnorm_mean",
                    "wnorm_max"} <= set(logged)
        for key in logged:
            scalars = events.Scalars(f"{stage}/{key}")
            assert [s.step for s in scalars] == [int(r["epoch"]) for r in rows], key
            for s, r in zip(scalars, rows):
                # the same number: summary.csv keeps 6 significant digits, an event file a float32
                assert s.value == pytest.approx(float(r[key]), rel=1e-5, abs=1e-9), (stage, key, s.step)
        for group in ("all", "many", "medium", "few"):
            (final,) = events.Scalars(f"{stage}/test_{group}")
            assert final.value == pytest.approx(results[stage]["test"][group], rel=1e-6)
        assert events.Scalars(f"{stage}/best_epoch")[0].value == results[stage]["best_epoch"]
    assert {t.split("/")[0] for t in tags} == {"stage1", "stage2"}
    assert max(s.value for s in events.Scalars("stage2/maxnorm_clipped_rows")) > 0
    # the resolved config, flattened (Accelerate's TensorBoardTracker also writes it as hparams.yml)
    (hparams,) = (out / "trackers" / "run").glob("*/hparams.yml")
    text = hparams.read_text()
    assert "stage2.maxnorm.radius: 0.0" in text and "log.trackers: '[''tensorboard'']'" in text, text


def test_a_tracker_that_cannot_write_its_logs_is_one_line_exit_2(tiny_shards, tmp_path):
    """log.trackers=[tensorboard] whose log folder <out>/trackers is a file (or cannot be written): bigltr-train exits
    2 with one line naming the tracker and the folder, before training (it was a traceback, exit 1)."""
    pytest.importorskip("tensorboard")
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    (out / "trackers").write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "bigltr.train", "recipe=tiny_test", f"data.root={tiny_shards}",
                        f"out={out}", "log.trackers=[tensorboard]"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(err) >= 1, r.stderr
    assert err[-1].startswith("bigltr: config error: log.trackers: tensorboard cannot write its logs under "
                              f"{out / 'trackers'} (NotADirectoryError"), err[-1]
    assert not (out / "stage1").exists()  # nothing trained
