"""Hub datasets (`hf:NAME[:CONFIG][@SPLIT]`) and save_to_disk folders as data.train / data.eval: the spec,
the fast offline error, and real loading through `datasets` from folders built here."""

import json

import datasets
import pytest
from huggingface_hub import constants

from mispo.config import DataConfig, load_recipe
from mispo.data import DataError, load_rows, parse_hf_spec

ROWS = {"train": [{"question": f"{i}+1=?", "answer": f"work\n#### {i + 1}"} for i in range(5)],
        "test": [{"question": f"{i}*2=?", "answer": f"#### {2 * i}"} for i in range(3)]}
GSM8K_LIKE = DataConfig(fields={"prompt": "question"})


@pytest.mark.parametrize("spec, split, expected", [
    ("hf:openai/gsm8k:main@train", "train", ("openai/gsm8k", "main", "train")),
    ("hf:openai/gsm8k:main", "eval", ("openai/gsm8k", "main", "test")),   # eval defaults to test
    ("hf:openai/gsm8k", "train", ("openai/gsm8k", None, "train")),
    ("hf:squad@validation[:100]", "eval", ("squad", None, "validation[:100]")),
])
def test_spec(spec, split, expected):
    assert parse_hf_spec(spec, split) == expected


@pytest.mark.parametrize("spec", ["hf:", "hf:name@", "hf:name:@train", "hf:@train"])
def test_bad_spec_names_the_field(spec):
    with pytest.raises(DataError, match=r"data\.eval = .*hf:NAME\[:CONFIG\]\[@SPLIT\]"):
        load_rows(spec, None, "eval", DataConfig())


def test_unreachable_hub_fails_at_once_naming_the_field_and_the_local_fix(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(DataError) as info:
        load_rows("hf:openai/gsm8k:main@train", None, "train", GSM8K_LIKE)
    msg = str(info.value)
    assert "data.train = 'hf:openai/gsm8k:main@train'" in msg and "unreachable" in msg
    assert "local .jsonl / .json / .parquet file or a datasets.save_to_disk folder" in msg and "HF_HUB_OFFLINE" in msg


def test_offline_mode_reads_only_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"data\.eval = .*HF_HUB_OFFLINE is set: only cached datasets load"):
        load_rows("hf:mispo-test/not-cached@test", None, "eval", GSM8K_LIKE)


@pytest.fixture
def data_dir(tmp_path):
    """A folder of data files as a hub repository holds them: splits named by the files."""
    d = tmp_path / "gsm8k_like"
    d.mkdir()
    for split, rows in ROWS.items():
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_load_dataset_with_the_column_mapping(data_dir):
    train = load_rows(f"hf:{data_dir}", None, "train", GSM8K_LIKE)
    evals = load_rows(f"hf:{data_dir}", None, "eval", GSM8K_LIKE)  # the test split, eval_size rows
    assert train == [{"prompt": r["question"], "answer": r["answer"]} for r in ROWS["train"]]
    assert [r["prompt"] for r in evals] == [r["question"] for r in ROWS["test"]]
    assert len(load_rows(f"hf:{data_dir}@train[:2]", None, "train", GSM8K_LIKE)) == 2
    with pytest.raises(DataError, match=r"data\.eval = .*split='validation'.*check the name, config and split"):
        load_rows(f"hf:{data_dir}@validation", None, "eval", GSM8K_LIKE)
    with pytest.raises(DataError, match="maps 'answer' to the column 'gold', which the file lacks"):
        load_rows(f"hf:{data_dir}", None, "train", DataConfig(fields={"prompt": "question", "answer": "gold"}))


def test_saved_dataset_and_dataset_dict_folders(tmp_path):
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in ROWS.items()})
    dd.save_to_disk(str(tmp_path / "dict"))
    dd["train"].save_to_disk(str(tmp_path / "one"))
    assert [r["answer"] for r in load_rows(str(tmp_path / "dict"), None, "eval", GSM8K_LIKE)] == \
        [r["answer"] for r in ROWS["test"]]
    assert len(load_rows(str(tmp_path / "one"), None, "train", GSM8K_LIKE)) == 5
    with pytest.raises(DataError, match=r"not 'train'; fix: point at the split's own folder"):
        datasets.DatasetDict({"test": dd["test"]}).save_to_disk(str(tmp_path / "only_test"))
        load_rows(str(tmp_path / "only_test"), None, "train", GSM8K_LIKE)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_rows(str(tmp_path / "plain"), None, "train", GSM8K_LIKE)


def test_a_recipe_takes_hub_specs_without_a_file_check():
    recipe = load_recipe(None, ["data.train=hf:openai/gsm8k:main@train", "data.eval=hf:openai/gsm8k:main@test"])
    assert recipe.data.train == "hf:openai/gsm8k:main@train"
