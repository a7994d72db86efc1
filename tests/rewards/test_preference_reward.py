"""Preference rewards with tiny random models built here (no downloads)."""

import asyncio

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mispo.reward_runner import RewardRunner  # noqa: E402
from rewards.preference import GenerativeJudge, RewardModelReward, parse_verdict  # noqa: E402

WORDS = ("[PAD] [UNK] [EOS] the a an answer is question which better response paris london "
         "capital of france 1 2 3 4 5 [[A]] [[B]] [[TIE]] A B judge please").split()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]", eos_token="[EOS]")


def _config(**kw):
    return transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=512,
                                    pad_token_id=0, bos_token_id=2, eos_token_id=2, **kw)


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_rm")
    transformers.LlamaForSequenceClassification(_config(num_labels=1)).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_lm")
    transformers.LlamaForCausalLM(_config()).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def test_reward_model_scores_batches_consistently(rm_path):
    rm = RewardModelReward(rm_path, batch_size=3)
    pairs = [("the question", "paris is the capital"), ("a", "london"), ("b", "1 2 3 4 5"),
             ("the", "answer")]
    batched = rm.score_batch(pairs)
    single = [rm.score_batch([p])[0] for p in pairs]
    assert batched == pytest.approx(single, abs=1e-5)  # padding does not change a score
    assert len(set(round(s, 6) for s in batched)) > 1
    rows = [{"id": i, "prompt": p, "completion": c} for i, (p, c) in enumerate(pairs)]
    out = RewardRunner(rm).score(rows)
    assert out.scores == pytest.approx(batched, abs=1e-5) and not any(out.failed)


def test_reward_model_is_loaded_once_and_loads_from_a_recipe(rm_path):
    from mispo.plugins import load_reward

    assert RewardModelReward(rm_path).model is RewardModelReward(rm_path).model
    plugin = load_reward({"fn": "rewards.preference:RewardModelReward", "args": {"path": rm_path}})
    assert plugin.model is RewardModelReward(rm_path).model


def test_judge_mapping_both_orders_and_length_penalty():
    seen = []

    def fake_generate(prompts):
        seen.append(len(prompts))
        out = []
        for p in prompts:
            a = p.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
            b = p.split("[Response B]\n")[1].split("\n\n")[0]
            out.append("[[A]]" if "good" in a else "[[B]]" if "good" in b
                       else "[[TIE]]" if "tie" in p else "no idea")
        return out

    judge = GenerativeJudge(fake_generate, length_penalty=0.5)
    res = judge.judge_batch([("q", "good answer", "ref"), ("q", "tie", "reference"),
                             ("q", "meh", "ref"), ("q", "bad", "good ref")])
    assert [r["win_rate"] for r in res] == [1.0, 0.5, 0.5, 0.0]
    assert res[1]["judge_unreadable"] == 0 and res[2]["judge_unreadable"] == 2
    # "good answer" is 11 chars vs 3 for "ref": penalty 0.5 * (11/3 - 1)
    assert res[0]["score"] == pytest.approx(1.0 - 0.5 * (11 / 3 - 1))
    assert res[1]["score"] == 0.5  # shorter than the reference: no penalty

    rows = [{"id": i, "prompt": "q", "completion": c, "reference": "ref"}
            for i, c in enumerate(["good", "bad", "good too"])]
    out = RewardRunner(judge).score(rows)
    assert not any(out.failed) and seen[-1] == 6  # one generate call for the whole batch


def test_judge_with_a_tiny_hf_model(lm_path):
    judge = GenerativeJudge(judge_model=lm_path, max_new_tokens=4)
    out = asyncio.run(judge(prompt="which is the capital of france", completion="paris",
                            reference="london"))
    assert 0.0 <= out["win_rate"] <= 1.0 and out["judge_unreadable"] <= 2


def test_parse_verdict_and_missing_reference():
    assert parse_verdict("I think [[B]]. Final: [[ tie ]]") == "TIE"
    assert parse_verdict("A is better") is None
    judge = GenerativeJudge(lambda ps: ["[[A]]"] * len(ps))
    with pytest.raises(ValueError, match="reference"):
        asyncio.run(judge(prompt="q", completion="c"))
