"""render_prompt with the tiny model's character-level tokenizer and chat template."""

import pytest

from mispo.config import DataConfig
from mispo.data import DataError, render_prompt
from mispo.models.step3p5.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_string_prompt_becomes_user_message(tok):
    text, ids = render_prompt({"prompt": "12+35=", "answer": "47"}, tok, DataConfig())
    assert text == "<|user|>12+35=<|eot|><|assistant|>"
    assert tok.decode(ids) == text and ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1  # special tokens not added twice
    assert len(ids) == 2 + len("12+35=") + 1


def test_system_prompt_and_message_lists(tok):
    cfg = DataConfig(system_prompt="Be brief.")
    text, ids = render_prompt({"prompt": "1+1="}, tok, cfg)
    assert text == "<|system|>Be brief.<|eot|><|user|>1+1=<|eot|><|assistant|>" and tok.decode(ids) == text
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}]
    expected = "<|system|>Mine.<|eot|><|user|>hi<|eot|><|assistant|>"
    assert render_prompt({"prompt": own}, tok, cfg)[0] == expected
    padded = [{"role": "user", "content": "hi", "name": None}]  # as datasets returns message structs
    assert render_prompt({"prompt": padded}, tok, DataConfig())[0] == "<|user|>hi<|eot|><|assistant|>"


def test_plain_text(tok):
    text, ids = render_prompt({"prompt": "12+35="}, tok, DataConfig(chat_template=False))
    assert text == "12+35=" and tok.decode(ids) == text
    text, _ = render_prompt({"prompt": "2*3="}, tok, DataConfig(chat_template=False, system_prompt="Sys"))
    assert text == "Sys\n\n2*3="
    with pytest.raises(DataError, match="data.chat_template is false"):
        render_prompt({"prompt": [{"role": "user", "content": "x"}]}, tok, DataConfig(chat_template=False))
