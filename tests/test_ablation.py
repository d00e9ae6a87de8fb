"""bigltr/ablation.py (bigltr-ablation; tools/ablation.py is an alias) on tiny shards: all seven rows, resumable,
with the table, CSV and plot written."""
import csv
import json

import pytest


def test_ablation_rows_and_resume(tiny_shards, tmp_path, capsys):
    from bigltr import ablation

    out = tmp_path / "abl"
    argv = ["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage1.epochs=1", "stage2.epochs=1"]
    rows = ablation.main(argv)
    names = [n for n, _ in rows]
    assert len(rows) == 7 and names[0].startswith("naive") and "full" in names[-1]
    assert "weight_decay: 0.0" in (out / "s1_naive" / "config.yaml").read_text()
    # rows 5-7 are stage 2 from row 2's checkpoint, with the switches the row names
    assert "when: 'off'" in (out / "s2_cb_wd" / "config.yaml").read_text()
    s2 = json.loads((out / "s2_full" / "results.json").read_text())["stage2"]
    assert rows[-1][1]["test"] == s2["test"]
    # tau chosen on validation: the chosen tau's val accuracy is the best on the curve
    ph = json.loads((out / "posthoc.json").read_text())
    assert ph["tau"]["val"]["all"] == max(ph["tau_curve_val"].values())
    with open(out / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and float(table[1]["test_all"]) == rows[1][1]["test"]["all"]
    assert (out / "ablation.png").stat().st_size > 0 and "| naive CE (WD 0) |" in (out / "ablation.md").read_text()
    # the title names the data that was used (data.root), not only the recipe
    assert "### Ablation on shards, recipe tiny_test " in (out / "ablation.md").read_text()
    # one feature cache shared by the stage-2 rows
    assert len(list((out / "feature_cache").glob("train-*/meta.json"))) == 1
    # rerun: everything reused
    mtime = (out / "s2_full" / "results.json").stat().st_mtime_ns
    capsys.readouterr()
    ablation.main(argv)
    assert "reusing" in capsys.readouterr().out
    assert (out / "s2_full" / "results.json").stat().st_mtime_ns == mtime
    # the same folder with another schedule: an error naming the key, not the old rows under a new title
    with pytest.raises(SystemExit, match=r"s1_naive holds another run \(it ran with stage1.epochs=1, this row needs 2"):
        ablation.main(argv[:-2] + ["stage1.epochs=2", "stage2.epochs=1"])
    # --no-train on a fresh folder: says which row is missing and what it would train; nothing is trained
    with pytest.raises(SystemExit, match=r"--no-train: no finished run for s1_naive; it would train .*weight_decay=0"):
        ablation.main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={tmp_path / 'none'}", "--no-train"])
    assert not (tmp_path / "none" / "s1_naive").exists()


def test_data_name(tmp_path):
    from bigltr import ablation_table

    d = tmp_path / "my_copy"
    d.mkdir()
    assert ablation_table.data_name(str(d)) == "my_copy"  # no _info.json: the folder
    (d / "_info.json").write_text(json.dumps({"name": "cifar100_lt"}))
    assert ablation_table.data_name(str(d)) == "cifar100_lt (in my_copy/)"
    assert ablation_table.data_name(str(d) + "/") == "cifar100_lt (in my_copy/)"


def test_reuse_reads_a_key_an_older_config_lacks_as_its_default(tmp_path):
    """A run written by an older bigltr has no config.yaml entry for a key added since (stage2.classifier): the
    ablation's reuse reads it as the default, as resume=auto does, instead of refusing the folder as another run;
    a saved value that differs from the row's is still named."""
    import yaml

    from bigltr.ablation_reuse import reuse_problem
    from bigltr.config import build_config, to_dict

    argv = ["recipe=tiny_test", f"data.root={tmp_path}", "stage2.epochs=1"]
    run = tmp_path / "s2_cb_wd"
    run.mkdir()
    saved = to_dict(build_config(argv))
    del saved["stage2"]["classifier"]  # not in the older version
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert reuse_problem(run, argv, "2") is None
    assert reuse_problem(run, argv + ["stage2.classifier=lws", "stage2.maxnorm.when=off"], "2") == \
        "it ran with stage2.classifier='linear', this row needs 'lws'"
    saved["stage2"]["epochs"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert reuse_problem(run, argv, "2") == "it ran with stage2.epochs=3, this row needs 1"


def test_tools_alias_and_console_script():
    """tools/ablation.py and the bigltr-ablation script run bigltr.ablation (no sys.path edits needed)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = Path(sys.executable).with_name("bigltr-ablation")
    if not script.is_file():
        pytest.skip("bigltr-ablation not installed next to this Python: pip install -e .")
    for cmd in ([sys.executable, str(root / "tools" / "ablation.py"), "--help"], [str(script), "--help"]):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
        assert p.returncode == 0 and "Table 1 rows" in p.stdout, p.stderr


def test_ablation_baselines_rows_and_costs(tiny_shards, tmp_path, capsys):
    """--baselines adds post-hoc LA, the LA loss (balanced softmax), cRT, one-stage WB and LWS on the same data and
    schedule, each tau chosen on validation; a recipe whose tuned stage-1 WD is 0 runs (row 2 is row 1's run).
    Each row's cost in CPU-hours, from the files the runs wrote: train (results.json wall_time_s x world_size), the
    stage-1 run a post-hoc or stage-2 row starts from, tune (the tau sweep's wall_s), total; a rerun that reuses
    every run reports the same costs."""
    from bigltr import ablation

    out = tmp_path / "abl"
    argv = ["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage1.epochs=1", "stage2.epochs=1",
            "stage1.weight_decay=0", "--baselines"]
    rows = ablation.main(argv)
    table = capsys.readouterr().out
    names = [n for n, _ in rows]
    assert len(rows) == 12 and not (out / "s1_wd").exists() and rows[1][1] == rows[0][1]
    assert names[7].startswith("+ post-hoc logit adjustment") and names[8].startswith("LA loss")
    assert names[9].startswith("cRT") and names[10].startswith("one-stage WB") and names[11].startswith("LWS")
    lws = (out / "s2_lws" / "config.yaml").read_text()
    assert "classifier: lws" in lws and "sampler: class_balanced" in lws and "when: 'off'" in lws
    for f in ("posthoc_la.json", "posthoc_mla.json"):
        ph = json.loads((out / f).read_text())
        assert ph["tau"]["val"]["all"] == max(ph["tau_curve_val"].values())  # chosen on val
    assert "loss: balanced_softmax" in (out / "s1_balanced_softmax" / "config.yaml").read_text()
    one = (out / "s1_one_stage_wb" / "config.yaml").read_text()
    assert "classifier: etf" in one and "feature_reg: 0.01" in one and "weight_decay: 0.005" in one
    crt = (out / "s2_crt" / "config.yaml").read_text()
    assert "sampler: class_balanced" in crt and "classifier_init: reinit" in crt
    assert "| cRT (stage 2: reinit, CE, class-balanced sampling) |" in (out / "ablation.md").read_text()

    def hours(run, stage):  # recomputed here from the run's files
        res = json.loads((out / run / "results.json").read_text())
        t = res[f"stage{stage}"]["wall_time_s"]
        assert res["device"] == "cpu" and t["train_incl_val"] > 0 and "final_eval" in t
        return (t["train_incl_val"] + t.get("feature_cache_build", 0) + t["final_eval"]) * res["world_size"] / 3600

    def sweep(name):
        ph = json.loads((out / name).read_text())
        assert ph["wall_s"] > 0 and ph["device"] == "cpu"
        return ph["wall_s"] / 3600

    s1 = hours("s1_naive", "1")
    # (train, stage 1, tune) per row; rows 1 and 2 are one run (the stage-1 WD is 0)
    want = {"naive CE": (s1, 0, 0), "CE + WD": (s1, 0, 0), "+ L2-normalised": (0, s1, sweep("posthoc.json")),
            "+ tau-norm": (0, s1, sweep("posthoc.json")), "+ stage 2 CB & WD (": (hours("s2_cb_wd", "2"), s1, 0),
            "+ stage 2 CB & MaxNorm": (hours("s2_cb_maxnorm", "2"), s1, 0),
            "+ stage 2 CB & WD & MaxNorm": (hours("s2_full", "2"), s1, 0),
            "+ post-hoc logit": (0, s1, sweep("posthoc_la.json")),
            "LA loss": (hours("s1_balanced_softmax", "1"), 0, 0), "cRT": (hours("s2_crt", "2"), s1, 0),
            "one-stage WB": (hours("s1_one_stage_wb", "1"), 0, sweep("posthoc_mla.json")),
            "LWS": (hours("s2_lws", "2"), s1, 0)}
    with open(out / "ablation.csv") as f:
        csv_rows = {r["row"]: r for r in csv.DictReader(f)}
    assert len(csv_rows) == len(rows)
    for prefix, (train, base, tune) in want.items():
        (name,) = [n for n in csv_rows if n.startswith(prefix)]
        r = csv_rows[name]
        assert r["cost_unit"] == "CPU-h"
        got = [float(r[k]) for k in ("train_h", "stage1_h", "tune_h", "total_h")]
        assert got == pytest.approx([train, base, tune, train + base + tune], abs=2e-6), name
    assert hours("s2_cb_wd", "2") > 0 and s1 > 0
    md = (out / "ablation.md").read_text()
    assert "| train CPU-h | stage 1 CPU-h | tune CPU-h | total CPU-h |" in md and "Cost in CPU-h" in md
    assert md.strip() in table  # printed as written
    # a rerun reuses every run and sweep: the same costs, read from the files
    first = (out / "ablation.csv").read_text()
    ablation.main(argv)
    assert (out / "ablation.csv").read_text() == first
    # --skip leaves baseline rows out (a rerun that trains nothing: --no-train finds every other row finished)
    (out / "s2_lws").rename(tmp_path / "lws_moved")  # a skipped row's run is not needed
    rows = ablation.main(argv + ["--skip", "lws,one_stage_wb", "--no-train"])
    assert [n for n, _ in rows] == names[:10]
    assert "rows left out (--skip): lws, one_stage_wb" in (out / "ablation.md").read_text()
    with pytest.raises(SystemExit):
        ablation.main(argv + ["--skip", "one_stage"])
    assert "unknown row 'one_stage' (did you mean 'one_stage_wb'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(argv[:-1] + ["--skip", "lws"])
    assert "add --baselines" in capsys.readouterr().err
