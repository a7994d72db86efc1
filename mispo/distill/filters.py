"""Rejection-sampling filters for `mispo merge`: which sampled expert answers become distillation data.

Each domain expert samples answers on its domain's prompts; an answer is kept only if it passes every
filter below. The filters run in this order and the first one that fails names the rejection, so every
sampled answer is counted exactly once, under one filter or as kept:

1. ``truncated``  - the answer hit the token limit (``finish_reason == "length"``); off with
   ``drop_truncated: false``.
2. ``reward``     - the domain's reward is below ``min_reward`` (a NaN reward is rejected too).
3. ``language``   - more than ``max_foreign_frac`` of the answer's letters are in a script that is not
   allowed: ``allowed_scripts`` when given, else the scripts of the prompt (a prompt without letters
   allows every script). Digits, punctuation, spaces and symbols are script-neutral.
4. ``length``     - more than ``max_tokens`` model tokens ("overthinking").
5. ``repetition`` - the answer loops: its ``repeat_ngram``-gram repeat fraction exceeds ``max_repeat_frac``.
6. ``duplicate``  - among the answers to one prompt that passed 1-5, in input order: an answer whose
   stripped text equals an earlier kept one, and every answer after ``max_per_prompt`` were kept.

The settings are `mispo.config.FiltersConfig` (recipe key `merge.filters`), which validates their ranges.
`apply_filters` returns the kept indices and a `FilterReport` (counts per filter); `check_kept` turns
"nothing survived" into a `FilterError` that names the filter to relax. Pure Python.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from mispo.config import FiltersConfig

FILTERS = ("truncated", "reward", "language", "length", "repetition", "duplicate")

# Name prefixes that are not a script of their own: mapped onto the script they belong to.
_SCRIPT_ALIASES = {"IDEOGRAPHIC": "CJK", "KATAKANA-HIRAGANA": "KATAKANA", "HAN": "CJK"}

_FIXES = {
    "truncated": "raise the domain's rollout.max_new_tokens or set merge.filters.drop_truncated: false",
    "reward": "lower merge.filters.min_reward, or check the expert solves this domain (its eval accuracy)",
    "language": "set merge.filters.allowed_scripts or raise merge.filters.max_foreign_frac",
    "length": "raise merge.filters.max_tokens",
    "repetition": "raise merge.filters.max_repeat_frac or repeat_ngram",
    "duplicate": "raise merge.samples_per_prompt or merge.filters.max_per_prompt",
}
_FIX_FIELDS = {
    "truncated": ("drop_truncated",),
    "reward": ("min_reward",),
    "language": ("allowed_scripts", "max_foreign_frac"),
    "length": ("max_tokens",),
    "repetition": ("max_repeat_frac", "repeat_ngram"),
    "duplicate": ("max_per_prompt",),
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------- scripts


@lru_cache(maxsize=1 << 16)
def script_of(ch: str) -> str | None:
    """Unicode script family of a letter, None for a script-neutral character.

    Rule: the first word of ``unicodedata.name`` (LATIN, CYRILLIC, GREEK, ARABIC, HEBREW, HANGUL,
    HIRAGANA, KATAKANA, THAI, DEVANAGARI, ...), every ``CJK ...`` name mapped to ``CJK``. Refinements:
    compatibility forms are judged by the letter they stand for (NFKC: fullwidth ``Ａ``, mathematical
    ``𝑥``, ``ℝ`` and ligatures are LATIN, ``µ`` is GREEK); ``々`` is CJK and ``ー`` KATAKANA.
    None for non-letters (``str.isalpha()`` False: digits, punctuation, spaces, symbols) and for the
    script-less modifier letters (primes, apostrophes, tone marks); UNKNOWN for an unnamed letter.
    """
    if len(ch) != 1:
        raise ValueError(f"script_of takes one character, got {ch!r}")
    if not ch.isalpha():
        return None
    letter = ch
    for folded in unicodedata.normalize("NFKC", ch):
        if folded.isalpha() and unicodedata.category(folded) != "Lm":
            letter = folded
            break
    name = unicodedata.name(letter, "")
    if not name:
        return "UNKNOWN"
    word = name.split()[0]
    if word.startswith("CJK"):
        return "CJK"
    if word == "MODIFIER":
        return None
    return _SCRIPT_ALIASES.get(word, word)


def _normalise_script(name: str) -> str:
    """Case-insensitive script name: "latin" -> "LATIN", and Unicode's "Han" -> "CJK"."""
    upper = name.strip().upper()
    return "CJK" if upper.startswith("CJK") else _SCRIPT_ALIASES.get(upper, upper)


def scripts_in(text: str) -> Counter[str]:
    """Number of letters of each script in `text` (script-neutral characters are not counted)."""
    counts: Counter[str] = Counter()
    for ch in text:
        script = script_of(ch)
        if script is not None:
            counts[script] += 1
    return counts


def foreign_fraction(text: str, allowed: Iterable[str]) -> float:
    """Share of the text's letters whose script is not in `allowed` (0.0 for a text without letters).

    Script names compare case-insensitively ("latin" == "LATIN").
    """
    allowed_set = {_normalise_script(s) for s in allowed}
    counts = scripts_in(text)
    letters = sum(counts.values())
    if letters == 0:
        return 0.0
    return sum(n for script, n in counts.items() if script not in allowed_set) / letters


# --------------------------------------------------------------------------- repetition


def repeat_fraction(tokens: Sequence, n: int) -> float:
    """Share of repeated n-grams: with m = len(tokens) - n + 1 n-grams, 0.0 if m < 2, else
    1 - len(set(ngrams)) / m.

    In [0, 1): 0 when no n-gram occurs twice; a sequence that loops one phrase of p tokens has p
    distinct n-grams (n <= p), so the fraction is 1 - p/m and tends to 1 as the loop goes on.
    Tokens are any hashables; a tensor or array is read through ``.tolist()``.
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"repeat_fraction needs n >= 1, got {n!r}")
    toks = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
    m = len(toks) - n + 1
    if m < 2:
        return 0.0
    distinct = len(set(zip(*(toks[i:i + m] for i in range(n)))))
    return 1.0 - distinct / m


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One sampled answer to judge."""

    prompt_key: str  # identifies the prompt (answers to one prompt are grouped for "duplicate")
    prompt_text: str  # the prompt as the user wrote it: its scripts are the default allowed scripts
    response_text: str
    response_tokens: Sequence[int]  # the model's own tokens (env/tool tokens excluded by the caller)
    reward: float
    finish_reason: str  # "stop" or "length"


def reject_reason(c: Candidate, cfg: FiltersConfig) -> str | None:
    """The first failing filter among truncated, reward, language, length, repetition, or None.

    "duplicate" depends on the other answers to the prompt and is decided by `apply_filters`.
    language: allowed = cfg.allowed_scripts if given, else the scripts of c.prompt_text (a prompt
    without letters allows every script, i.e. the filter passes); rejected when
    foreign_fraction(response_text, allowed) > max_foreign_frac.
    """
    if cfg.drop_truncated and c.finish_reason == "length":
        return "truncated"
    if not c.reward >= cfg.min_reward:  # written so that a NaN reward is rejected
        return "reward"
    allowed = cfg.allowed_scripts if cfg.allowed_scripts is not None else list(scripts_in(c.prompt_text))
    if allowed and foreign_fraction(c.response_text, allowed) > cfg.max_foreign_frac:
        return "language"
    if cfg.max_tokens is not None and len(c.response_tokens) > cfg.max_tokens:
        return "length"
    if repeat_fraction(c.response_tokens, cfg.repeat_ngram) > cfg.max_repeat_frac:
        return "repetition"
    return None


# --------------------------------------------------------------------------- report


@dataclass
class FilterReport:
    """Counts of one filtering pass: sampled == kept + sum(rejected.values())."""

    sampled: int
    rejected: dict[str, int]  # every name in FILTERS (in that order), 0 when it rejected nothing
    kept: int

    def __post_init__(self):
        unknown = set(self.rejected) - set(FILTERS)
        if unknown:
            raise ValueError(f"FilterReport: unknown filter(s) {sorted(unknown)}; filters are {FILTERS}")
        self.rejected = {name: int(self.rejected.get(name, 0)) for name in FILTERS}
        counts = [self.sampled, self.kept, *self.rejected.values()]
        if any(n < 0 for n in counts) or self.kept + sum(self.rejected.values()) != self.sampled:
            raise ValueError(f"FilterReport: counts must be >= 0 with sampled == kept + rejected, got "
                             f"sampled={self.sampled}, kept={self.kept}, rejected={self.rejected}")

    @property
    def kept_frac(self) -> float:
        """kept / sampled (0.0 when nothing was sampled)."""
        return self.kept / self.sampled if self.sampled else 0.0

    def to_dict(self) -> dict:
        """{"sampled", "kept", "rejected": {filter: count}, "kept_frac"} (JSON-ready)."""
        return {"sampled": self.sampled, "kept": self.kept, "rejected": dict(self.rejected),
                "kept_frac": self.kept_frac}

    def summary(self) -> str:
        """One line: "256 sampled, 31 kept (12%); rejected: reward 200, truncated 25" (nonzero
        rejections, largest first, ties in FILTERS order; "rejected: none" when nothing was)."""
        pct = 100.0 * self.kept_frac
        if 0 < pct < 0.5:
            shown = "<1%"
        elif 99.5 <= pct < 100:
            shown = ">99%"
        else:
            shown = f"{pct:.0f}%"
        nonzero = sorted((name for name in FILTERS if self.rejected[name]),
                         key=lambda name: -self.rejected[name])  # stable: ties keep FILTERS order
        listed = ", ".join(f"{name} {self.rejected[name]}" for name in nonzero) or "none"
        return f"{self.sampled} sampled, {self.kept} kept ({shown}); rejected: {listed}"

    def worst(self) -> tuple[str, int]:
        """The filter that rejected the most and its count (ties: FILTERS order, so ("truncated", 0)
        when nothing was rejected)."""
        name = max(FILTERS, key=lambda f: self.rejected[f])  # max keeps the first of equals
        return name, self.rejected[name]


def apply_filters(cands: Sequence[Candidate], cfg: FiltersConfig) -> tuple[list[int], FilterReport]:
    """Indices of the kept candidates (in input order) and the report.

    Each candidate counts under exactly one filter or as kept (sampled == kept + sum(rejected)).
    Duplicates: among the candidates of one prompt_key that passed the other filters, in input
    order, an answer whose response_text (stripped) equals an earlier kept one is "duplicate", and
    once max_per_prompt answers are kept for that prompt the rest are "duplicate".
    """
    rejected = dict.fromkeys(FILTERS, 0)
    kept: list[int] = []
    kept_texts: dict[str, set[str]] = {}
    for i, c in enumerate(cands):
        reason = reject_reason(c, cfg)
        if reason is None:
            texts = kept_texts.setdefault(c.prompt_key, set())
            text = c.response_text.strip()
            full = cfg.max_per_prompt is not None and len(texts) >= cfg.max_per_prompt
            if text in texts or full:
                reason = "duplicate"
            else:
                texts.add(text)
                kept.append(i)
        if reason is not None:
            rejected[reason] += 1
    return kept, FilterReport(sampled=len(cands), rejected=rejected, kept=len(kept))


# --------------------------------------------------------------------------- nothing kept


class FilterError(ValueError):
    """Raised by `check_kept` when a filter leaves nothing: the message names the domain, the filter
    that rejected the most and all counts."""


def _current(name: str, cfg: FiltersConfig) -> str:
    return ", ".join(f"merge.filters.{field}={getattr(cfg, field)!r}" for field in _FIX_FIELDS[name])


def check_kept(domain: str, report: FilterReport, cfg: FiltersConfig) -> None:
    """Raise FilterError when the domain kept no answer; return None otherwise.

    `domain` is the domain's name ("math", reported as merge.experts.math) or its dotted recipe path
    ("merge.…", reported as given). With kept == 0 the message names the filter that rejected the
    most, every other filter's count, the fix for that filter and its current setting; with
    sampled == 0 it says no answers were sampled.
    """
    where = domain if domain.startswith("merge.") else f"merge.experts.{domain}"
    if report.sampled == 0:
        raise FilterError(f"{where}: no answers were sampled; fix: give the domain prompts")
    if report.kept > 0:
        return
    name, count = report.worst()
    others = ", ".join(f"{f} {report.rejected[f]}" for f in FILTERS if f != name)
    every = ("the 1 sampled answer was rejected" if report.sampled == 1
             else f"every one of the {report.sampled} sampled answers was rejected")
    raise FilterError(f"{where}: {every}; the '{name}' filter rejected {count} ({others}); "
                      f"fix: {_FIXES[name]}; currently {_current(name, cfg)}")
