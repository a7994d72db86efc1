"""Math reward: is the completion's last ``\\boxed{}`` answer equivalent to the row's ``answer``?

``score(prompt, completion, answer, **row) -> {"score": 1.0 | 0.0, "has_answer": 0 | 1, "timeout": 0 | 1}``

- The prediction is the content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``); no box means
  score 0 (``has_answer`` 0).
- The gold ``answer`` may be a number (``12``), plain text (``"3/4"``, ``"0.5"``) or LaTeX
  (``"\\frac{1}{2}"``, ``"(1, 2]"``, ``"\\{1, 2\\}"``, ``"x = 3"``), with or without ``$``/``\\boxed``.
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


def _parse(latex: str, timeout: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    cfg = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(latex, extraction_config=cfg, parsing_timeout=timeout)


def parse_gold(answer, timeout: int = 5):
    """Parse a gold answer given as a number, plain text or LaTeX; raise ValueError if impossible."""
    text = str(answer).strip()
    candidates = [text] if ("\\boxed" in text or "$" in text) else ["\\boxed{" + text + "}", text]
    for cand in candidates:
        parsed = _parse(cand, timeout)
        if parsed:
            return parsed
    raise ValueError(f"cannot parse the gold answer {text!r}; fix the row's 'answer' field")


def verify_local(gold, pred: str, timeout: int = 5) -> bool:
    """Compare in this thread (signal-based timeouts: main thread only, else pass timeout=0)."""
    from math_verify import verify

    if str(gold).strip() == pred.strip():
        return True
    t = timeout if timeout > 0 else None
    gold_parsed = parse_gold(gold, t)
    pred_parsed = _parse("\\boxed{" + pred + "}", t)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def equivalent(gold, pred: str, timeout: int = 5) -> tuple[bool, bool]:
    """``(equal, timed_out)`` for a gold answer and a predicted answer (box content)."""
    if threading.current_thread() is threading.main_thread():
        from math_verify.errors import TimeoutException

        try:
            return verify_local(gold, pred, timeout), False
        except TimeoutException:
            return False, True
    try:  # math-verify arms its own alarms in the worker; the deadline is the backstop
        return bool(workers.call("rewards.math:verify_local", str(gold), pred, timeout,
                                 deadline_s=4.0 * timeout + 5.0)), False
    except workers.WorkerTimeout:
        return False, True
    except workers.WorkerError as exc:
        raise ValueError(str(exc)) from None


def score(prompt: str = "", completion: str = "", answer=None, **row) -> dict:
    """1.0 if the last boxed answer equals ``answer`` (see module docstring), else 0.0."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("math reward needs the row field 'answer' (the gold answer); "
                         "fix the dataset or the recipe's field mapping")
    pred = last_boxed(completion)
    if pred is None:
        return {"score": 0.0, "has_answer": 0, "timeout": 0}
    ok, timed_out = equivalent(answer, pred, int(row.get("timeout_s", 5)))
    return {"score": float(ok), "has_answer": 1, "timeout": int(timed_out)}
