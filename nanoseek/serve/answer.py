"""The OpenAI objects of one request's answer, built from its choices: the final JSON body, the
stream's chunks (opening, per delta, usage) and the usage counts."""

from __future__ import annotations

import time

from .protocol import ChoiceStream, Delta
from .wire import SSE_DONE, sse_event


class Answer:
    """kind "chat" (chat.completion, reasoning split) or "completion" (text_completion)."""

    def __init__(self, rid: str, kind: str, model: str, prompt_tokens: int, include_usage: bool, thinking: bool):
        self.rid, self.kind, self.model = rid, kind, model
        self.prompt_tokens, self.include_usage, self.thinking = prompt_tokens, include_usage, thinking
        self.created = int(time.time())
        self.choices: list[ChoiceStream] = []
        self.echo: list[str] | None = None  # completions: prompt text to put before each choice's text

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
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": c.finish_reason})
            else:
                text = (self.echo[i] if self.echo else "") + content
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": c.finish_reason})
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

    def chunk(self, index: int, delta: dict | None, finish_reason: str | None = None, text: str | None = None) -> str:
        if self.chat:
            choice = {"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return sse_event(self._chunk_object([choice]))

    def opening(self, index: int) -> list[str]:
        """A chat choice starts with the assistant role; an echoed completion with its prompt."""
        if self.chat:
            return [self.chunk(index, {"role": "assistant", "content": ""})]
        return [self.chunk(index, None, text=self.echo[index])] if self.echo else []

    def delta_chunks(self, index: int, d: Delta) -> list[str]:
        out = []
        if self.chat:
            if d.reasoning:
                out.append(self.chunk(index, {"reasoning_content": d.reasoning, "reasoning": d.reasoning}))
            content = d.content
            if d.refusal is not None:
                content += ("\n\n" if self.choices[index].content else "") + d.refusal.message
            if content:
                out.append(self.chunk(index, {"content": content}))
            if d.finished:
                out.append(self.chunk(index, {}, d.finish_reason))
        else:
            text = d.content + (d.refusal.message if d.refusal is not None else "")
            if text or d.finished:
                out.append(self.chunk(index, None, d.finish_reason if d.finished else None, text))
        return out

    def closing(self) -> list[str]:
        """The usage chunk when asked for, then [DONE]."""
        if not self.include_usage:
            return [SSE_DONE]
        return [sse_event({**self._chunk_object([]), "usage": self.usage()}, ascii_only=True), SSE_DONE]
