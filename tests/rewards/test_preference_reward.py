"""Preference rewards with tiny models built here (no downloads): random ones for batching and loading,
and ones whose preference is known (weights set by hand, or fine-tuned here) for what the rewards compute."""

import asyncio

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mispo.scoring.reward_runner import RewardRunner  # noqa: E402
from mispo.scoring.plugins import load_reward  # noqa: E402
from rewards.preference import JUDGE_TEMPLATE, GenerativeJudge, RewardModelReward, parse_verdict  # noqa: E402

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
def paris_rm_path(tmp_path_factory):
    """A reward model that scores a text by its last token alone: attention and MLP outputs are zeroed,
    so the last hidden state is norm(embedding); the score head reads dimension 0, which is +2 for
    "paris", -2 for "london" (random, near 0, for every other word)."""
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(_config(num_labels=1))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[WORDS.index("paris"), 0] = 2.0
        model.model.embed_tokens.weight[WORDS.index("london"), 0] = -2.0
        model.score.weight.zero_()
        model.score.weight[0, 0] = 1.0
    path = tmp_path_factory.mktemp("paris_rm")
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _last_token_score(path: str, word: str) -> float:
    """The paris reward model's score of a text ending in `word`, computed directly from its weights."""
    model = transformers.LlamaForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        x = model.model.embed_tokens.weight[WORDS.index(word)].double()
        h = x * torch.rsqrt(x.pow(2).mean() + model.config.rms_norm_eps) * model.model.norm.weight.double()
        return float(h @ model.score.weight[0].double())


def test_reward_model_scores_the_known_preference_through_the_plugin(paris_rm_path):
    rm = load_reward({"fn": "rewards.preference:RewardModelReward",
                      "args": {"path": paris_rm_path, "batch_size": 2}})
    # different lengths in one batch: the score is read at each row's own last token, not at padding
    rows = [{"id": 0, "prompt": "the capital of france is ", "completion": "paris"},
            {"id": 1, "prompt": "the capital of france is ", "completion": "london"},
            {"id": 2, "prompt": "which ", "completion": "london is the capital of france a paris"},
            {"id": 3, "prompt": "which ", "completion": "paris is the capital of france a london"}]
    out = RewardRunner(rm).score(rows)
    assert not any(out.failed)
    paris, london = _last_token_score(paris_rm_path, "paris"), _last_token_score(paris_rm_path, "london")
    assert paris > 3.0 and london < -3.0  # the preference the weights encode
    assert out.scores == pytest.approx([paris, london, paris, london], abs=1e-4)


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


QUESTION = "which is the capital of france"


@pytest.fixture(scope="module")
def paris_judge_path(tmp_path_factory):
    """A tiny causal LM fine-tuned here to judge "paris" better than "london" in either position:
    "[[A]]" when Response A is paris, "[[B]]" when Response B is."""
    tok = _tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config())
    prompts = [JUDGE_TEMPLATE.format(question=QUESTION, a="paris", b="london"),
               JUDGE_TEMPLATE.format(question=QUESTION, a="london", b="paris")]
    verdicts = [tok.convert_tokens_to_ids("[[A]]"), tok.convert_tokens_to_ids("[[B]]")]
    ids = torch.tensor([tok(p)["input_ids"] + [v, tok.eos_token_id] for p, v in zip(prompts, verdicts)])
    labels = ids.clone()
    labels[:, :-2] = -100  # learn the verdict and the end of the answer
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(500):
        out = model(input_ids=ids, labels=labels)
        if out.loss.item() < 1e-3:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 1e-3, "the tiny judge did not learn its two verdicts"
    path = tmp_path_factory.mktemp("paris_judge")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_judge_with_a_tiny_hf_model_prefers_what_it_learned(paris_judge_path):
    """Through the plugin path (judge_model -> HFGenerate): the response the judge prefers in both
    orders wins 1.0, and swapping response and reference swaps the result."""
    judge = load_reward({"fn": "rewards.preference:GenerativeJudge",
                         "args": {"judge_model": paris_judge_path, "max_new_tokens": 4}})
    rows = [{"id": 0, "prompt": QUESTION, "completion": "paris", "reference": "london"},
            {"id": 1, "prompt": QUESTION, "completion": "london", "reference": "paris"}]
    out = RewardRunner(judge).score(rows)
    assert not any(out.failed) and out.scores == [1.0, 0.0]
    preferred = asyncio.run(judge(prompt=QUESTION, completion="paris", reference="london"))
    swapped = asyncio.run(judge(prompt=QUESTION, completion="london", reference="paris"))
    assert (preferred["win_rate"], preferred["judge_unreadable"]) == (1.0, 0)
    assert (swapped["win_rate"], swapped["judge_unreadable"]) == (0.0, 0)


def test_judge_one_order_keeps_the_position_bias(paris_judge_path):
    """With both_orders off, one prompt per pair (the response as A): the learned verdict alone decides."""
    judge = GenerativeJudge(judge_model=paris_judge_path, max_new_tokens=4, both_orders=False)
    res = judge.judge_batch([(QUESTION, "paris", "london"), (QUESTION, "london", "paris")])
    assert [r["win_rate"] for r in res] == [1.0, 0.0]


def test_parse_verdict_and_missing_reference():
    assert parse_verdict("I think [[B]]. Final: [[ tie ]]") == "TIE"
    assert parse_verdict("A is better") is None
    judge = GenerativeJudge(lambda ps: ["[[A]]"] * len(ps))
    with pytest.raises(ValueError, match="reference"):
        asyncio.run(judge(prompt="q", completion="c"))
