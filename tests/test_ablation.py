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
    from bigltr import ablation

    d = tmp_path / "my_copy"
    d.mkdir()
    assert ablation.data_name(str(d)) == "my_copy"  # no _info.json: the folder
    (d / "_info.json").write_text(json.dumps({"name": "cifar100_lt"}))
    assert ablation.data_name(str(d)) == "cifar100_lt (in my_copy/)"
    assert ablation.data_name(str(d) + "/") == "cifar100_lt (in my_copy/)"


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


def test_ablation_baselines_rows(tiny_shards, tmp_path):
    """--baselines adds post-hoc LA, the LA loss (balanced softmax), cRT and one-stage WB on the same data and
    schedule, each tau chosen on validation; a recipe whose tuned stage-1 WD is 0 runs (row 2 is row 1's run)."""
    from bigltr import ablation

    out = tmp_path / "abl"
    rows = ablation.main(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "stage1.epochs=1",
                          "stage2.epochs=1", "stage1.weight_decay=0", "--baselines"])
    names = [n for n, _ in rows]
    assert len(rows) == 11 and not (out / "s1_wd").exists() and rows[1][1] == rows[0][1]
    assert names[7].startswith("+ post-hoc logit adjustment") and names[8].startswith("LA loss")
    assert names[9].startswith("cRT") and names[10].startswith("one-stage WB")
    for f in ("posthoc_la.json", "posthoc_mla.json"):
        ph = json.loads((out / f).read_text())
        assert ph["tau"]["val"]["all"] == max(ph["tau_curve_val"].values())  # chosen on val
    assert "loss: balanced_softmax" in (out / "s1_balanced_softmax" / "config.yaml").read_text()
    one = (out / "s1_one_stage_wb" / "config.yaml").read_text()
    assert "classifier: etf" in one and "feature_reg: 0.01" in one and "weight_decay: 0.005" in one
    crt = (out / "s2_crt" / "config.yaml").read_text()
    assert "sampler: class_balanced" in crt and "classifier_init: reinit" in crt
    assert "| cRT (stage 2: reinit, CE, class-balanced sampling) |" in (out / "ablation.md").read_text()
