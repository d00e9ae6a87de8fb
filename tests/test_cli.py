"""The command line: one key=value parser, --help generated from the config dataclasses, bigltr-export (timm's
model.safetensors + config.json layout, same logits in timm) and bigltr-eval (same numbers as the run)."""
import dataclasses
import json
import re
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import torch

from bigltr.config import (Config, ConfigError, build_config, config_from_dict, parse_overrides, split_override,
                           to_dict, valid_keys)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------- key=value
def test_one_override_parser():
    assert split_override("--stage1.lr=0.1") == ("stage1.lr", "0.1")
    assert split_override(" out =a=b") == ("out", "a=b")  # the value is everything after the first '='
    assert parse_overrides(["stage=1", "x=true", "y=", "z=[0.5, 0.5]", "w=5e-3", "v={bad"]) == \
        {"stage": 1, "x": True, "y": "", "z": [0.5, 0.5], "w": "5e-3", "v": "{bad"}
    for bad in ("stage1", "=3"):
        with pytest.raises(ConfigError, match="is not of the form key=value"):
            parse_overrides([bad])
    import bigltr.config

    assert bigltr.config.parse_overrides(["a.b=2"]) == {"a.b": 2}  # the config's name for the same parser


# ----------------------------------------------------------------------------------------------- --help
def _expected_type(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    if isinstance(tp, types.UnionType):
        return "|".join(_expected_type(a) for a in typing.get_args(tp))
    return tp.__name__


def _leaves(cls=Config, prefix="", obj=None):
    obj = cls() if obj is None else obj
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.", getattr(obj, f.name))
        else:
            yield f"{prefix}{f.name}", hints[f.name], getattr(obj, f.name)


def test_help_lists_every_key_from_the_dataclasses():
    outs = [subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
            for cmd in ([sys.executable, "-m", "bigltr.train", "--help"], [str(BIN / "bigltr-train"), "-h"])]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    text = outs[0].stdout
    assert outs[1].stdout == text and "usage: python -m bigltr.train" in text and "Exit codes" in text
    lines = text.splitlines()
    printed = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"  (\S+): (\S+) = (.*)", line)
        if m:
            printed[m.group(1)] = (m.group(2), m.group(3), lines[i + 1])
    assert sorted(printed) == sorted(valid_keys())
    for key, tp, default in _leaves():
        ptype, pdefault, desc = printed[key]
        assert desc.startswith("      ") and len(desc.strip()) > 10, key  # a one-line description
        assert ptype == _expected_type(tp), key
        # the printed default, typed back on the command line, is the dataclass default
        value = config_from_dict({}, parse_overrides([f"{key}={pdefault}"]), where="test")
        for part in key.split("."):
            value = getattr(value, part)
        assert value == default and type(value) is type(default), (key, pdefault, value, default)


# ----------------------------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def run18(tiny_shards, tmp_path_factory):
    """One tiny run (timm's resnet18 on 28x28 grey images, 1 epoch per stage), shared by export and eval."""
    from bigltr.train import main as train

    out = tmp_path_factory.mktemp("cli") / "run"
    rc = train(["recipe=tiny_test", f"data.root={tiny_shards}", f"out={out}", "model.name=resnet18",
                "stage1.epochs=1", "stage2.epochs=1", "stage1.batch_size=32", "stage2.batch_size=32"])
    assert rc == 0
    return out


def _bigltr_model(ckpt_path):
    from bigltr.checkpoint import checkpoint_config, load_run_checkpoint
    from bigltr.models import build_checkpoint_model

    ckpt = load_run_checkpoint(ckpt_path)
    return build_checkpoint_model(ckpt, checkpoint_config(ckpt), ckpt_path)


def test_export_loads_in_timm_with_the_same_logits(run18, tiny_shards, tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    from bigltr.export import main as export

    out = tmp_path / "hub"
    assert export([str(run18), str(out)]) == 0  # default: stage 2
    assert "classifier as 'fc'" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    info = json.loads((tiny_shards / "_info.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 10 and cfg["num_features"] == 512
    assert cfg["label_names"] == info["classes"] and cfg["model_args"]["in_chans"] == 1
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [1, 28, 28] and pc["mean"] == [0.286] and pc["std"] == [0.353]
    assert pc["classifier"] == "fc" and pc["num_classes"] == 10 and pc["crop_pct"] == 1.0
    assert "tag" not in pc and "license" not in pc  # not timm's ImageNet weights
    assert cfg["bigltr"]["stage"] == 2 and cfg["bigltr"]["class_counts"] == info["class_counts"]
    # timm's own key names: fc.weight, not classifier.weight / backbone.*
    weights = load_file(str(out / "model.safetensors"))
    ref = timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict()
    assert sorted(weights) == sorted(ref) and "fc.weight" in weights

    bigltr_model = _bigltr_model(run18 / "stage2" / "best.pt")
    x = torch.randn(4, 1, 28, 28)
    loaded = [timm.create_model(f"local-dir:{out}", pretrained=True),
              # by name: the overlay carries num_classes, else timm drops a head of another size than resnet18's 1000
              timm.create_model("resnet18", pretrained=True, num_classes=10, in_chans=1,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10))]
    with torch.no_grad():
        expected = bigltr_model(x)
        for m in loaded:
            torch.testing.assert_close(m.eval()(x), expected, atol=1e-5, rtol=0)

    # --stage 1: stage 1's classifier
    assert export([str(run18), str(tmp_path / "s1"), "--stage", "1"]) == 0
    s1 = torch.load(run18 / "stage1" / "best.pt", weights_only=True)["model"]
    assert torch.equal(load_file(str(tmp_path / "s1" / "model.safetensors"))["fc.weight"], s1["classifier.weight"])
    assert export([str(tmp_path / "no_run"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["resnet32_cifar", "resnet34_cifar"])
def test_export_bigltr_cifar_resnets(name, tmp_path):
    """bigltr's own CIFAR ResNets are timm-registered: they export to the same layout and load through timm."""
    import timm

    from bigltr.checkpoint import save_checkpoint
    from bigltr.export import export
    from bigltr.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 10, in_chans=1).eval()
    cfg = build_config(["recipe=tiny_test", f"model.name={name}"])
    save_checkpoint({"stage": 1, "epoch": 1, "model": model.state_dict(), "val_all": 0.0, "config": to_dict(cfg)},
                    tmp_path / "run" / "stage1" / "best.pt")
    r = export(tmp_path / "run", tmp_path / "hub")
    assert r["classifier"] == "fc"
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["architecture"] == name
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()(x),
                                   model(x), atol=1e-5, rtol=0)


def test_export_refuses_an_occupied_out_without_overwrite(tmp_path, capsys):
    """OUT that is a file, or a folder holding anything: exit 2 with one line (a file gave a FileExistsError
    traceback; a folder had its config.json silently replaced). --overwrite replaces the two files only; --help says
    so."""
    from bigltr.checkpoint import save_checkpoint
    from bigltr.export import main as export
    from bigltr.models import build_model

    model = build_model("resnet32_cifar", 10, in_chans=1)
    cfg = build_config(["recipe=tiny_test"])
    save_checkpoint({"stage": 1, "epoch": 1, "model": model.state_dict(), "val_all": 0.0, "config": to_dict(cfg)},
                    tmp_path / "run" / "stage1" / "best.pt")
    run = str(tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text('{"mine": 1}')
    (hub / "notes.txt").write_text("keep")
    for out, message in [(tmp_path / "afile", "exists and is not a folder"),
                         (hub, "is not empty (config.json, notes.txt); give a new or empty folder, or --overwrite")]:
        assert export([run, str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bigltr-export: ") and message in err and err.count("\n") == 1, err
    assert (hub / "config.json").read_text() == '{"mine": 1}' and (tmp_path / "afile").read_text() == "x"
    assert export([run, str(tmp_path / "afile"), "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert export([run, str(hub), "--overwrite"]) == 0
    assert json.loads((hub / "config.json").read_text())["architecture"] == "resnet32_cifar"
    assert (hub / "notes.txt").read_text() == "keep" and (hub / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    assert export([run, str(tmp_path / "empty")]) == 0  # a new or empty folder needs no flag
    r = subprocess.run([str(BIN / "bigltr-export"), "--help"], capture_output=True, text=True, timeout=60)
    assert "--overwrite" in r.stdout and "non-empty OUT is refused" in " ".join(r.stdout.split())


def test_eval_gives_the_runs_numbers(run18, tiny_shards, tmp_path, capsys):
    """Same numbers as the run's results.json, and --json in its layout: the split's metrics at the top level, as
    results.json holds them under stageN.<split> (they were nested under "metrics"); read_eval_json also reads the
    older layout. The trainer stores the data's class names in best.pt / last.pt, so no class-order warning."""
    from bigltr.evaluate import main as evaluate

    results = json.loads((run18 / "results.json").read_text())
    for stage, split in (("stage1", "test"), ("stage2", "test"), ("stage2", "val")):
        out = tmp_path / f"{stage}_{split}.json"
        argv = [str(run18 / stage / "best.pt"), f"data.root={tiny_shards}", f"split={split}", "--json", str(out)]
        assert evaluate(argv) == 0
        captured = capsys.readouterr()
        printed = captured.out
        assert captured.err == ""
        assert "| | Many | Medium | Few | All |" in printed and f"| stage {stage[-1]}, epoch 1 |" in printed
        r = json.loads(out.read_text())
        assert "metrics" not in r, (stage, split)
        assert {k: r[k] for k in ("all", "many", "medium", "few", "per_class")} == \
            {k: results[stage][split][k] for k in ("all", "many", "medium", "few", "per_class")}
        assert r["groups"] == {"many": 3, "medium": 4, "few": 3}  # tiny_test: many_thr 20, few_thr 8
        from bigltr.evaluate import read_eval_json, split_metrics

        assert split_metrics(r) == results[stage][split] and read_eval_json(out) == r
    info = json.loads((tiny_shards / "_info.json").read_text())
    for stage in ("stage1", "stage2"):
        for name in ("best.pt", "last.pt"):
            assert torch.load(run18 / stage / name, weights_only=True)["classes"] == info["classes"]
    old = tmp_path / "old_layout.json"  # what bigltr-eval --json wrote before
    about = {k: v for k, v in r.items() if k in ("checkpoint", "stage", "split", "groups")}
    old.write_text(json.dumps({**about, "metrics": results["stage2"]["val"],
                               "posthoc": {"method": "tau_norm", "tau": 1.0, "metrics": results["stage2"]["test"]}}))
    assert read_eval_json(old) == {**about, **results["stage2"]["val"],
                                   "posthoc": {"method": "tau_norm", "tau": 1.0, "val": results["stage2"]["test"]}}


def test_eval_bad_input_is_one_line(run18, tiny_shards, tmp_path, capsys):
    import timm

    from bigltr.evaluate import main as evaluate

    best = run18 / "stage1" / "best.pt"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "timm.pt")
    state = torch.load(best, weights_only=True)
    state["model"]["classifier.weight"] = state["model"]["classifier.weight"][:5]
    state["model"]["classifier.bias"] = state["model"]["classifier.bias"][:5]
    torch.save(state, tmp_path / "five.pt")
    root = f"data.root={tiny_shards}"
    for argv, message in [
        ([str(tmp_path / "missing.pt"), root], "not found"),
        ([str(tmp_path / "timm.pt"), root], "is not a bigltr model checkpoint"),
        ([str(tmp_path / "five.pt"), root], "class-count mismatch: " + str(tmp_path / "five.pt") + " has 5 classes"),
        ([str(best), root, "data.many_thrr=3"], "did you mean 'data.many_thr'"),
        ([str(best), root, "split=train2"], "has the splits ['test', 'train', 'val']"),
        ([str(best), f"data.root={tmp_path}"], "data error"),
    ]:
        assert evaluate(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith("bigltr-eval: ") and err.count("\n") == 1, (argv, err)


def test_console_scripts_installed():
    for name in ("bigltr-export", "bigltr-eval"):
        r = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and f"usage: {name}" in r.stdout
