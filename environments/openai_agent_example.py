"""An agent written against the OpenAI API only, trained as it is (`rollout.environment_kind: openai_agent`).

    rollout:
      environment: environments/openai_agent_example.py:agent
      environment_kind: openai_agent

`agent(base_url, model, prompt, row)` is a plain tool-using loop with the `openai` client: the model's
text is parsed for `<calc>expression</calc>` (the calculator's result goes back as a tool message) or
`<answer>N</answer>` (the episode's reward: 1.0 when N is the row's answer); a reply with neither gets a
user message asking for one. Nothing here knows about mispo: the run's endpoint records the tokens.
"""

from __future__ import annotations

import re

from environments.calculator import calculate

SYSTEM = "Compute with <calc>expression</calc>; finish with <answer>N</answer>."
CALC = re.compile(r"<calc>(.*?)</calc>", re.S)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
NUDGE = "Call <calc>...</calc> or give <answer>N</answer>."


def agent(base_url: str, model: str, prompt: str, row: dict, max_rounds: int = 3) -> float:
    """Up to `max_rounds` model calls; 1.0 for the row's answer, else 0.0."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)  # a 400 (budget spent) ends the loop
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": str(prompt)}]
    for _ in range(max_rounds):
        reply = client.chat.completions.create(model=model, messages=messages).choices[0].message.content or ""
        messages.append({"role": "assistant", "content": reply})
        if answer := ANSWER.search(reply):
            return float(answer.group(1).strip() == str(row.get("answer", "")).strip())
        if call := CALC.search(reply):
            messages.append({"role": "tool", "content": calculate(call.group(1))})
        else:
            messages.append({"role": "user", "content": NUDGE})
    return 0.0
