"""mispo merge rejection filters against their rules: each filter keeps and rejects, counts add up."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mispo.config import FiltersConfig, RecipeError, load_recipe
from mispo.distill.filters import (
    FILTERS,
    Candidate,
    FilterError,
    FilterReport,
    apply_filters,
    check_kept,
    foreign_fraction,
    reject_reason,
    repeat_fraction,
    script_of,
    scripts_in,
)

FAST = settings(max_examples=60, deadline=None)


def cand(text="The answer is 4.", tokens=None, reward=1.0, finish="stop", prompt="What is 2 + 2?", key="p0"):
    """A candidate that passes every filter under the default config unless told otherwise."""
    return Candidate(prompt_key=key, prompt_text=prompt, response_text=text,
                     response_tokens=list(range(len(text.split()))) if tokens is None else tokens,
                     reward=reward, finish_reason=finish)


# --------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("ch,script", [
    ("a", "LATIN"), ("Z", "LATIN"), ("é", "LATIN"), ("ß", "LATIN"),
    ("ж", "CYRILLIC"), ("Я", "CYRILLIC"),
    ("λ", "GREEK"), ("Ω", "GREEK"),
    ("中", "CJK"), ("㐀", "CJK"), ("豈", "CJK"),  # unified, extension A, compatibility ideograph
    ("あ", "HIRAGANA"), ("ア", "KATAKANA"), ("한", "HANGUL"),
    ("ب", "ARABIC"), ("א", "HEBREW"), ("ก", "THAI"), ("क", "DEVANAGARI"),
    ("Ａ", "LATIN"), ("𝑥", "LATIN"), ("ℝ", "LATIN"),  # compatibility forms count as their letter
    ("ー", "KATAKANA"), ("々", "CJK"),
])
def test_script_of_letters(ch, script):
    assert script_of(ch) == script


@pytest.mark.parametrize("ch", ["1", "٣", " ", "\n", ".", "+", "=", "€", "∑", "→", "😀", "_", "ʼ"])
def test_script_of_neutral(ch):
    assert script_of(ch) is None


@FAST
@given(st.characters())
def test_script_of_is_none_for_non_letters(ch):
    if not ch.isalpha():
        assert script_of(ch) is None
    else:
        s = script_of(ch)
        assert s is None or (s and s == s.upper() and " " not in s)


def test_scripts_in_counts_letters_per_script():
    assert scripts_in("Hello, мир! 123 中文") == {"LATIN": 5, "CYRILLIC": 3, "CJK": 2}
    assert scripts_in("1 + 2 = 3.") == {}


def test_foreign_fraction():
    assert foreign_fraction("Hello мир", ["LATIN"]) == pytest.approx(3 / 8)
    assert foreign_fraction("Hello мир", ["latin", "Cyrillic"]) == 0.0  # case-insensitive
    assert foreign_fraction("中文 abc", ["Han"]) == pytest.approx(3 / 5)  # Unicode's name for CJK
    assert foreign_fraction("12 + 30 = 42", ["LATIN"]) == 0.0  # no letters
    assert foreign_fraction("", []) == 0.0
    assert foreign_fraction("abc", []) == 1.0


@FAST
@given(st.integers(0, 30), st.integers(0, 30), st.text(alphabet="0123456789 +-=.,()\n", max_size=20))
def test_foreign_fraction_is_the_share_of_foreign_letters(n_latin, n_cyr, neutral):
    text = "a" * n_latin + neutral + "д" * n_cyr
    expected = n_cyr / (n_latin + n_cyr) if n_latin + n_cyr else 0.0
    assert foreign_fraction(text, ["LATIN"]) == pytest.approx(expected)
    assert foreign_fraction(text, ["LATIN", "CYRILLIC"]) == 0.0


# --------------------------------------------------------------------------- repetition


@FAST
@given(st.lists(st.integers(), unique=True, max_size=50), st.integers(1, 10))
def test_repeat_fraction_zero_for_distinct_tokens(tokens, n):
    assert repeat_fraction(tokens, n) == 0.0


@FAST
@given(st.lists(st.integers(), unique=True, min_size=1, max_size=8), st.integers(2, 60), st.integers(1, 8))
def test_repeat_fraction_of_a_loop(phrase, times, n):
    """A loop of p distinct tokens has p distinct n-grams (n <= p): 1 - p/m."""
    tokens = phrase * times
    m = len(tokens) - n + 1
    if n > len(phrase) or m < len(phrase) or m < 2:
        return
    assert repeat_fraction(tokens, n) == pytest.approx(1 - len(phrase) / m)


def test_repeat_fraction_tends_to_one_for_a_looped_phrase():
    phrase = [5, 9, 2, 7, 1, 3, 8, 4, 6, 10]
    fracs = [repeat_fraction(phrase * k, 8) for k in (2, 10, 100)]
    assert fracs == sorted(fracs) and fracs[-1] > 0.98
    assert repeat_fraction(list(range(100)) + phrase * 20, 8) > 0.5


@FAST
@given(st.lists(st.integers(0, 5), max_size=60), st.integers(1, 6))
def test_repeat_fraction_range_and_invariances(tokens, n):
    f = repeat_fraction(tokens, n)
    assert 0.0 <= f < 1.0
    relabelled = [f"tok{t * 7 + 3}" for t in tokens]  # injective renaming keeps n-gram equalities
    assert repeat_fraction(relabelled, n) == pytest.approx(f)
    assert repeat_fraction(tokens[::-1], n) == pytest.approx(f)  # reversal maps n-grams one to one
    assert repeat_fraction(tuple(tokens), n) == pytest.approx(f)


def test_repeat_fraction_edge_cases():
    assert repeat_fraction([], 1) == 0.0
    assert repeat_fraction([1], 1) == 0.0  # one n-gram: m < 2
    assert repeat_fraction([1, 1], 1) == 0.5
    assert repeat_fraction([1, 1, 1], 3) == 0.0  # m == 1
    assert repeat_fraction([1, 1, 1, 1], 3) == 0.5
    with pytest.raises(ValueError):
        repeat_fraction([1, 2, 3], 0)


def test_repeat_fraction_reads_tensors_by_value():
    torch = pytest.importorskip("torch")
    assert repeat_fraction(torch.tensor([1, 2] * 10), 2) == pytest.approx(repeat_fraction([1, 2] * 10, 2))


# --------------------------------------------------------------------------- config


def test_config_defaults_and_round_trip():
    cfg = FiltersConfig()
    assert (cfg.drop_truncated, cfg.min_reward, cfg.allowed_scripts) == (True, 1.0, None)
    assert cfg.max_foreign_frac == 0.0
    assert (cfg.max_tokens, cfg.repeat_ngram, cfg.max_repeat_frac, cfg.max_per_prompt) == (None, 8, 0.5, None)
    assert FiltersConfig(**cfg.model_dump()) == cfg
    assert FiltersConfig(min_reward=-math.inf, max_tokens=1, max_per_prompt=1, repeat_ngram=1,
                        max_repeat_frac=1.0, max_foreign_frac=1.0, allowed_scripts=["latin"])


@pytest.mark.parametrize("field,value", [  # value: the YAML of a command-line override
    ("repeat_ngram", "0"), ("repeat_ngram", "-3"), ("repeat_ngram", "2.5"),
    ("max_repeat_frac", "-0.1"), ("max_repeat_frac", "1.5"),
    ("max_foreign_frac", "-0.01"), ("max_foreign_frac", "2.0"),
    ("max_tokens", "0"), ("max_tokens", "-1"),
    ("max_per_prompt", "0"), ("max_per_prompt", "-2"),
    ("min_reward", ".nan"),
    ("allowed_scripts", "LATIN"), ("allowed_scripts", "[]"), ("allowed_scripts", "[' ']"),
    ("drop_truncated", "maybe"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    """The recipe schema (mispo.config.FiltersConfig) owns the ranges; its error names the key."""
    with pytest.raises(RecipeError, match=rf"merge\.filters\.{field} \(command line\): "):
        load_recipe(None, [f"merge.filters.{field}={value}"])


# --------------------------------------------------------------------------- each filter


def test_truncated():
    assert reject_reason(cand(finish="length"), FiltersConfig()) == "truncated"
    assert reject_reason(cand(finish="stop"), FiltersConfig()) is None
    assert reject_reason(cand(finish="length"), FiltersConfig(drop_truncated=False)) is None


def test_reward():
    assert reject_reason(cand(reward=0.0), FiltersConfig()) == "reward"
    assert reject_reason(cand(reward=0.999), FiltersConfig()) == "reward"
    assert reject_reason(cand(reward=1.0), FiltersConfig()) is None  # reward < min_reward rejects
    assert reject_reason(cand(reward=0.0), FiltersConfig(min_reward=0.0)) is None
    assert reject_reason(cand(reward=math.nan), FiltersConfig(min_reward=-math.inf)) == "reward"


def test_language_from_the_prompt():
    cfg = FiltersConfig()
    zh = "计算一加一等于多少"
    assert reject_reason(cand("一加一等于二", prompt=zh), cfg) is None
    assert reject_reason(cand("One plus one is two", prompt=zh), cfg) == "language"
    assert reject_reason(cand("Один плюс один", prompt="What is 1 plus 1?"), cfg) == "language"
    assert reject_reason(cand("One plus one is two", prompt="What is one plus one?"), cfg) is None
    # a prompt that mixes scripts allows both; digits and symbols never count
    assert reject_reason(cand("x = 2, 所以答案是 2", prompt="求 x: x + 1 = 3"), cfg) is None
    assert reject_reason(cand("= 42 =", prompt="计算"), cfg) is None


def test_language_prompt_without_letters_allows_every_script():
    assert reject_reason(cand("Ответ: два", prompt="1 + 1 = ?"), FiltersConfig()) is None
    assert reject_reason(cand("答案是二", prompt=""), FiltersConfig()) is None


def test_language_allowed_scripts_override_the_prompt():
    cfg = FiltersConfig(allowed_scripts=["latin"])
    assert reject_reason(cand("一加一等于二", prompt="计算一加一"), cfg) == "language"
    assert reject_reason(cand("two", prompt="计算一加一"), cfg) is None
    assert reject_reason(cand("两", prompt="two?"), FiltersConfig(allowed_scripts=["CJK", "LATIN"])) is None


def test_language_max_foreign_frac_threshold():
    text = "abcdefghi" + "ж"  # 1 foreign letter of 10
    assert reject_reason(cand(text), FiltersConfig(max_foreign_frac=0.1)) is None  # > frac rejects
    assert reject_reason(cand(text), FiltersConfig(max_foreign_frac=0.05)) == "language"


def test_length():
    cfg = FiltersConfig(max_tokens=10)
    assert reject_reason(cand(tokens=list(range(10))), cfg) is None
    assert reject_reason(cand(tokens=list(range(11))), cfg) == "length"
    assert reject_reason(cand(tokens=list(range(10_000))), FiltersConfig()) is None


def test_repetition():
    loop = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 30
    assert reject_reason(cand(tokens=loop), FiltersConfig()) == "repetition"
    assert reject_reason(cand(tokens=list(range(300))), FiltersConfig()) is None
    assert reject_reason(cand(tokens=loop), FiltersConfig(max_repeat_frac=1.0)) is None
    # a loop shorter than n is no repetition at that n
    assert reject_reason(cand(tokens=[1, 2, 3] * 3), FiltersConfig(repeat_ngram=8)) is None


def test_first_failing_filter_names_the_rejection():
    worst = cand("Ответ", tokens=[7] * 50, reward=0.0, finish="length", prompt="What?")
    cfg = FiltersConfig(max_tokens=5)
    expected = ["truncated", "reward", "language", "length", "repetition", None]
    got = []
    for fix in [{}, {"drop_truncated": False}, {"min_reward": 0.0}, {"allowed_scripts": ["CYRILLIC"]},
                {"max_tokens": None}, {"max_repeat_frac": 1.0}]:
        cfg = cfg.model_copy(update=fix)
        got.append(reject_reason(worst, cfg))
    assert got == expected


# --------------------------------------------------------------------------- duplicates


def test_duplicates_per_prompt():
    cands = [cand("four", key="a"), cand("  four\n", key="a"), cand("4", key="a"), cand("four", key="b")]
    kept, report = apply_filters(cands, FiltersConfig())
    assert kept == [0, 2, 3]
    assert report.rejected["duplicate"] == 1 and report.kept == 3


def test_max_per_prompt():
    cands = [cand(f"answer {i}", key="a") for i in range(5)] + [cand("answer 0", key="b")]
    kept, report = apply_filters(cands, FiltersConfig(max_per_prompt=2))
    assert kept == [0, 1, 5]
    assert report.rejected["duplicate"] == 3


def test_rejected_answers_do_not_count_as_seen():
    cands = [cand("four", key="a", reward=0.0), cand("four", key="a"), cand("four", key="a")]
    kept, report = apply_filters(cands, FiltersConfig(max_per_prompt=1))
    assert kept == [1]
    assert report.rejected == {"truncated": 0, "reward": 1, "language": 0, "length": 0,
                               "repetition": 0, "duplicate": 1}


candidates = st.builds(
    Candidate,
    prompt_key=st.sampled_from(["p0", "p1", "p2"]),
    prompt_text=st.sampled_from(["What is 2 + 2?", "计算二加二", "1 + 1 = ?"]),
    response_text=st.sampled_from(["four", " four ", "4", "四", "четыре", "four four", ""]),
    response_tokens=st.lists(st.integers(0, 3), max_size=30),
    reward=st.sampled_from([0.0, 0.5, 1.0, math.nan]),
    finish_reason=st.sampled_from(["stop", "length"]),
)
configs = st.builds(
    FiltersConfig,
    drop_truncated=st.booleans(),
    min_reward=st.sampled_from([0.0, 0.5, 1.0]),
    allowed_scripts=st.sampled_from([None, ["LATIN"], ["cjk", "latin"]]),
    max_foreign_frac=st.sampled_from([0.0, 0.5, 1.0]),
    max_tokens=st.sampled_from([None, 5, 20]),
    repeat_ngram=st.integers(1, 4),
    max_repeat_frac=st.sampled_from([0.0, 0.5, 1.0]),
    max_per_prompt=st.sampled_from([None, 1, 2]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(candidates, max_size=25), configs)
def test_apply_filters_counts_every_candidate_once(cands, cfg):
    kept, report = apply_filters(cands, cfg)
    assert list(report.rejected) == list(FILTERS)
    assert report.sampled == len(cands) == report.kept + sum(report.rejected.values())
    assert report.kept == len(kept) and kept == sorted(set(kept))
    reasons = [reject_reason(c, cfg) for c in cands]
    for name in FILTERS[:-1]:
        assert report.rejected[name] == reasons.count(name)
    assert all(reasons[i] is None for i in kept)
    by_prompt = {}
    for i in kept:
        by_prompt.setdefault(cands[i].prompt_key, []).append(cands[i].response_text.strip())
    for texts in by_prompt.values():
        assert len(texts) == len(set(texts))
        assert cfg.max_per_prompt is None or len(texts) <= cfg.max_per_prompt
    # every passing answer not kept is a duplicate of a kept one or beyond the per-prompt cap
    for i, c in enumerate(cands):
        if reasons[i] is None and i not in kept:
            earlier = [cands[j].response_text.strip() for j in kept
                       if j < i and cands[j].prompt_key == c.prompt_key]
            assert c.response_text.strip() in earlier or len(earlier) == cfg.max_per_prompt


# --------------------------------------------------------------------------- report and errors


def report(**rejected):
    return FilterReport(sampled=sum(rejected.values()) + 31, rejected=rejected, kept=31)


def test_report_to_dict_and_summary():
    r = report(reward=200, truncated=25)
    assert r.rejected == {"truncated": 25, "reward": 200, "language": 0, "length": 0, "repetition": 0,
                          "duplicate": 0}
    assert r.to_dict() == {"sampled": 256, "kept": 31, "rejected": r.rejected, "kept_frac": 31 / 256}
    assert r.summary() == "256 sampled, 31 kept (12%); rejected: reward 200, truncated 25"
    assert FilterReport(4, {}, 4).summary() == "4 sampled, 4 kept (100%); rejected: none"
    assert FilterReport(0, {}, 0).to_dict()["kept_frac"] == 0.0
    assert "(<1%)" in FilterReport(1000, {"reward": 999}, 1).summary()


def test_report_worst_ties_follow_filter_order():
    assert report(reward=5, language=9).worst() == ("language", 9)
    assert report(duplicate=3, length=3, repetition=3).worst() == ("length", 3)
    assert report().worst() == ("truncated", 0)


@pytest.mark.parametrize("sampled,rejected,kept",
                         [(10, {"reward": 5}, 4), (1, {"typo": 1}, 0), (1, {"reward": -1}, 2)])
def test_report_rejects_inconsistent_counts(sampled, rejected, kept):
    with pytest.raises(ValueError):
        FilterReport(sampled=sampled, rejected=rejected, kept=kept)


FIX_FIELDS = {
    "truncated": "rollout.max_new_tokens", "reward": "merge.filters.min_reward",
    "language": "merge.filters.allowed_scripts", "length": "merge.filters.max_tokens",
    "repetition": "merge.filters.max_repeat_frac", "duplicate": "merge.filters.max_per_prompt",
}


@pytest.mark.parametrize("worst", FILTERS)
def test_check_kept_names_domain_filter_counts_and_fix(worst):
    others = {name: i + 1 for i, name in enumerate(FILTERS) if name != worst}
    rejected = {**others, worst: 100}
    r = FilterReport(sampled=sum(rejected.values()), rejected=rejected, kept=0)
    with pytest.raises(FilterError) as err:
        check_kept("math", r, FiltersConfig())
    msg = str(err.value)
    assert msg.startswith("merge.experts.math: every one of the ")
    assert f"the {r.sampled} sampled answers" in msg
    assert "currently merge.filters." in msg
    assert f"the '{worst}' filter rejected 100" in msg
    for name, n in others.items():
        assert f"{name} {n}" in msg
    assert FIX_FIELDS[worst] in msg.split("fix: ", 1)[1]
    assert isinstance(err.value, ValueError)


def test_check_kept_reward_fix_and_nothing_sampled():
    r = FilterReport(sampled=256, rejected={"reward": 200, "truncated": 25, "language": 31}, kept=0)
    expected = (r"merge\.experts\.math: .*'reward' filter rejected 200 \(truncated 25, language 31, .*\); "
                r"fix: lower merge\.filters\.min_reward, or check the expert solves this domain "
                r"\(its eval accuracy\)")
    with pytest.raises(FilterError, match=expected):
        check_kept("math", r, FiltersConfig())
    nothing = r"^merge\.experts\.code: no answers were sampled; fix: give the domain prompts"
    with pytest.raises(FilterError, match=nothing):
        check_kept("code", FilterReport(0, {}, 0), FiltersConfig())
    with pytest.raises(FilterError, match=r"^merge\.experts\.tool: every one of the 3 .*duplicate"):
        check_kept("merge.experts.tool", FilterReport(3, {"duplicate": 3}, 0), FiltersConfig())
    with pytest.raises(FilterError, match=r"^merge\.experts\.math: the 1 sampled answer was rejected; "):
        check_kept("math", FilterReport(1, {"length": 1}, 0), FiltersConfig())


def test_check_kept_passes_when_something_is_kept():
    assert check_kept("math", FilterReport(10, {"reward": 9}, 1), FiltersConfig()) is None


def test_end_to_end_nothing_kept_raises():
    cands = [cand(reward=0.0, key=f"p{i}") for i in range(8)] + [cand(finish="length")]
    kept, r = apply_filters(cands, FiltersConfig())
    assert kept == [] and r.worst() == ("reward", 8)
    with pytest.raises(FilterError, match="'reward' filter rejected 8 \\(truncated 1"):
        check_kept("math", r, FiltersConfig())
