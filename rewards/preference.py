"""Preference rewards for prompts without a checkable answer.

:class:`RewardModelReward` (a reward-model plugin): a Hugging Face sequence-classification model
scores ``prompt + completion``; the logit (of ``label``, for multi-label heads) is the reward.
Models are loaded once per (path, device) and shared; concurrent calls are scored in batches.

:class:`GenerativeJudge` (the report's generative pairwise reward): a language model compares the
response with the row's reference answer, in both orders to cancel position bias. Each order
gives 1 (response better), 0.5 (tie or an unreadable verdict) or 0; ``win_rate`` is their mean.
``score = win_rate - length_penalty * max(0, len(response) / len(reference) - 1)`` (lengths in
characters), so answers longer than the reference pay for their extra length. The judge gets
text from ``generate(prompts: list[str]) -> list[str]``: the trainer's vLLM engine, or
:class:`rewards.hf_generate.HFGenerate` built from ``judge_model``.

Both are factories: a recipe names them with arguments, e.g.
``reward: [{fn: "rewards.preference:RewardModelReward", args: {path: /models/rm}}]``.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Sequence

from rewards.batching import MicroBatcher

_models: dict[tuple[str, str], tuple[Any, Any]] = {}
_models_lock = threading.Lock()


def load_reward_model(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for a sequence-classification checkpoint, loaded once per process."""
    key = (str(path), device)
    with _models_lock:
        if key not in _models:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            tok.truncation_side = "left"  # keep the end of the response
            model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
            _models[key] = (model, tok)
        return _models[key]


class RewardModelReward:
    """Reward plugin backed by a sequence-classification reward model (see module docstring)."""

    def __init__(self, path: str, *, device: str = "cpu", max_length: int = 2048,
                 batch_size: int = 16, label: int = 0, use_chat_template: bool = True):
        self.model, self.tokenizer = load_reward_model(path, device)
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.label, self.use_chat_template = label, use_chat_template
        self._batcher = MicroBatcher(self.score_batch, max_batch=batch_size * 4)
        self._lock = threading.Lock()

    def _text(self, prompt: str, completion: str) -> str:
        if self.use_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                tokenize=False)
        return prompt + completion

    def score_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of (prompt, completion) pairs, in order."""
        import torch

        texts = [self._text(p, c) for p, c in pairs]
        scores: list[float] = []
        with self._lock, torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.max_length)
                enc.pop("token_type_ids", None)
                logits = self.model(**enc.to(self.device)).logits.float()
                scores += logits[:, self.label if logits.shape[-1] > 1 else 0].tolist()
        return scores

    async def __call__(self, prompt: str = "", completion: str = "", **row) -> float:
        return await self._batcher.submit((prompt, completion))


JUDGE_TEMPLATE = (
    "Please act as an impartial judge and compare two responses to the question below. Judge "
    "helpfulness, correctness and clarity; do not prefer a response for its length or position.\n\n"
    "[Question]\n{question}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
    "Reply with exactly one verdict: [[A]] if A is better, [[B]] if B is better, [[TIE]] if equal.")
_VERDICT = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'TIE' from the judge's last [[...]] verdict, or None if there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1].upper() if found else None


class GenerativeJudge:
    """Pairwise generative reward vs a reference answer (see module docstring)."""

    def __init__(self, generate: Callable[[list[str]], list[str]] | None = None, *,
                 judge_model: str | None = None, template: str = JUDGE_TEMPLATE,
                 both_orders: bool = True, length_penalty: float = 0.0,
                 reference_key: str = "reference", max_batch: int = 64, max_new_tokens: int = 64):
        if generate is None:
            if judge_model is None:
                raise ValueError("GenerativeJudge needs generate=callable or judge_model=path")
            from rewards.hf_generate import HFGenerate

            generate = HFGenerate(judge_model, max_new_tokens=max_new_tokens)
        self.generate = generate
        self.template, self.both_orders = template, both_orders
        self.length_penalty, self.reference_key = float(length_penalty), reference_key
        self._batcher = MicroBatcher(self.judge_batch, max_batch=max_batch, max_wait_s=0.01)

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[dict]:
        """Judge (question, response, reference) triples; one result dict each."""
        prompts = []
        for question, response, reference in items:
            prompts.append(self.template.format(question=question, a=response, b=reference))
            if self.both_orders:
                prompts.append(self.template.format(question=question, a=reference, b=response))
        texts = list(self.generate(prompts))
        if len(texts) != len(prompts):
            raise RuntimeError(f"generate returned {len(texts)} texts for {len(prompts)} prompts")
        per = 2 if self.both_orders else 1
        results = []
        for k, (_, response, reference) in enumerate(items):
            wins, unreadable = [], 0
            for order, text in enumerate(texts[k * per:(k + 1) * per]):
                verdict = parse_verdict(text)
                mine = "A" if order == 0 else "B"
                if verdict is None:
                    unreadable += 1
                    wins.append(0.5)
                else:
                    wins.append(0.5 if verdict == "TIE" else float(verdict == mine))
            win_rate = sum(wins) / len(wins)
            ratio = len(response) / max(1, len(reference))
            results.append({"score": win_rate - self.length_penalty * max(0.0, ratio - 1.0),
                            "win_rate": win_rate, "length_ratio": ratio,
                            "judge_unreadable": unreadable})
        return results

    async def __call__(self, prompt: str = "", completion: str = "", **row) -> dict:
        reference = row.get(self.reference_key, row.get("answer"))
        if reference is None:
            raise ValueError(f"generative judge needs the row field '{self.reference_key}' "
                             "(or 'answer'): the reference response to compare with")
        return await self._batcher.submit((prompt, completion, str(reference)))
