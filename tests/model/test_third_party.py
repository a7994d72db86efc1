"""Step3p5 under other libraries as their authors use them: TRL's fused LM head computes the model's own
log-probs on a left-padded batch, peft LoRA generates and trains, TRL's GRPOTrainer trains a checkpoint
given by path, and the Auto classes give mispo's model in any import order with vLLM (fresh processes)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mispo.models.step3p5 import Step3p5ForCausalLM
from mispo.models.step3p5.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def prompt_and_completion():
    """Left-padded prompts followed by right-padded completions, as GRPO scores them; labels -100 on pads."""
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    prompts = tok(["12+34=", "a longer prompt here"], return_tensors="pt", padding=True)
    tok.padding_side = "right"
    completions = tok(["46", "and its long answer"], return_tensors="pt", padding=True)
    ids = torch.cat([prompts.input_ids, completions.input_ids], 1)
    mask = torch.cat([prompts.attention_mask, completions.attention_mask], 1)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def test_trl_fused_lm_head_gives_the_models_log_probs(tiny_checkpoint):
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ids, mask, labels = prompt_and_completion()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        add_fused_lm_head(model)  # TRL's GRPO path: model.base_model(input_ids, attention_mask, use_cache=False)
        fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    want = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(fused.log_probs[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_peft_lora_generates_like_the_base_model_and_trains_only_adapters(tiny_checkpoint):
    peft = pytest.importorskip("peft")
    from mispo.learner.lora import target_module_names

    base = Step3p5ForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    batch = tok(["12+34=", "x"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = base.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=target_module_names(base))
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # adapters start at B = 0: the same tokens through PeftModelForCausalLM.generate
        assert torch.equal(model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False), want)
    ids, mask, labels = prompt_and_completion()
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" not in n)  # B gets a gradient first


@pytest.mark.slow
def test_trl_grpo_trainer_trains_lora_on_a_checkpoint_given_by_path(tiny_checkpoint, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, use_cpu=True, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=4, learning_rate=1e-2, beta=0.0, seed=0,
                      report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = GRPOTrainer(model=str(tiny_checkpoint), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": "12+3="}, {"prompt": "abc"}] * 2),
                          processing_class=tiny_tokenizer(),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(float(h["loss"]))) for h in steps)
    model = trainer.model
    assert isinstance(model.get_base_model(), Step3p5ForCausalLM)
    n_layers = model.config.num_hidden_layers  # the MTP layer's adapters get no gradient: it does not run
    lora_b = [p for n, p in model.named_parameters()
              if "lora_B" in n and int(n.split(".layers.")[1].split(".")[0]) < n_layers]
    assert len(lora_b) == 2 * n_layers and all(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: all moved
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    base = model.get_base_model()
    torch.testing.assert_close(base.model.layers[0].self_attn.q_proj.base_layer.weight,
                               saved["model.layers.0.self_attn.q_proj.weight"], atol=0, rtol=0)


CHECK = ("from transformers import AutoConfig, AutoModelForCausalLM\n"
         "model = AutoModelForCausalLM.from_pretrained(path)\n"
         "print(type(AutoConfig.from_pretrained(path)).__module__, type(model).__module__,"
         " type(model.config).__module__)\n")
ORDERS = {
    "vllm then mispo": "import vllm\nimport mispo\n" + CHECK,
    # then vLLM reads the checkpoint's config as its engine does at start-up, which registers vLLM's own
    # Step3p5Config with AutoConfig: AutoModelForCausalLM must still give mispo's model and config
    "mispo then vllm": "import mispo\nimport vllm\n" + CHECK + (
        "from vllm.transformers_utils.config import get_config\n"
        "assert type(get_config(path, trust_remote_code=False)).__module__.startswith('vllm.')\n") + CHECK,
}
MISPO = ("mispo.models.step3p5.configuration_step3p5", "mispo.models.step3p5.modeling_step3p5",
         "mispo.models.step3p5.configuration_step3p5")


@pytest.mark.slow
@pytest.mark.parametrize("order", ORDERS)
def test_auto_classes_give_mispos_model_in_any_order_with_vllm(tiny_checkpoint, order):
    pytest.importorskip("vllm")
    code = f"path = {str(tiny_checkpoint)!r}\n" + ORDERS[order]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split() for line in done.stdout.splitlines() if line.startswith(("mispo.", "vllm."))]
    assert len(lines) == ORDERS[order].count(CHECK), done.stdout
    assert lines[0] == list(MISPO), done.stdout  # before vLLM reads a config: all mispo's
    assert all(line[1:] == list(MISPO[1:]) for line in lines), done.stdout  # mispo's model and config, always
