"""environments/openai_agent_example.py, an OpenAI-client agent, played through the run's endpoint against
a scripted `rollout.generate`: its calculator tool result reaches the model as masked context, its
answer is the reward; and the recipe field that selects it."""

from __future__ import annotations

import pytest

from mispo.batch import Sample
from mispo.config import Recipe


class ScriptedModel:
    """rollout.generate replying `replies[t]` (+ <|eot|>) to the t-th call of each episode."""

    def __init__(self, tokenizer, replies):
        self.tok, self.replies = tokenizer, replies

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        out = []
        for r in requests:
            text = self.replies[self.tok.decode(r["prompt_ids"]).count("<|assistant|>") - 1]
            eot = self.tok.convert_tokens_to_ids("<|eot|>")
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"]) + [eot]
            out.append(Sample(r["prompt_ids"], ids, [-0.25] * len(ids), [1] * len(ids), "stop", response_text=text))
        return out


@pytest.fixture(scope="module")
def domain():
    from mispo.loop.domains import Domain
    from mispo.models.step3p5.tiny import tiny_tokenizer
    from mispo.rollout.agent_episodes import serve_agents

    recipe = Recipe(rollout={"environment": "environments/openai_agent_example.py:agent",
                             "environment_kind": "openai_agent", "max_new_tokens": 16, "max_turns": 3})
    d = Domain("calc", recipe).load(with_train=False)
    server = serve_agents([d], tiny_tokenizer(), max_context=512)
    yield d
    server.stop()


@pytest.mark.parametrize("answer, reward", [("42", 1.0), ("41", 0.0)])
def test_calculator_agent_calls_the_tool_and_is_scored(domain, answer, reward):
    model = ScriptedModel(domain.agent_server.tokenizer, ["<calc>6*7</calc>", f"<answer>{answer}</answer>"])
    requests = [{"row": {"prompt": "What is 6*7?", "answer": "42"}, "group": 0}]
    (s,) = domain.sample(model, requests, n=1, temperature=1.0)
    tok = domain.agent_server.tokenizer
    assert s.reward == reward and s.reward_info["calls"] == 2 and s.finish_reason == "stop"
    model_text = tok.decode([t for t, m in zip(s.response_ids, s.loss_mask) if m])
    context = tok.decode([t for t, m in zip(s.response_ids, s.loss_mask) if not m])
    assert model_text == f"<calc>6*7</calc><|eot|><answer>{answer}</answer><|eot|>"
    assert context == "<|tool|>42<|eot|><|assistant|>"  # the tool's result, masked
    assert tok.decode(s.prompt_ids).startswith("<|system|>Compute with <calc>")
    assert domain.score([s]) == {"reward/mean": reward, "rollout/agent_calls": 2.0, "rollout/agent_dropped_calls": 0.0}


def test_openai_agent_kind_needs_the_agent():
    with pytest.raises(ValueError, match="environment_kind = 'openai_agent' needs rollout.environment"):
        Recipe(rollout={"environment_kind": "openai_agent"})


@pytest.mark.slow
def test_mispo_train_plays_the_agent_through_the_runs_endpoint(tmp_path):
    """`mispo train` with the example agent: the run serves it, trains every call of its episodes (none
    dropped), and the learner's log-probs of the stitched tokens agree with the server's (traj_keep 1.0)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    args = ["recipes/tool_expert.yaml", "warmup.steps=0", "rollout.environment_kind=openai_agent",
            "rollout.environment=environments/openai_agent_example.py:agent", "trainer.max_steps=1",
            "data.eval=null", "rollout.prompts_per_step=2", "rollout.n_samples=2", "rollout.max_new_tokens=8",
            "learner.actor_mini_batches=1", "--output", str(tmp_path / "run")]
    env = {**os.environ, "MISPO_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "mispo", "train", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (step,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert step["rollout/agent_calls"] == 3.0 and step["rollout/agent_dropped_calls"] == 0.0
    assert step["mispo/traj_keep_frac"] == 1.0
