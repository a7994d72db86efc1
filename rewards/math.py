"""Math reward: is the completion's answer equivalent to the row's ``answer``?

``score(prompt, completion, answer, **row) -> {"score": 1.0 | 0.0, "has_answer": 0 | 1, "timeout": 0 | 1}``

- The prediction is found as math-verify's usual extraction does, in this order: the content of the
  *last* ``\\boxed{...}`` (or ``\\fbox{...}``); else the usual answer phrases ("the final answer is
  42", "Answer: 42", LaTeX after them); else the last plain LaTeX / number / expression of the text.
  Nothing found: score 0, ``has_answer`` 0.
- ``scorer(boxed_only=True)`` is the strict variant for recipes that teach the format: only the last
  box counts, any other answer scores 0 (recipe: ``{fn: rewards.math:scorer, args: {boxed_only: true}}``).
- The gold ``answer`` may be a number (``12``), plain text (``"3/4"``, ``"0.5"``), LaTeX
  (``"\\frac{1}{2}"``, ``"(1, 2]"``, ``"\\{1, 2\\}"``, ``"x = 3"``), with or without ``$``/``\\boxed``, or a
  GSM8K-style worked solution ending in ``#### 72`` (the text after the last ``####`` is the gold).
- Equivalence is decided by math-verify (sympy): numbers, fractions, intervals, sets, equations.
- Each parse / comparison is limited to ``timeout_s`` seconds (row field, default 5); a timed-out
  comparison scores 0 with ``timeout`` 1. math-verify's timeout is a SIGALRM, usable only in a
  main thread, so calls from other threads (the reward runner's pool) go to worker processes
  (mispo.sandbox.workers), which are killed and replaced if they ever stop answering.
"""

from __future__ import annotations

import threading

from mispo.sandbox import workers

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``."""
    text = text or ""
    best = -1
    for cmd in _BOX_COMMANDS:
        best = max(best, text.rfind(cmd))
    if best < 0:
        return None
    i = best + (5 if text.startswith("\\fbox", best) else 6)
    if text.startswith(" ", i) and not text[i:].lstrip().startswith("{"):
        token = text[i:].split(None, 1)[0].rstrip("$.,")  # "\boxed 5"
        return token or None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, start = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[start:j].strip()
                return content or None
    return None  # unclosed box: no answer


def _configs(boxes: bool):
    """math-verify's extraction targets; boxes=False leaves boxes out (they were looked for already)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0 if boxes else -1), ExprExtractionConfig()]


def _parse(latex: str, timeout: int):
    from math_verify import parse

    return parse(latex, extraction_config=_configs(True), parsing_timeout=timeout)


def parse_gold(answer, timeout: int = 5):
    """Parse a gold answer given as a number, plain text, LaTeX or a GSM8K solution ("... #### 72");
    raise ValueError if impossible."""
    text = str(answer).strip()
    if "####" in text:
        text = text.rpartition("####")[2].strip()
    candidates = [text] if ("\\boxed" in text or "$" in text) else ["\\boxed{" + text + "}", text]
    for cand in candidates:
        parsed = _parse(cand, timeout)
        if parsed:
            return parsed
    raise ValueError(f"cannot parse the gold answer {str(answer)!r}; fix the row's 'answer' field")


def extract_prediction(completion: str, timeout: int | None = 5, boxed_only: bool = False) -> list:
    """The completion's parsed answer (math-verify objects; [] = no answer), in the order of the module
    docstring: the last box, else (unless ``boxed_only``) answer phrases, else the last expression."""
    from math_verify import parse

    box = last_boxed(completion)
    if box is not None:
        return _parse("\\boxed{" + box + "}", timeout)
    if boxed_only:
        return []
    return parse(completion or "", extraction_config=_configs(False), fallback_mode="no_fallback",
                 parsing_timeout=timeout)


def verify_local(gold, completion: str, timeout: int = 5, boxed_only: bool = False) -> list[bool]:
    """``[has_answer, equal]`` computed in this thread (signal-based timeouts: main thread only, else
    pass timeout=0)."""
    from math_verify import verify

    t = timeout if timeout > 0 else None
    box = last_boxed(completion)
    if box is not None and str(gold).strip() == box:
        return [True, True]
    pred = extract_prediction(completion, t, boxed_only)
    if not pred:
        return [False, False]
    return [True, bool(verify(parse_gold(gold, t), pred, timeout_seconds=t))]


def check(gold, completion: str, timeout: int = 5, boxed_only: bool = False) -> tuple[bool, bool, bool]:
    """``(has_answer, equal, timed_out)`` of a completion against a gold answer."""
    if threading.current_thread() is threading.main_thread():
        from math_verify.errors import TimeoutException

        try:
            has, ok = verify_local(gold, completion, timeout, boxed_only)
            return has, ok, False
        except TimeoutException:
            return True, False, True
    try:  # math-verify arms its own alarms in the worker; the deadline is the backstop
        has, ok = workers.call("rewards.math:verify_local", str(gold), completion, timeout, boxed_only,
                               deadline_s=4.0 * timeout + 5.0)
        return bool(has), bool(ok), False
    except workers.WorkerTimeout:
        return True, False, True
    except workers.WorkerError as exc:
        raise ValueError(str(exc)) from None


def equivalent(gold, pred: str, timeout: int = 5) -> tuple[bool, bool]:
    """``(equal, timed_out)`` for a gold answer and a predicted answer (an expression, e.g. box content)."""
    _, ok, timed_out = check(gold, "\\boxed{" + pred + "}", timeout, boxed_only=True)
    return ok, timed_out


def score(prompt: str = "", completion: str = "", answer=None, *, boxed_only: bool = False, **row) -> dict:
    """1.0 if the completion's answer equals ``answer`` (see module docstring), else 0.0."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("math reward needs the row field 'answer' (the gold answer); "
                         "fix the dataset or the recipe's field mapping")
    has, ok, timed_out = check(answer, completion or "", int(row.get("timeout_s", 5)), boxed_only)
    return {"score": float(ok), "has_answer": int(has), "timeout": int(timed_out)}


def scorer(boxed_only: bool = False):
    """``score`` with options, for a recipe's ``reward.plugins`` entry
    ``{fn: rewards.math:scorer, args: {boxed_only: true}}`` (the plugin factory form)."""
    if not isinstance(boxed_only, bool):
        raise ValueError(f"rewards.math:scorer: boxed_only must be true or false, got {boxed_only!r}")

    def math_score(prompt: str = "", completion: str = "", answer=None, **row) -> dict:
        return score(prompt, completion, answer, boxed_only=boxed_only, **row)

    return math_score
