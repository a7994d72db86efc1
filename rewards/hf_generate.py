"""``generate(prompts) -> texts`` backed by a Hugging Face causal LM (for tests and small runs).

The generative judge takes any ``generate(prompts: list[str]) -> list[str]``; the trainer wires
its vLLM rollout engine there. This adapter does the same with ``transformers`` (greedy by
default, left padding, returns only the new text).
"""

from __future__ import annotations

import threading
from typing import Any


class HFGenerate:
    def __init__(self, model: Any, tokenizer: Any = None, *, max_new_tokens: int = 32,
                 do_sample: bool = False, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("HFGenerate needs a tokenizer when given a model object")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = device
        self.kwargs = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                       "pad_token_id": tokenizer.pad_token_id}
        self.batch_size = batch_size
        self._torch = torch
        self._lock = threading.Lock()  # one generate at a time on this model

    def __call__(self, prompts: list[str]) -> list[str]:
        out: list[str] = []
        with self._lock, self._torch.no_grad():
            side = self.tokenizer.padding_side
            self.tokenizer.padding_side = "left"
            try:
                for i in range(0, len(prompts), self.batch_size):
                    enc = self.tokenizer(prompts[i:i + self.batch_size], return_tensors="pt",
                                         padding=True).to(self.device)
                    enc.pop("token_type_ids", None)
                    gen = self.model.generate(**enc, **self.kwargs)
                    new = gen[:, enc["input_ids"].shape[1]:]
                    out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
            finally:
                self.tokenizer.padding_side = side
        return out
