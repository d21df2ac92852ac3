"""Request body -> what the engine runs: the parameter checks both endpoints share, the prompt of chat
messages or of completion prompts, the max_tokens budget, and one SamplingParams per choice."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from ..infer.sampling import SamplingParams
from ..infer.text import ChatTokenizer
from .config import ServerConfig
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .wire import APIError


@dataclass
class Prepared:
    """One request ready to run: a prompt per choice and what its answer needs."""

    prompts: list[list[int]]  # token ids, one list per choice
    max_tokens: int
    stops: tuple[str, ...]
    prompt_tokens: int  # usage: the distinct prompts' tokens
    texts: list[str]  # the user's text, for the policy's input rules
    thinking: bool = False  # chat: the prompt opens a reasoning block
    echo: list[str] | None = None  # completions with echo: each choice's prompt text


class Preparer:
    """Turns validated bodies into Prepared requests under the server's limits (raises APIError)."""

    def __init__(self, tokenizer: ChatTokenizer, config: ServerConfig, context: int, vocab_size: int):
        self.tokenizer, self.config, self.context, self.vocab_size = tokenizer, config, context, vocab_size
        self.max_prompt = min(config.max_prompt_tokens or context - 1, context - 1)
        self.max_tokens = min(config.max_tokens_limit or context, context)

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        stops = self.check_fields(body)
        if body.tools:
            raise APIError(422, "tools are not supported by this server.", param="tools",
                           code="unsupported_parameter")
        if len(body.messages) > self.config.max_messages:
            raise APIError(400, f"Too many messages: {len(body.messages)} (at most {self.config.max_messages}).",
                           param="messages", code="invalid_value")
        messages = []
        for m in body.messages:
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "assistant" and m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            messages.append(msg)
        try:
            prompt, thinking = self.tokenizer.chat_prompt(messages)
        except (DataError, ValueError) as e:
            raise APIError(400, f"Invalid messages: {e}", param="messages", code="invalid_value") from None
        except Exception as e:  # a folder's Jinja template raising (e.g. on role order)
            raise APIError(400, f"The chat template rejected the messages: {type(e).__name__}",
                           param="messages", code="invalid_value") from None
        max_tokens = self.budget(len(prompt), body.max_completion_tokens or body.max_tokens,
                                 self.config.default_max_tokens)
        return Prepared([prompt] * body.n, max_tokens, stops, len(prompt),
                        [m["content"] for m in messages if m["role"] == "user"], thinking)

    def completion(self, body: CompletionRequest) -> Prepared:
        stops = self.check_fields(body)
        prompts, texts = self.completion_prompts(body.prompt)
        lengths = [len(p) for p in prompts]
        max_tokens = min(self.budget(P, body.max_tokens, 16) for P in lengths)  # raises for any prompt too long
        per_choice = [(p, text) for p, text in zip(prompts, texts) for _ in range(body.n)]
        return Prepared([p for p, _ in per_choice], max_tokens, stops, sum(lengths), texts,
                        echo=[text for _, text in per_choice] if body.echo else None)

    def check_fields(self, body: SamplingFields) -> tuple[str, ...]:
        """Refuse what neither endpoint serves; -> the stop strings."""
        if body.logprobs:
            raise APIError(422, "logprobs are not supported by this server.", param="logprobs",
                           code="unsupported_parameter")
        if body.n > self.config.max_n:
            raise APIError(422, f"'n' must be at most {self.config.max_n} (got {body.n}).", param="n",
                           code="invalid_value")
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise APIError(422, "'stop' takes at most 16 non-empty strings of at most 256 characters.",
                           param="stop", code="invalid_value")
        return stops

    def budget(self, prompt_tokens: int, requested: int | None, default: int) -> int:
        """max_tokens for a prompt, or the vLLM-worded context-length error."""
        M, P = self.context, prompt_tokens
        if P > self.max_prompt:
            raise APIError(400, f"This model's maximum context length is {M} tokens. However, your request has "
                           f"{P} input tokens (at most {self.max_prompt} allowed). Please reduce the length "
                           "of the input.", param="messages", code="context_length_exceeded")
        if requested is None:
            return max(1, min(default, self.max_tokens, M - P))
        if requested > M - P:
            raise APIError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {requested}. This "
                           f"model's maximum context length is {M} tokens and your request has {P} input "
                           f"tokens ({requested} > {M} - {P}).", param="max_tokens",
                           code="context_length_exceeded")
        if requested > self.max_tokens:
            raise APIError(400, f"'max_tokens' is too large: {requested}. This server allows at most "
                           f"{self.max_tokens} generated tokens.", param="max_tokens", code="invalid_value")
        return requested

    def completion_prompts(self, prompt) -> tuple[list[list[int]], list[str]]:
        """A string, strings, token ids or lists of ids -> (token ids, text) of each prompt."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        if len(prompt) > 64:
            raise APIError(400, "At most 64 prompts per request.", param="prompt", code="invalid_value")
        ids, texts = [], []
        V = self.vocab_size
        for p in prompt:
            if isinstance(p, str):
                texts.append(p)
                p = self.tokenizer.encode(p)
            else:
                if any(not 0 <= t < V for t in p):
                    raise APIError(400, f"'prompt' has token ids outside the vocabulary [0, {V}).",
                                   param="prompt", code="invalid_value")
                texts.append(self.tokenizer.decode(p))
            if not p:
                raise APIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")
            ids.append(p)
        return ids, texts


def sampling(body: SamplingFields, prepared: Prepared) -> list[SamplingParams]:
    """One SamplingParams per choice; choice i of a seeded request gets seed + i."""
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    return [SamplingParams(max_tokens=prepared.max_tokens,
                           temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
                           seed=None if body.seed is None else body.seed + i, stop=prepared.stops,
                           ignore_eos=body.ignore_eos)
            for i in range(len(prepared.prompts))]
