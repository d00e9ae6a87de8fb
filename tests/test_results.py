"""The one reader of a run's results (bigltr.results), the one `.cls` label parser (bigltr.data.labels) and the
one-line bad-input report of the entry points (bigltr.errors)."""
import json

import pytest

from bigltr.config import ConfigError
from bigltr.data.errors import DataError
from bigltr.data.labels import parse_label
from bigltr.errors import EXIT_BAD_INPUT, BadInputError, fail
from bigltr.results import finished_stage, read_epochs, read_results


def test_read_results_and_finished_stages(tmp_path):
    assert read_results(tmp_path) == {}  # no results.json yet
    m = {"all": 50.0, "many": 60.0, "medium": 50.0, "few": 40.0}
    (tmp_path / "results.json").write_text(json.dumps({"stage1": {"val": m, "test": m}, "stage2": {"val": {}},
                                                       "classes": ["a", "b"]}))
    res = read_results(tmp_path)
    assert res["classes"] == ["a", "b"]
    assert finished_stage(res, 1)["val"]["all"] == 50.0 and finished_stage(res, "1") is finished_stage(res, 1)
    assert finished_stage(res, 2) is None  # no validation accuracy: not finished
    assert finished_stage({}, 1) is None and finished_stage({"stage1": "x"}, 1) is None


@pytest.mark.parametrize("text, message", [('{"stage1": {"val"', "is not readable JSON"),
                                           ("[1, 2]", "does not hold a JSON object")])
def test_a_damaged_results_json_is_one_clear_line(tmp_path, text, message):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        read_results(tmp_path)
    assert str(tmp_path / "results.json") in str(e.value) and "\n" not in str(e.value)


def test_read_epochs_skips_what_is_not_complete(tmp_path):
    f = tmp_path / "summary.csv"
    assert read_epochs(f) == []  # not written yet
    f.write_text("epoch,val_all\n1,10\nx,3\n2,\n3,12\n4,1")  # a bad epoch, no val_all, a line being written
    assert [(r["epoch"], r["val_all"]) for r in read_epochs(f)] == [("1", "10"), ("3", "12")]


@pytest.mark.parametrize("payload", [b"3", "3", b" 3\n"])
def test_parse_label_reads_bytes_and_text(payload):
    assert parse_label(payload, "s.tar: sample k", 10) == 3


@pytest.mark.parametrize("payload, message", [
    (b"abc", "s.tar: sample k: label b'abc' in .cls is not an integer"),  # ShardLoader: the raw bytes
    ("abc", "s.tar: sample k: label 'abc' in .cls is not an integer"),  # DaliShardLoader: the indexed text
    (b"10", "s.tar: sample k: label 10 outside [0, 10) (num_classes in _info.json)"),
    ("-1", "label -1 outside [0, 10)"),
])
def test_parse_label_errors_name_the_sample(payload, message):
    with pytest.raises(DataError) as e:
        parse_label(payload, "s.tar: sample k", 10)
    assert message in str(e.value)


def test_fail_is_one_line_on_stderr(capsys):
    assert fail("bigltr-x", "no such file") == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "bigltr-x: no such file\n"
    assert issubclass(BadInputError, ValueError)


# ------------------------------------------------------------------------------------- per-class arrays, both forms
def test_per_class_arrays_round_trip_against_counts():
    """The stored arrays against accuracies computed here from correct/total by hand."""
    from bigltr.results import pack_per_class, per_class_accuracy, per_class_count

    correct, total = [2, 0, 5, 0, 1], [3, 4, 5, 0, 7]
    ref = [round(100 * c / t, 2) if t else None for c, t in zip(correct, total)]
    assert ref == [66.67, 0.0, 100.0, None, 14.29]
    acc = [100 * c / t if t else float("nan") for c, t in zip(correct, total)]  # NaN, None: no sample
    m = {"all": 45.24, "per_class": pack_per_class(acc, total)}
    assert m["per_class"] == {"accuracy": ref, "count": total}
    assert per_class_accuracy(m) == ref and per_class_count(m) == total
    m2 = json.loads(json.dumps(m))  # what a reader of results.json sees
    assert per_class_accuracy(m2) == ref and per_class_count(m2) == total
    # the older form: a bare list of accuracies (4 decimals), no counts
    old = {"all": 45.24, "per_class": [66.6667, 0.0, 100.0, None, 14.2857]}
    assert per_class_accuracy(old) == [66.6667, 0.0, 100.0, None, 14.2857] and per_class_count(old) is None
    with pytest.raises(KeyError):
        per_class_accuracy({"all": 1.0})
    with pytest.raises(ValueError):
        pack_per_class([1.0, 2.0], [1])


def test_per_class_arrays_stay_small_at_100k_classes():
    import numpy as np

    from bigltr.results import pack_per_class, per_class_accuracy

    rng = np.random.default_rng(0)
    total = rng.integers(0, 6, 100_000)
    correct = rng.binomial(total, 0.6)
    acc = np.where(total > 0, 100 * correct / np.maximum(total, 1), np.nan)
    packed = pack_per_class(acc, total)
    text = json.dumps(packed)
    assert len(text) < 1_200_000  # ~0.8 MB: one short number per class and quantity
    back = per_class_accuracy({"per_class": json.loads(text)})
    ok = total > 0
    assert np.allclose(np.array([v for v in back if v is not None]), acc[ok], atol=0.005 + 1e-9)
    assert all(v is None for v, h in zip(back, ok) if not h)


def test_group_sizes_match_the_metrics_groups():
    from bigltr.metrics import class_groups
    from bigltr.results import group_sizes

    counts = [500, 101, 100, 50, 20, 19, 3, 1000, 20]
    ref = {g: len(c) for g, c in class_groups(counts, 100, 20).items()}
    assert group_sizes(counts, 100, 20) == {"many_thr": 100, "few_thr": 20, **ref}
    assert ref == {"many": 3, "medium": 4, "few": 2}
    assert group_sizes([5, 6], 100, 20) == {"many_thr": 100, "few_thr": 20, "many": 0, "medium": 0, "few": 2}


def test_results_table_names_group_sizes_and_absent_groups():
    from bigltr.engine.report import format_table, summary_table
    from bigltr.results import group_sizes

    m = {"many": 81.234, "medium": 60.0, "few": None, "all": 70.617, "per_class": {"accuracy": [], "count": []}}
    sizes = group_sizes([900, 150, 150] + [50] * 4076 + [5] * 0, 100, 20)
    t = format_table({"stage 1": m}, "T", sizes)
    assert t.splitlines() == ["T", "| | Many (n=3) | Medium (n=4,076) | Few (n=0) | All (n=4,079) |",
                              "|---|---|---|---|---|", "| stage 1 | 81.23 | 60.00 | absent | 70.62 |"]
    # a group with classes but no test sample in any of them: n/a, not absent
    t = format_table({"s": m}, "", {"many": 3, "medium": 5, "few": 2, "many_thr": 100, "few_thr": 20})
    assert t.splitlines()[-1] == "| s | 81.23 | 60.00 | n/a | 70.62 |"
    # summary_table: sizes from results["groups"]; an older results.json: counted with a stage config's thresholds
    res = {"stage1": {"test": m}, "class_counts": [900, 30, 30, 3]}
    assert "| Many (n=1) | Medium (n=2) | Few (n=1) | All (n=4) |" in summary_table(
        {**res, "groups": group_sizes(res["class_counts"], 100, 20)})
    assert "| Many (n=3) | Medium (n=0) | Few (n=1) |" in summary_table(
        res, {"stage1": {"data": {"many_thr": 29, "few_thr": 20}, "stage1": {"weight_decay": 0.0}}})
    assert "| | Many | Medium | Few | All |" in summary_table(res)  # nothing to count with
