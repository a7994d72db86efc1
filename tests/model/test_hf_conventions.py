"""Step3p5 takes what transformers' conventions pass: the backbone call (attention_mask, use_cache, hidden
states after the final norm), left-padded greedy `generate` equal to one prompt at a time with no KV cache,
logits_to_keep, num_items_in_batch, tuples; foreign Step3p5 configs; `import mispo` alone registers the
Auto classes (fresh process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, DynamicCache, PretrainedConfig

from mispo.models.step3p5 import ConfigError, Step3p5Config, Step3p5ForCausalLM
from mispo.models.step3p5.tiny import SPECIAL_TOKENS, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
PAD = SPECIAL_TOKENS.index("<pad>")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()


def left_padded(prompts: list[str]):
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    return tok, tok(prompts, return_tensors="pt", padding=True)


def test_backbone_takes_hf_kwargs_and_returns_the_normed_hidden_state(model):
    _, batch = left_padded(["12+34=", "a much longer prompt"])
    with torch.no_grad():
        base = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        lm = model(**batch)
    torch.testing.assert_close(base.last_hidden_state, model.model.norm(base.hidden_states_pre_norm))
    torch.testing.assert_close(model.lm_head(base.last_hidden_state), lm.logits)


def test_left_padded_greedy_generate_equals_one_prompt_at_a_time(model):
    prompts = ["12+34=", "hello world, a longer one", "x"]
    tok, batch = left_padded(prompts)
    new = 6
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        for i, prompt in enumerate(prompts):
            one = tok(prompt, return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            assert out[i, -new:].tolist() == alone[0, -new:].tolist(), prompt


def test_generate_builds_no_cache_and_forward_refuses_a_filled_one(model):
    assert not Step3p5ForCausalLM._supports_default_dynamic_cache()
    _, batch = left_padded(["12+34=", "x"])
    with torch.no_grad():
        plain = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        asked = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True,
                               return_dict_in_generate=True)
    assert torch.equal(asked.sequences, plain) and asked.past_key_values is None
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32), layer_idx=0)
    with pytest.raises(ValueError, match="no KV cache"):
        model(batch.input_ids[:, -1:], past_key_values=cache)
    with pytest.raises(ValueError, match="2-D"):
        model(batch.input_ids, attention_mask=batch.attention_mask[:, None, None, :])


def test_logits_to_keep_loss_kwargs_and_tuples(model):
    torch.manual_seed(0)
    ids = torch.randint(7, 90, (2, 10))
    with torch.no_grad():
        full = model(ids, labels=ids)
        torch.testing.assert_close(model(ids, logits_to_keep=3).logits, full.logits[:, -3:])
        torch.testing.assert_close(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full.logits[:, [0, 4]])
        summed = model(ids, labels=ids, num_items_in_batch=7).loss  # 18 targets: sum / 7 = mean * 18 / 7
        torch.testing.assert_close(summed, full.loss * 18 / 7)
        as_tuple = model(ids, labels=ids, return_dict=False)
    torch.testing.assert_close(as_tuple[0], full.loss)
    torch.testing.assert_close(as_tuple[1], full.logits)
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(ids, labels=ids, logits_to_keep=3)


def test_a_foreign_step3p5_config_is_read_again_with_ours(tiny_checkpoint):
    class OtherStep3p5Config(PretrainedConfig):  # what vLLM registers for model_type step3p5
        model_type = "step3p5"

    loaded = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint, config=OtherStep3p5Config())
    assert isinstance(loaded.config, Step3p5Config) and loaded.config.num_hidden_layers == 4
    with pytest.raises(ConfigError, match="Step3p5Config.from_pretrained"):
        Step3p5ForCausalLM(OtherStep3p5Config())


def test_the_config_has_an_empty_auto_map_that_is_not_written(tiny_checkpoint):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert type(config) is Step3p5Config and dict(config.auto_map) == {}
    assert "auto_map" not in json.loads((tiny_checkpoint / "config.json").read_text())


def test_import_mispo_alone_registers_the_auto_classes(tiny_checkpoint):
    code = ("import sys, mispo\n"
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            f"path = {str(tiny_checkpoint)!r}\n"
            "print(type(AutoConfig.from_pretrained(path)).__module__,"
            " type(AutoModelForCausalLM.from_pretrained(path)).__module__)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["mispo.models.step3p5.configuration_step3p5",
                                   "mispo.models.step3p5.modeling_step3p5"], done.stdout + done.stderr[-2000:]
