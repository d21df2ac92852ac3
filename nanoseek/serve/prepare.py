"""Request body -> what the engine runs: the parameter checks both endpoints share, the prompt of chat
messages or of completion prompts, the max_tokens budget, and one SamplingParams per choice.

`Preparer.screen` makes the cheap checks (fields we do not honour, invalid Unicode, a prompt that is
certainly too long, more choices than the server can ever run) on the event loop; `chat` and
`completion` tokenize, which the app runs in a worker thread."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel

from ..errors import DataError
from ..infer.grammar import Grammar, GrammarError, GrammarTokenizer
from ..infer.sampling import MAX_LOGPROBS, SamplingParams
from ..infer.text import ChatTokenizer
from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from .config import ServerConfig
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from .tools import tool_call_lark
from .wire import APIError

# Fields of the OpenAI API this server does not honour, at the top level or inside a message ("name":
# the chat template has no place for a participant's name): a request giving one any value but null or
# the value that asks for nothing (NEUTRAL) gets a 400 naming it. Unknown fields are refused the same way.
# A request model lists in HONOURED the ones of these it does honour (chat: logprobs, response_format,
# tools, ...; a function's "name"), so the same name can be refused elsewhere (completions, a message).
UNSUPPORTED = ("logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
               "functions", "function_call", "logit_bias", "presence_penalty", "frequency_penalty", "best_of",
               "suffix", "store", "metadata", "modalities", "audio", "prediction", "service_tier",
               "reasoning_effort", "web_search_options", "name")
NEUTRAL = {"logprobs": (False, 0), "top_logprobs": (0,), "tool_choice": ("none",), "tools": ([],),
           "functions": ([],), "response_format": ({"type": "text"},), "logit_bias": ({},),
           "presence_penalty": (0,), "frequency_penalty": (0,), "best_of": (1,), "store": (False,),
           "modalities": (["text"],), "service_tier": ("auto", "default")}
_SURROGATE = re.compile("[\ud800-\udfff]")
_NAME = re.compile("[A-Za-z0-9_-]{1,64}")  # an unknown field named like this is named back in the error


@dataclass
class Prepared:
    """One request ready to run: a prompt per choice and what its answer needs."""

    prompts: list[list[int]]  # token ids, one list per choice
    max_tokens: int
    stops: tuple[str, ...]
    prompt_tokens: int  # usage: the distinct prompts' tokens
    texts: list[tuple[str, str]]  # (role, text) of each message or prompt, for the policy's input rules
    thinking: bool = False  # chat: the prompt opens a reasoning block
    echo: list[str] | None = None  # completions with echo: each choice's prompt text
    logprobs: int | None = None  # report logprobs with this many alternatives (None: no logprobs)
    grammar: Grammar | None = None  # constrained decoding of the answer (response_format, tool_choice)
    tools: ToolUse | None = None  # chat with tools: parse tool calls out of the answer


@dataclass
class ToolUse:
    """A chat request offering tools: its answers' tool calls are parsed (serve/tools.py)."""

    parallel: bool = True  # parallel_tool_calls (False: the first call only)


class Preparer:
    """Turns validated bodies into Prepared requests under the server's limits (raises APIError)."""

    def __init__(self, tokenizer: ChatTokenizer, config: ServerConfig, context: int, vocab_size: int,
                 capacity: int):
        self.tokenizer, self.config, self.context, self.vocab_size = tokenizer, config, context, vocab_size
        self.max_prompt = min(config.max_prompt_tokens or context - 1, context - 1)
        self.max_tokens = min(config.max_tokens_limit or context, context)
        self._grammars: GrammarTokenizer | None = None  # llguidance's tokenizer, built on first use
        self.capacity = capacity
        # no token is longer than this (UTF-8 bytes, + 1 for a decoder's dropped leading space), and a
        # character is at least a byte: more characters than this (x 2 for normalizers) cannot fit
        longest = max((len(tokenizer.decode([i]).encode("utf-8", "replace")) for i in range(tokenizer.vocab_size)),
                      default=1)
        self.max_prompt_chars = 2 * self.max_prompt * (longest + 1)

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        """Tokenize a screened chat request (slow for long prompts: run it off the event loop)."""
        stops = self.stops(body)
        logprobs = self.chat_logprobs(body)
        tools, choice = self.tool_choice(body)
        messages = []
        for i, m in enumerate(body.messages):
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"Invalid 'messages.{i}.tool_calls': only assistant messages call tools "
                               f"(this one is {m.role}).",
                               param=f"messages.{i}.tool_calls", code="invalid_value")
            msg = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.role == "assistant" and m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
            if m.role == "assistant" and m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.role == "tool" and m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        uses_tools = tools is not None or any("tool_calls" in m or m["role"] == "tool" for m in messages)
        try:
            if uses_tools:  # DeepSeek-V3's tool format (the plain template otherwise, exactly as before)
                prompt, thinking = self.tokenizer.chat_prompt(messages, tools=tools or [])
            else:
                prompt, thinking = self.tokenizer.chat_prompt(messages)
        except (DataError, ValueError) as e:
            raise APIError(400, f"Invalid messages: {e}", param="messages", code="invalid_value") from None
        except Exception as e:  # a folder's Jinja template raising (e.g. on role order)
            raise APIError(400, f"The chat template rejected the messages: {type(e).__name__}",
                           param="messages", code="invalid_value") from None
        max_tokens = self.budget(len(prompt), body.max_completion_tokens or body.max_tokens,
                                 self.config.default_max_tokens)
        grammar = self.answer_grammar(body, tools, choice, thinking)
        return Prepared([prompt] * body.n, max_tokens, stops, len(prompt),
                        [(m["role"], m["content"]) for m in messages], thinking, logprobs=logprobs,
                        grammar=grammar, tools=ToolUse(body.parallel_tool_calls is not False) if tools else None)

    # ---- logprobs -------------------------------------------------------------------------------
    @staticmethod
    def chat_logprobs(body: ChatCompletionRequest) -> int | None:
        """logprobs (bool) and top_logprobs (0..20, needs logprobs) -> alternatives per token or None."""
        top = body.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be between 0 and {MAX_LOGPROBS} (got {top}).",
                           param="top_logprobs", code="invalid_value")
        if top is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs",
                           code="invalid_value")
        return (top or 0) if body.logprobs else None

    @staticmethod
    def completion_logprobs(body: CompletionRequest) -> int | None:
        """logprobs (0..20 alternatives per token; OpenAI allows 5) -> alternatives or None."""
        n = body.logprobs
        if n is None:
            return None
        if not 0 <= n <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be between 0 and {MAX_LOGPROBS} (got {n}).", param="logprobs",
                           code="invalid_value")
        if body.echo:
            raise APIError(400, "'echo' with 'logprobs' would need the prompt's logprobs, which this server does "
                           "not compute; drop one of them.", param="logprobs", code="unsupported_parameter")
        return n

    # ---- tools and constrained answers ----------------------------------------------------------
    def tool_choice(self, body: ChatCompletionRequest) -> tuple[list[dict] | None, str | None]:
        """-> (the tools to offer, or None; "auto", "required" or a function name). tool_choice "none"
        offers no tools (the answer is plain text)."""
        choice = body.tool_choice
        name = choice.function.name if choice is not None and not isinstance(choice, str) else None
        if not body.tools:
            if choice in ("required",) or name is not None:
                raise APIError(400, "'tool_choice' requires 'tools'.", param="tool_choice", code="invalid_value")
            return None, None
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise APIError(400, "'tools' has two functions with the same name.", param="tools", code="invalid_value")
        if name is not None and name not in names:
            raise APIError(400, f"'tool_choice' names a function that is not in 'tools' ({name[:64]!r}).",
                           param="tool_choice", code="invalid_value")
        if choice == "none":
            return None, None
        return tools, name or choice or "auto"

    def answer_grammar(self, body: ChatCompletionRequest, tools: list[dict] | None, choice: str | None,
                       thinking: bool) -> Grammar | None:
        """The grammar the answer (after the reasoning) must follow: response_format's JSON, or tool
        calls when tool_choice is "required" or names a function; under "auto" a lazy grammar that lets
        the answer be text but makes any calls block it starts follow the tools' schemas; None when the
        answer is free."""
        fmt = body.response_format
        json_answer = fmt is not None and fmt.type != "text"
        forced_call = tools is not None and choice != "auto"
        if json_answer and tools is not None:
            raise APIError(400, "'response_format' with 'tools' is not supported: the answer would have to be "
                           "both JSON and tool calls. Send one of them (or tool_choice 'none').",
                           param="response_format", code="unsupported_parameter")
        if tools is not None and not forced_call:
            return self.lazy_tool_grammar(tools, body.parallel_tool_calls is not False, thinking)
        if not json_answer and not forced_call:
            return None
        start_after = None
        if thinking:
            if self.tokenizer.end_think_id is None:
                raise APIError(400, "This model's tokenizer has no </think> token, so the answer after the "
                               "reasoning cannot be constrained.", param="response_format",
                               code="unsupported_parameter")
            start_after = self.tokenizer.end_think_id
        grammars = self.grammar_tokenizer("response_format" if json_answer else "tool_choice")
        try:
            if forced_call:
                for marker in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_CALLS_END):
                    if len(self.tokenizer.encode(marker)) == 1:
                        raise GrammarError("this tokenizer has the tool markers as special tokens, which the "
                                           "tool-call grammar cannot emit")
                name = None if choice == "required" else choice
                return grammars.lark_grammar(tool_call_lark(tools, name, body.parallel_tool_calls is not False),
                                             start_after)
            if fmt.type == "json_object":
                return grammars.json_grammar(None, start_after)
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise APIError(400, "Missing 'response_format.json_schema' ({'name', 'schema'}) for type 'json_schema'.",
                               param="response_format.json_schema", code="invalid_value")
            return grammars.json_grammar(fmt.json_schema.schema_, start_after)
        except GrammarError as e:
            param = "response_format" if json_answer else "tools"
            raise APIError(400, f"Invalid '{param}': {str(e)[:300]}", param=param, code="invalid_value") from None

    def lazy_tool_grammar(self, tools: list[dict], parallel: bool, thinking: bool) -> Grammar | None:
        """tool_choice "auto": once the answer writes `<｜tool▁calls▁begin｜>`, the calls follow the
        grammar (offered names, arguments valid under each function's parameters). None (calls parsed
        as written) where no grammar can apply: no tokenizer.json or llguidance, or tool markers that
        are special tokens."""
        if any(len(self.tokenizer.encode(m)) == 1 for m in (TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, TOOL_SEP,
                                                           TOOL_CALL_END, TOOL_CALLS_END)):
            return None
        try:
            grammars = self.grammar_tokenizer("tools")
        except APIError:
            return None
        start_after = self.tokenizer.end_think_id if thinking else None
        try:
            return grammars.lark_grammar(tool_call_lark(tools, None, parallel), start_after).lazy(TOOL_CALLS_BEGIN)
        except GrammarError as e:
            raise APIError(400, f"Invalid 'tools': {str(e)[:300]}", param="tools", code="invalid_value") from None

    def grammar_tokenizer(self, param: str) -> GrammarTokenizer:
        """llguidance's tokenizer for this model (built on first use)."""
        if self._grammars is None:
            source = self.tokenizer.tokenizer_json()
            if source is None:
                raise APIError(400, f"'{param}' needs a tokenizer.json (a fast tokenizer); this model has none.",
                               param=param, code="unsupported_parameter")
            try:
                self._grammars = GrammarTokenizer(source, self.vocab_size, self.tokenizer.eos_ids[0])
            except ImportError:
                raise APIError(400, f"'{param}' needs the llguidance package (pip install llguidance).",
                               param=param, code="unsupported_parameter") from None
        return self._grammars

    def completion(self, body: CompletionRequest) -> Prepared:
        """Tokenize a screened completion request (slow for long prompts: run it off the event loop)."""
        stops = self.stops(body)
        logprobs = self.completion_logprobs(body)
        prompts, texts = self.completion_prompts(body.prompt)
        lengths = [len(p) for p in prompts]
        max_tokens = min(self.budget(P, body.max_tokens, 16) for P in lengths)  # raises for any prompt too long
        per_choice = [(p, text) for p, text in zip(prompts, texts) for _ in range(body.n)]
        return Prepared([p for p, _ in per_choice], max_tokens, stops, sum(lengths), [("user", t) for t in texts],
                        echo=[text for _, text in per_choice] if body.echo else None, logprobs=logprobs)

    # ---- cheap checks, on the event loop ----------------------------------------------------------
    def screen(self, body: SamplingFields) -> None:
        """Refuse (400) what no amount of work could serve, before anything is tokenized."""
        unhonoured(body)
        field = bad_unicode(body)
        if field is not None:
            raise APIError(400, f"Invalid value for '{field}': the text has a lone surrogate (invalid Unicode).",
                           param=field, code="invalid_value")
        if body.n > self.config.max_n:
            raise APIError(422, f"'n' must be at most {self.config.max_n} (got {body.n}).", param="n",
                           code="invalid_value")
        self.stops(body)
        if isinstance(body, ChatCompletionRequest):
            if len(body.messages) > self.config.max_messages:
                raise APIError(400, f"Too many messages: {len(body.messages)} (at most {self.config.max_messages}).",
                               param="messages", code="invalid_value")
            self._not_too_long(sum(len(m.text()) + len(m.reasoning_content or "") for m in body.messages),
                               "messages")
            sequences = body.n
        else:
            prompts = [body.prompt] if isinstance(body.prompt, str) or not body.prompt or \
                isinstance(body.prompt[0], int) else body.prompt
            for p in prompts:
                if isinstance(p, str):
                    self._not_too_long(len(p), "prompt")
            sequences = len(prompts) * body.n
        if sequences > self.capacity:
            raise APIError(400, f"This request needs {sequences} sequences at once (prompts x n) but this server "
                           f"runs at most {self.capacity}; it can never be served. Send fewer prompts or a "
                           "smaller 'n'.", param="n", code="invalid_value")

    def _not_too_long(self, chars: int, param: str):
        """400 for text so long that even the longest tokens could not fit it in max_prompt tokens."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                           f"request has {chars} characters of input, more than {self.max_prompt} tokens can "
                           "hold. Please reduce the length of the input.", param=param,
                           code="context_length_exceeded")

    def stops(self, body: SamplingFields) -> tuple[str, ...]:
        """The stop strings (422 beyond 16 or for an empty or long one)."""
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


def unhonoured(body: BaseModel, where: str = "") -> None:
    """400 naming the first field the server does not honour: one in UNSUPPORTED set to anything but
    null or its NEUTRAL value, or an unknown field that is not null (also inside messages)."""
    honoured = getattr(body, "HONOURED", ())
    for name in UNSUPPORTED:
        if name in honoured:
            continue
        value = getattr(body, name, None) if name in type(body).model_fields else (body.model_extra or {}).get(name)
        if value is not None and not _neutral(value, NEUTRAL.get(name, ())):
            raise APIError(400, f"'{where}{name}' is not supported by this server.", param=where + name,
                           code="unsupported_parameter")
    for name, value in (body.model_extra or {}).items():
        if value is not None and name not in UNSUPPORTED:
            if not _NAME.fullmatch(name):  # the client's text, not a field name: not repeated
                raise APIError(400, f"Unrecognized request argument supplied{' in ' + where[:-1] if where else ''}.",
                               param=where[:-1] or None, code="unknown_parameter")
            raise APIError(400, f"Unrecognized request argument supplied: '{where}{name}'.", param=where + name,
                           code="unknown_parameter")
    for name in type(body).model_fields:
        value = getattr(body, name)
        if isinstance(value, BaseModel):
            unhonoured(value, f"{where}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    unhonoured(item, f"{where}{name}.{i}.")


def _neutral(value, neutral: tuple) -> bool:
    """value asks for nothing (0.0 counts as 0, True does not count as 1)."""
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def bad_unicode(body: BaseModel) -> str | None:
    """The dotted name of the first string in `body` holding a lone surrogate (JSON's "\\ud800"),
    which no tokenizer or response can encode; None if all are valid."""
    def walk(value, path):
        if isinstance(value, str):
            return None if value.isascii() or not _SURROGATE.search(value) else path
        if isinstance(value, BaseModel):
            items = [(k, getattr(value, k)) for k in type(value).model_fields] + list((value.model_extra or {}).items())
        elif isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            return None
        for k, v in items:
            if isinstance(k, str) and _SURROGATE.search(k):
                return path or "body"  # (a bad key itself is not named: it cannot be written back)
            found = walk(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    return walk(body, "")


def sampling(body: SamplingFields, prepared: Prepared) -> list[SamplingParams]:
    """One SamplingParams per choice; choice i of a seeded request gets seed + i."""
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
    return [SamplingParams(max_tokens=prepared.max_tokens,
                           temperature=1.0 if body.temperature is None else body.temperature,
                           top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k,
                           seed=None if body.seed is None else body.seed + i, stop=prepared.stops,
                           ignore_eos=body.ignore_eos, logprobs=prepared.logprobs, grammar=prepared.grammar)
            for i in range(len(prepared.prompts))]
