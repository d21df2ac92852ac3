"""The OpenAI objects of one request's answer, built from its choices: the final JSON body, the
stream's chunks (opening, per delta, usage) and the usage counts."""

from __future__ import annotations

import time

from ..infer.request import TokenLogprob
from .prepare import Prepared, ToolUse
from .protocol import ChoiceStream, Delta
from .tools import ToolCallParser
from .wire import SSE_DONE, sse_event


class Answer:
    """kind "chat" (chat.completion, reasoning split) or "completion" (text_completion)."""

    def __init__(self, rid: str, kind: str, model: str, prompt_tokens: int, include_usage: bool, thinking: bool):
        self.rid, self.kind, self.model = rid, kind, model
        self.prompt_tokens, self.include_usage, self.thinking = prompt_tokens, include_usage, thinking
        self.created = int(time.time())
        self.choices: list[ChoiceStream] = []
        self.echo: list[str] | None = None  # completions: prompt text to put before each choice's text
        self.tools: ToolUse | None = None  # chat with tools: choices parse tool calls
        self.tokens: TokenStrings | None = None  # set when logprobs are asked for
        self._text_at: dict[int, int] = {}  # streamed completions: text_offset reached per choice

    def take(self, prepared: Prepared, tokenizer) -> None:
        """What the answer needs of the prepared request: echo text, tool use, logprobs' token strings."""
        self.echo, self.tools = prepared.echo, prepared.tools
        self.tokens = TokenStrings(tokenizer) if prepared.logprobs is not None else None

    def new_choice(self, monitor, end_think_id: int | None) -> ChoiceStream:
        tools = ToolCallParser(self.tools.parallel) if self.tools is not None else None
        return ChoiceStream(self.thinking, monitor, end_think_id, split=self.chat, tools=tools)

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    # ---- the whole answer -----------------------------------------------------------------------
    def final_body(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            content = c.content
            if c.refusal is not None:
                content = (content + "\n\n" if content else "") + c.refusal.message
            if self.chat:
                message = {"role": "assistant", "content": content}
                if self.thinking or c.reasoning:
                    message["reasoning_content"] = message["reasoning"] = c.reasoning
                if c.refusal is not None:
                    message["refusal"] = c.refusal.message
                if c.tool_calls:
                    message["tool_calls"] = c.tool_calls
                    message["content"] = content or None
                choices.append({"index": i, "message": message, "logprobs": self.chat_logprobs(c.logprobs),
                                "finish_reason": c.finish_reason})
            else:
                text = (self.echo[i] if self.echo else "") + content
                choices.append({"index": i, "text": text, "logprobs": self.completion_logprobs(c.logprobs),
                                "finish_reason": c.finish_reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        if self.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": sum(c.reasoning_tokens for c in self.choices)}
        return usage

    # ---- stream events --------------------------------------------------------------------------
    def _chunk_object(self, choices: list[dict]) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, index: int, delta: dict | None, finish_reason: str | None = None, text: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": self.chat_logprobs(logprobs),
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": self.completion_logprobs(logprobs, index),
                      "finish_reason": finish_reason}
        return sse_event(self._chunk_object([choice]))

    def opening(self, index: int) -> list[str]:
        """A chat choice starts with the assistant role; an echoed completion with its prompt."""
        if self.chat:
            return [self.chunk(index, {"role": "assistant", "content": ""})]
        return [self.chunk(index, None, text=self.echo[index])] if self.echo else []

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        """The chunks of one delta: reasoning, content, tool calls, finish. Its tokens' logprobs ride on
        its first chunk (on a chunk of their own, with an empty delta, when the delta has no text yet)."""
        logprobs = d.logprobs if d.logprobs and self.tokens is not None else None
        out = []
        if self.chat:
            deltas = []
            if d.reasoning:
                deltas.append({"reasoning_content": d.reasoning, "reasoning": d.reasoning})
            content = d.content
            if d.refusal is not None:
                content += ("\n\n" if self.choices[index].content else "") + d.refusal.message
            if content:
                deltas.append({"content": content})
            if d.tool_calls:
                first = len(self.choices[index].tool_calls) - len(d.tool_calls)
                deltas.append({"tool_calls": [{"index": first + k, **call} for k, call in enumerate(d.tool_calls)]})
            if logprobs and not deltas:
                deltas.append({})
            for k, delta in enumerate(deltas):
                out.append(self.chunk(index, delta, logprobs=logprobs if k == 0 else None))
            if d.finished:
                out.append(self.chunk(index, {}, d.finish_reason))
        else:
            text = d.content + (d.refusal.message if d.refusal is not None else "")
            if text or d.finished or logprobs:
                out.append(self.chunk(index, None, d.finish_reason if d.finished else None, text, logprobs))
        return out

    # ---- logprobs -------------------------------------------------------------------------------
    def chat_logprobs(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        """OpenAI chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal"}."""
        if self.tokens is None or logprobs is None:
            return None
        entry = self.tokens.entry
        return {"content": [dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                            for lp in logprobs], "refusal": None}

    def completion_logprobs(self, logprobs: list[TokenLogprob] | None, stream_index: int | None = None) -> dict | None:
        """Legacy completions shape: {tokens, token_logprobs, top_logprobs (one dict per token),
        text_offset (each token's start in the choice's text, counted in token strings; a stream's
        chunks go on counting from the previous chunk of their choice)}."""
        if self.tokens is None or logprobs is None:
            return None
        strings = [self.tokens.text(lp.token) for lp in logprobs]
        at = self._text_at.get(stream_index, 0) if stream_index is not None else 0
        offsets = []
        for piece in strings:
            offsets.append(at)
            at += len(piece)
        if stream_index is not None:
            self._text_at[stream_index] = at
        return {"tokens": strings, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self.tokens.text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def closing(self) -> list[str]:
        """The usage chunk when asked for, then [DONE]."""
        if not self.include_usage:
            return [SSE_DONE]
        return [sse_event({**self._chunk_object([]), "usage": self.usage()}, ascii_only=True), SSE_DONE]


class TokenStrings:
    """A token id's text and bytes for logprobs: `bytes` are the token's own (part of a UTF-8
    character, possibly); `token` is their UTF-8 decoding (U+FFFD for an incomplete character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")

    def entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}
