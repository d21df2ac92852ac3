"""Request bodies of the OpenAI / DeepSeek API as pydantic models (they make the server's OpenAPI
schema), and the per-choice output pipeline shared by the server and the terminal chat.

Known fields are type-checked and range-checked. Every other field is kept (extra="allow") so that
prepare.py can refuse it by name: a field the server does not honour is a 400, never silently
ignored (a null value is accepted, as clients send many optional fields as null). logprobs,
response_format and tools / tool_choice are honoured (prepare.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..infer.engine import RequestOutput
from ..infer.request import TokenLogprob
from ..infer.text import ReasoningSplitter
from .policy import Decision, OutputMonitor
from .tools import ToolCallParser

Float = Field(default=None, allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    HONOURED: ClassVar[tuple] = ("name",)  # (prepare.UNSUPPORTED refuses a user's "name")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn (as the API returned it)."""
    model_config = ConfigDict(extra="allow")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    reasoning_content: Optional[str] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # assistant
    tool_call_id: Optional[str] = None  # tool

    @property
    def HONOURED(self) -> tuple:
        """A tool result's `name` (its function's, as older clients send it) is accepted; it says nothing
        the template needs. Other messages' `name` (a participant's) is refused."""
        return ("name",) if self.role == "tool" else ()

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    top_k: Optional[int] = Field(default=None, ge=-1)
    n: int = Field(default=1, ge=1)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)

    @property
    def include_usage(self) -> bool:
        """A stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    HONOURED: ClassVar[tuple] = ("name",)  # (prepare.UNSUPPORTED refuses a user's "name")
    name: str = Field(default="response", max_length=64)
    description: Optional[str] = None
    schema_: Optional[dict] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    HONOURED: ClassVar[tuple] = ("name",)  # (prepare.UNSUPPORTED refuses a user's "name")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    HONOURED: ClassVar[tuple] = ("name",)  # (prepare.UNSUPPORTED refuses a user's "name")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""
    HONOURED: ClassVar[tuple] = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                                 "parallel_tool_calls")
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None  # 0..20, checked in prepare (400)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions: prompt is a string, a list of strings, token ids or lists of token ids."""
    HONOURED: ClassVar[tuple] = ("logprobs",)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = None  # 0..20 alternatives per token, checked in prepare (400)


# ---- one choice's output pipeline ------------------------------------------------------------------
@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    refusal: Decision | None = None
    flags: list = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)  # calls completed in this delta
    logprobs: list[TokenLogprob] | None = None  # of this delta's tokens (when asked for)

    def audit(self, policy, **context) -> None:
        """Record the flags and the refusal this output raised in `policy`'s audit log."""
        for decision in self.flags + ([self.refusal] if self.refusal is not None else []):
            policy.audit(decision, **context)


class ChoiceStream:
    """Engine outputs of one choice -> policy check (stops at a refusal) -> reasoning split.

    split=False (plain completions) puts all text in `content`. With `tools`, tool calls are parsed out
    of the answer (finish_reason "tool_calls" when there are any). Collects logprobs. Counts completion tokens and, for
    reasoning models, the tokens up to and including `</think>` (or all of them while still thinking).
    """

    def __init__(self, thinking: bool, monitor: OutputMonitor | None = None, end_think_id: int | None = None,
                 split: bool = True, tools: ToolCallParser | None = None):
        self.splitter = ReasoningSplitter(thinking) if split else None
        self.tools = tools
        self.tool_calls: list[dict] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.monitor = monitor
        self.end_think_id = end_think_id
        self.completion_tokens = 0
        self.reasoning_tokens = 0
        self.think_closed = not thinking
        self.reasoning = ""
        self.content = ""
        self.finish_reason: str | None = None
        self.refusal: Decision | None = None
        self._flags_seen = 0

    def feed(self, out: RequestOutput) -> Delta:
        self._count(out.token_ids)
        self.completion_tokens = out.completion_tokens
        delta = Delta(logprobs=out.logprobs)
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + out.logprobs
        text = out.text
        if self.monitor is not None:
            text, refusal = self.monitor.push(text, final=out.finished)
            delta.flags = self.monitor.new_flags(self._flags_seen)
            self._flags_seen = len(self.monitor.flags)
            if refusal is not None:
                delta.refusal = self.refusal = refusal
        if self.splitter is None:
            delta.content = text
        else:
            delta.reasoning, delta.content = self.splitter.push(text)
            if out.finished or delta.refusal is not None:
                r, c = self.splitter.flush()
                delta.reasoning += r
                delta.content += c
        if self.tools is not None:
            delta.content, delta.tool_calls = self.tools.push(delta.content)
            if out.finished or delta.refusal is not None:
                delta.content += self.tools.flush()[0]
            self.tool_calls += delta.tool_calls
        if delta.refusal is not None:
            delta.finished, delta.finish_reason = True, "content_filter"
        elif out.finished:
            delta.finished = True
            delta.finish_reason = "length" if out.finish_reason == "length" else \
                ("tool_calls" if self.tool_calls else "stop") if out.finish_reason == "stop" else out.finish_reason
        self.reasoning += delta.reasoning
        self.content += delta.content
        if delta.finished:
            self.finish_reason = delta.finish_reason
        return delta

    def _count(self, token_ids: list[int]):
        for t in token_ids:
            if not self.think_closed:
                self.reasoning_tokens += 1
                if self.end_think_id is not None and t == self.end_think_id:
                    self.think_closed = True
        if self.end_think_id is None and self.splitter is not None and not self.splitter.in_reasoning:
            self.think_closed = True
