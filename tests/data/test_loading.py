"""load_rows: builtin tasks, jsonl / json / parquet files, field mapping, clear errors for bad rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mispo.config import DataConfig
from mispo.data import DataError, load_rows


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets library's arrow cache out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_builtin():
    cfg = DataConfig(builtin={"digits": [1, 1], "train_size": 300})
    train = load_rows("builtin:arithmetic", None, "train", cfg)
    evals = load_rows("builtin:arithmetic", None, "eval", DataConfig(eval_size=16))
    assert len(train) == 300 and max(len(r["prompt"]) for r in train) <= 4
    assert len(evals) == 16 and load_rows("builtin:arithmetic", None, "eval", DataConfig(), 16) == evals
    sft = load_rows("builtin:arithmetic", None, "sft", DataConfig(), 10)
    assert all(r["completion"].startswith("\\boxed{") for r in sft)
    assert load_rows("builtin:arithmetic", None, "train", DataConfig(seed=1), 10) != \
        load_rows("builtin:arithmetic", None, "train", DataConfig(seed=0), 10)
    assert load_rows(None, None, "eval", DataConfig()) == []
    with pytest.raises(DataError, match="data.builtin.colour"):
        load_rows("builtin:arithmetic", None, "train", DataConfig(builtin={"colour": 1}), 5)
    with pytest.raises(DataError, match="unknown builtin task 'nope'"):
        load_rows("builtin:nope", None, "train", DataConfig(), 5)


def test_jsonl_with_field_mapping_and_recipe_relative_path(tmp_path, monkeypatch):
    _jsonl(tmp_path / "d.jsonl", [{"question": "1+1=", "sol": "2", "id": 7},
                                  {"question": [{"role": "user", "content": "2+2="}], "sol": "4", "id": 8}])
    (tmp_path / "recipe.yaml").write_text("")
    monkeypatch.chdir("/")
    cfg = DataConfig(fields={"prompt": "question", "answer": "sol"})
    rows = load_rows("d.jsonl", str(tmp_path / "recipe.yaml"), "train", cfg)
    assert rows == [{"prompt": "1+1=", "answer": "2", "id": 7},
                    {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4", "id": 8}]
    assert load_rows(str(tmp_path / "d.jsonl"), None, "train", DataConfig(prompt_field="question"), 1) == \
        [{"prompt": "1+1=", "sol": "2", "id": 7}]


def test_parquet_and_json_array(tmp_path):
    table = pa.table({"text": ["3+4=", "5-2="], "prompt": ["old", "old"], "gold": ["7", "3"]})
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = DataConfig(fields={"prompt": "text", "answer": "gold"})
    rows = load_rows(str(tmp_path / "d.parquet"), None, "train", cfg)
    assert rows == [{"prompt": "3+4=", "answer": "7"}, {"prompt": "5-2=", "answer": "3"}]
    path = str(tmp_path / "d.json")
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]))
    assert [r["prompt"] for r in load_rows(path, None, "eval", DataConfig())] == ["a", "b"]
    assert len(load_rows(path, None, "eval", DataConfig(eval_size=1))) == 1  # eval_size applies to files


@pytest.mark.parametrize("lines,where,field", [
    ([{"prompt": "a"}, "", {"answer": "1"}], "line 3", "field 'prompt'"),           # missing; blank line 2
    ([{"prompt": "a"}, {"prompt": 5}], "line 2", "field 'prompt' has type int"),    # not a string
    ([{"prompt": "a"}, {"prompt": [{"role": "user"}]}], "line 2", "message 0"),     # bad message list
    ([{"prompt": "a"}, '{"prompt": "b"'], "line 2", "not valid JSON"),              # truncated line
    ([{"prompt": "a"}, "[1, 2]"], "line 2", "JSON object"),                         # not an object
])
def test_malformed_rows_name_file_line_field(tmp_path, lines, where, field):
    path = _jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_rows(str(path), None, "train", DataConfig())
    msg = str(err.value)
    assert str(path) in msg and where in msg and field in msg and "fix:" in msg


def test_malformed_mapped_field_and_skip(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"q": "a"}, {"q": None}, {"q": "c"}, {"q": ""}])
    cfg = DataConfig(fields={"prompt": "q"})
    msg = r"line 2: field 'prompt' \(the file's column 'q'\).*\(1 more bad rows\)"
    with pytest.raises(DataError, match=msg):
        load_rows(str(path), None, "train", cfg)
    with pytest.warns(UserWarning, match="skipped 2 of 4"):
        rows = load_rows(str(path), None, "train", cfg, on_invalid="skip")
    assert [r["prompt"] for r in rows] == ["a", "c"]


def test_file_level_errors(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match="data.eval = 'missing.jsonl': no such file"):
        load_rows("missing.jsonl", None, "eval", DataConfig())
    (tmp_path / "d.csv").write_text("prompt\na\n")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_rows(str(tmp_path / "d.csv"), None, "train", DataConfig())
    with pytest.raises(DataError, match="column 'question', which the file lacks"):
        load_rows(str(tmp_path / "d.jsonl"), None, "train", DataConfig(fields={"prompt": "question"}))
    with pytest.raises(DataError, match="field 'completion'"):
        load_rows(str(tmp_path / "d.jsonl"), None, "sft", DataConfig())
