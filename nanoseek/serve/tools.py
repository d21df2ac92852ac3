"""Tool calls in DeepSeek-V3's format: parsing them out of a streamed answer, and the grammar that
makes the model call one (tool_choice "required" or a named function).

A call is `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGUMENTS\\n```<｜tool▁call▁end｜>`;
an answer's calls sit between `<｜tool▁calls▁begin｜>` and `<｜tool▁calls▁end｜>` (newline-separated),
after any text. nanoseek's tokenizers have no ids for these markers: they are matched as text.
"""

from __future__ import annotations

import json
import re
import uuid

from ..infer.grammar import LEADING_SPACE, json_rule
from ..infer.text import _partial_suffix
from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(?P<type>[^\n]*?)" + re.escape(TOOL_SEP) +
                  r"(?P<name>[^\n]*)\n```(?:json)?\n(?P<arguments>.*?)\n?```\s*" + re.escape(TOOL_CALL_END), re.S)


def new_call(name: str, arguments: str) -> dict:
    """An OpenAI tool call object (arguments: the JSON text as the model wrote it)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolCallParser:
    """Answer text (as it streams) -> (plain content, tool calls completed so far). Text that may start
    the calls block is held back; a block that never completes is returned as content at `flush`, so
    nothing the model wrote is lost. parallel=False keeps the first call only."""

    def __init__(self, parallel: bool = True):
        self.parallel = parallel
        self.buffer = ""
        self.in_calls = False
        self.calls: list[dict] = []
        self.raw = ""  # the calls block so far (given back as content if it never completes)

    def push(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        content, calls = "", []
        while True:
            if not self.in_calls:
                start = self.buffer.find(TOOL_CALLS_BEGIN)
                if start < 0:
                    keep = _partial_suffix(self.buffer, TOOL_CALLS_BEGIN)
                    cut = len(self.buffer) - keep
                    content += self.buffer[:cut]
                    self.buffer = self.buffer[cut:]
                    return content, calls
                content += self.buffer[:start]
                self.raw = TOOL_CALLS_BEGIN
                self.buffer = self.buffer[start + len(TOOL_CALLS_BEGIN):]
                self.in_calls = True
            body = self.buffer.lstrip()
            if body.startswith(TOOL_CALLS_END):
                self.buffer, self.in_calls, self.raw = body[len(TOOL_CALLS_END):].lstrip(), False, ""
                continue
            match = CALL.match(body)
            if match is None:
                return content, calls
            self.raw += self.buffer[: len(self.buffer) - len(body) + match.end()]
            self.buffer = body[match.end():]
            if self.parallel or not self.calls:
                call = new_call(match["name"].strip(), match["arguments"].strip())
                self.calls.append(call)
                calls.append(call)

    def flush(self) -> tuple[str, list[dict]]:
        """End of the answer: an unfinished calls block (or a held-back prefix) becomes content."""
        rest = (self.raw + self.buffer) if self.in_calls else self.buffer
        self.buffer, self.raw, self.in_calls = "", "", False
        return rest, []


def tool_call_lark(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar for an answer made of tool calls only: of the function `name` (once), or of any
    offered function (one or more when parallel). Arguments follow each function's parameters schema."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules, alternatives = [], []
    for i, f in enumerate(functions):
        schema = f.get("parameters") or {"type": "object"}
        rules.append(f"fn{i}: {_lit(f['name'] + chr(10) + '```json' + chr(10))} args{i} {_lit(chr(10) + '```' + TOOL_CALL_END)}")
        rules.append(f"args{i}: {json_rule(schema)}")
        alternatives.append(f"fn{i}")
    repeat = f" ({_lit(chr(10))} call)*" if parallel and name is None else ""
    head = [f"start: {LEADING_SPACE} {_lit(TOOL_CALLS_BEGIN)} call{repeat} {_lit(TOOL_CALLS_END)}",
            f"call: {_lit(TOOL_CALL_BEGIN + 'function' + TOOL_SEP)} ({' | '.join(alternatives)})"]
    return "\n".join(head + rules)


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)
