"""Tool-use environment: the model calls tools in XML until it gives a final answer.

Row fields: ``question`` (or ``prompt``) and ``answer``; other fields go to the reward.
Each model turn with tool calls gets one ``<tool_response>`` per call (errors for malformed calls
or unknown tools, never an exception); a turn without tool calls ends the episode, scored by
rewards.tool on that final turn, with the environment's count of bad calls over all turns.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from mispo.rollout.environment import StepResult
from environments.tools import Tool, default_tools
from rewards import tool as tool_reward
from rewards.toolcalls import MalformedCall, parse_tool_calls

INSTRUCTIONS = (
    "You can call tools. To call one, write\n"
    "<tool_call><name>TOOL</name><arguments><ARG>value</ARG></arguments></tool_call>\n"
    "and wait for the <tool_response>. When you are done, give the final answer as "
    "<answer>...</answer> without any tool call.\nTools:\n{tools}\n\n{question}")


class ToolEnv:
    """See the module docstring. ``tools``: name -> Tool (default: calc and python)."""

    def __init__(self, tools: Mapping[str, Tool] | None = None, max_calls_per_turn: int = 4,
                 question_key: str = "question", instructions: str = INSTRUCTIONS):
        self.tools = dict(tools) if tools is not None else default_tools()
        self.max_calls_per_turn = max_calls_per_turn
        self.question_key = question_key
        self.instructions = instructions

    def reset(self, row: Mapping[str, Any]) -> str:
        question = row.get(self.question_key, row.get("prompt"))
        if question is None:
            raise ValueError(f"tool environment needs the row field '{self.question_key}' or "
                             f"'prompt'; this row has: {', '.join(sorted(row))}")
        self.row = dict(row)
        self.question = str(question)
        self.turns: list[str] = []
        self.malformed = 0
        self.calls = 0
        tools = "\n".join(f"- {t.name}: {t.description}" for t in self.tools.values())
        return self.instructions.format(tools=tools, question=self.question)

    def _run(self, call) -> str:
        if isinstance(call, MalformedCall):
            self.malformed += 1
            return f"<tool_response>\nerror: {call.error}\n</tool_response>"
        tool = self.tools.get(call.name)
        if tool is None:
            self.malformed += 1
            return (f"<tool_response>\nerror: unknown tool {call.name!r}; available: "
                    f"{', '.join(self.tools)}\n</tool_response>")
        self.calls += 1
        try:
            result = tool(call.arguments)
        except Exception as exc:  # a tool bug must not end the episode
            result = f"error: the tool failed ({type(exc).__name__}: {exc})"
        return f'<tool_response name="{call.name}">\n{result}\n</tool_response>'

    def step(self, text: str, token_ids: Sequence[int] = ()) -> StepResult:
        self.turns.append(text)
        calls = parse_tool_calls(text)
        if not calls:
            row = {k: v for k, v in self.row.items() if k not in ("prompt", "completion")}
            row["malformed_tool_calls"] = self.malformed
            # The final turn holds the answer; earlier turns' calls are counted by this env.
            result = tool_reward.score(prompt=self.question, completion=text, **row)
            result["tool_calls"] = self.calls
            return StepResult.finish(result.pop("score"), **result)
        outputs = [self._run(c) for c in calls[: self.max_calls_per_turn]]
        if len(calls) > self.max_calls_per_turn:
            outputs.append(f"<tool_response>\nerror: at most {self.max_calls_per_turn} tool calls "
                           "per turn; the rest were ignored\n</tool_response>")
        return StepResult(observation="\n".join(outputs),
                          info={"tool_calls": self.calls, "malformed_tool_calls": self.malformed})


COMPACT_INSTRUCTIONS = "Use the calc tool, then give <answer>N</answer>.\n{question}"


class CalculatorEnv(ToolEnv):
    """ToolEnv with the calculator only and a one-line instruction: short prompts for tiny models
    (the tiny CPU recipes), where ToolEnv's full tool list would be most of every sequence."""

    def __init__(self, **kwargs):
        from environments.tools import Calculator

        kwargs.setdefault("tools", {"calc": Calculator()})
        kwargs.setdefault("instructions", COMPACT_INSTRUCTIONS)
        super().__init__(**kwargs)

