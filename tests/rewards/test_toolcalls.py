"""Lenient XML tool-call parsing: many shapes accepted, malformed calls reported, never raised."""

import pytest

from rewards.toolcalls import MalformedCall, ToolCall, parse_tool_calls


@pytest.mark.parametrize("text, name, args", [
    ("<tool_call><name>calc</name><arguments>2+3</arguments></tool_call>", "calc", {"input": "2+3"}),
    ("<tool_call>\n  <name> calc </name>\n  <arguments>\n {\"expression\": \"2+3\"} \n</arguments>\n"
     "</tool_call>", "calc", {"expression": "2+3"}),
    ("<TOOL_CALL><Name>calc</Name><Arguments><expression>1 < 2</expression></Arguments></TOOL_CALL>",
     "calc", {"expression": "1 < 2"}),
    ('<tool_call name="calc"><expression>2*3</expression></tool_call>', "calc", {"expression": "2*3"}),
    ("<tool_call name='python'>print(1)</tool_call>", "python", {"input": "print(1)"}),
    ("<tool_call><function=calc><parameter=expression>4/2</parameter></function></tool_call>",
     "calc", {"expression": "4/2"}),
    ("<tool_call><function=python><parameter=code>\nx = 1\nprint(x)\n</parameter></function>"
     "</tool_call>", "python", {"code": "x = 1\nprint(x)"}),
    ('<tool_call>{"name": "calc", "arguments": {"expression": "9"}}</tool_call>', "calc",
     {"expression": "9"}),
    ("<tool_call><name>calc</name><arguments>7*6", "calc", {"input": "7*6"}),   # cut off
    ("<tool_call><name>calc</name><arguments><expression>7*6</expression>", "calc",
     {"expression": "7*6"}),
    ("<tool_call><name>noargs</name></tool_call>", "noargs", {}),
])
def test_accepted_shapes(text, name, args):
    calls = parse_tool_calls("Let me compute.\n" + text)
    assert len(calls) == 1 and isinstance(calls[0], ToolCall)
    assert calls[0].name == name and calls[0].arguments == args


def test_several_calls_in_order():
    text = ("<tool_call><name>a</name><arguments>1</arguments></tool_call> then "
            "<tool_call><name>b</name><arguments>2</arguments></tool_call>")
    assert [c.name for c in parse_tool_calls(text)] == ["a", "b"]


def test_open_tag_without_close_before_next_call():
    text = "<tool_call><name>a</name><arguments>1</arguments>\n<tool_call><name>b</name></tool_call>"
    calls = parse_tool_calls(text)
    assert [c.name for c in calls] == ["a", "b"] and calls[0].arguments == {"input": "1"}


@pytest.mark.parametrize("text, needle", [
    ("<tool_call><arguments>2+3</arguments></tool_call>", "without a tool name"),
    ("<tool_call>just some text</tool_call>", "without a tool name"),
    ("<tool_call><name>rm -rf /</name></tool_call>", "invalid tool name"),
    ('<tool_call>{"name": "calc", "arguments": [1, 2]}</tool_call>', "must be an object"),
])
def test_malformed(text, needle):
    calls = parse_tool_calls(text)
    assert len(calls) == 1 and isinstance(calls[0], MalformedCall) and needle in calls[0].error


def test_no_calls():
    assert parse_tool_calls("The answer is <answer>5</answer>") == []
    assert parse_tool_calls("") == [] and parse_tool_calls(None) == []
