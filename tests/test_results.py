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
