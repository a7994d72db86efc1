"""Find XML tool calls in a model turn, leniently.

Accepted shapes (tags case-insensitive, any whitespace, closing tags optional at the end of
the turn)::

    <tool_call><name>calc</name><arguments>2+3</arguments></tool_call>
    <tool_call><name>calc</name><arguments>{"expression": "2+3"}</arguments></tool_call>
    <tool_call><name>calc</name><arguments><expression>2+3</expression></arguments></tool_call>
    <tool_call name="calc"><expression>2+3</expression></tool_call>
    <tool_call><function=calc><parameter=expression>2+3</parameter></function></tool_call>
    <tool_call>{"name": "calc", "arguments": {"expression": "2+3"}}</tool_call>

Arguments become a dict of strings (JSON values are kept as parsed); raw text with no structure
becomes ``{"input": text}``. A call that cannot be understood becomes a :class:`MalformedCall`
with a message meant to be shown to the model, never an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_OPEN = re.compile(r"<\s*tool_call\b([^>]*)>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*tool_call\s*>", re.IGNORECASE)
_ATTR = re.compile(r"""(\w+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
_NAME = re.compile(r"<\s*name\s*>(.*?)(?:<\s*/\s*name\s*>|$)", re.IGNORECASE | re.DOTALL)
_FUNC = re.compile(r"<\s*function\s*(?:=\s*|\s+name\s*=\s*)[\"']?([\w.\-]+)[\"']?\s*>", re.IGNORECASE)
_ARGS = re.compile(r"<\s*arguments\s*>(.*?)(?:<\s*/\s*arguments\s*>|$)", re.IGNORECASE | re.DOTALL)
_PARAM = re.compile(r"<\s*parameter\s*(?:=\s*|\s+name\s*=\s*)[\"']?([\w.\-]+)[\"']?\s*>(.*?)"
                    r"(?=<\s*/\s*parameter\s*>|<\s*parameter\b|<\s*/\s*function\s*>|$)",
                    re.IGNORECASE | re.DOTALL)
_CHILD = re.compile(r"<\s*([A-Za-z_][\w\-]*)\s*>(.*?)<\s*/\s*\1\s*>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    raw: str = ""


@dataclass
class MalformedCall:
    raw: str
    error: str


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _arguments(text: str) -> dict[str, Any]:
    text = text.strip()
    if not text:
        return {}
    as_json = _json_object(text)
    if as_json is not None:
        return as_json
    children = {k: v.strip() for k, v in _CHILD.findall(text)}
    if children:
        return children
    return {"input": text}


def _one(body: str, attrs: str, raw: str) -> ToolCall | MalformedCall:
    attr = {m.group(1).lower(): next(g for g in m.groups()[1:] if g is not None)
            for m in _ATTR.finditer(attrs)}
    params = [(k, v.strip()) for k, v in _PARAM.findall(body)]
    name = attr.get("name")
    if name is None and (m := _FUNC.search(body)):
        name = m.group(1)
    if name is None and (m := _NAME.search(body)):
        name = m.group(1).strip()
        body = body[:m.start()] + body[m.end():]
    if name is None:
        obj = _json_object(body.strip())
        if obj is not None and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = _json_object(args) or {"input": args}
            if not isinstance(args, dict):
                return MalformedCall(raw, "tool call arguments must be an object")
            return ToolCall(obj["name"].strip(), args, raw)
        return MalformedCall(raw, "tool call without a tool name; write "
                                  "<tool_call><name>TOOL</name><arguments>...</arguments></tool_call>")
    name = name.strip()
    if not re.fullmatch(r"[\w.\-]+", name):
        return MalformedCall(raw, f"invalid tool name {name[:50]!r}")
    if params:
        return ToolCall(name, dict(params), raw)
    if m := _ARGS.search(body):
        return ToolCall(name, _arguments(m.group(1)), raw)
    rest = _FUNC.sub("", body)
    rest = re.sub(r"<\s*/\s*function\s*>", "", rest, flags=re.IGNORECASE)
    return ToolCall(name, _arguments(rest), raw)


def parse_tool_calls(text: str) -> list[ToolCall | MalformedCall]:
    """Every tool call in ``text``, in order (well-formed or not)."""
    calls: list[ToolCall | MalformedCall] = []
    opens = list(_OPEN.finditer(text or ""))
    for i, m in enumerate(opens):
        limit = opens[i + 1].start() if i + 1 < len(opens) else len(text)
        close = _CLOSE.search(text, m.end(), limit)
        end = close.start() if close else limit
        raw = text[m.start(): close.end() if close else limit]
        calls.append(_one(text[m.end(): end], m.group(1), raw))
    return calls


def has_tool_call(text: str) -> bool:
    return bool(_OPEN.search(text or ""))
