"""Byte-level BPE tokenizer with DeepSeek-R1's special tokens and chat template.

Training uses the `tokenizers` library (Rust BPE); the result is saved as tokenizer.json +
tokenizer_config.json, which `transformers.AutoTokenizer.from_pretrained(folder)` loads offline.

Special tokens take the first ids, in DeepSeek-V3's order for the first two (bos 0, eos 1, as in
ModelConfig's defaults):
  0 <｜begin▁of▁sentence｜>  1 <｜end▁of▁sentence｜>  2 <｜▁pad▁｜>  3 <｜User｜>
  4 <｜Assistant｜>  5 <think>  6 </think>
(｜ is the fullwidth bar U+FF5C, ▁ is U+2581.) Then the 256 byte tokens, then the merges.

Pre-tokenization splits text with the GPT-4 (cl100k) pattern before byte-level BPE: numbers in
groups of at most 3 digits (as DeepSeek-V3's pre-tokenizer does), letters, punctuation and
whitespace runs apart. No normalizer: decode(encode(text)) == text for any string.

Chat template (DeepSeek-R1's, with reasoning), as rendered by `render_chat` here and by the Jinja
`CHAT_TEMPLATE` stored in tokenizer_config.json (a test checks both give the same ids):
  <｜begin▁of▁sentence｜>{system}<｜User｜>{q1}<｜Assistant｜>{a1}<｜end▁of▁sentence｜>
  <｜User｜>{q2}<｜Assistant｜><think>\\n{reasoning}\\n</think>\\n\\n{a2}<｜end▁of▁sentence｜>
- System messages are joined with a blank line and placed right after BOS (as R1's template does).
- An assistant turn after the last user message renders its `reasoning_content` in a think block
  (an empty block when it has none), so the turn always opens with `<think>\\n` and the rendering
  of a conversation continues exactly its prompt rendered with `add_generation_prompt=True`,
  which ends with `<｜Assistant｜><think>\\n`.
- Earlier assistant turns drop their reasoning, like R1's official template (which also cuts any
  inline `...</think>` from their content): the model never sees old reasoning in its context.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from .errors import DataError
from .runio import write_text_atomic

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK)
# DeepSeek-V3's tool-use markers. nanoseek's tokenizers have no ids for them: they are plain text
# (several byte tokens each), which the server renders and parses the same way either way.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + one token per byte
ROLES = ("system", "user", "assistant")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# GPT-4's split pattern: contractions, words with one leading non-letter, 1-3 digit numbers,
# punctuation runs (with trailing newlines), newline runs, other whitespace.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# The Jinja twin of `render_chat` (transformers renders it with trim_blocks and lstrip_blocks).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', first_system=true, last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if ns.first_system -%}{%- set ns.system = message['content'] -%}{%- set ns.first_system = false -%}"
    "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + message['content'] -%}{%- endif -%}"
    "{%- elif message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- elif message['role'] != 'assistant' -%}"
    "{{- raise_exception(\"unknown role '\" + message['role'] + \"' (expected system, user or assistant)\") -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '" + USER + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{%- set reasoning = message.get('reasoning_content') or '' -%}"
    "{{- '" + THINK + "\\n' + reasoning + '\\n" + END_THINK + "\\n\\n' + message['content'] -}}"
    "{%- else -%}"
    "{{- message['content'].split('" + END_THINK + "')[-1] -}}"
    "{%- endif -%}"
    "{{- '" + EOS + "' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + THINK + "\\n' -}}{%- endif -%}"
)


# ---- chat rendering (pure Python, no tokenizer) ----------------------------------------------------
def check_messages(messages) -> None:
    """Raise DataError unless `messages` is a list of {role, content[, reasoning_content]} dicts with a
    known role and string content (the message is named by its index)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(m.get("content"), str):
            what = "has no content" if m.get("content") is None else "has non-string content"
            raise DataError(f"message {i} ({role}) {what}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise DataError(f"message {i} (assistant) has non-string reasoning_content")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The R1 chat template as (text, is_assistant_reply) parts, in order; "".join of the texts is the
    prompt string. Reply parts are what SFT trains on: everything after `<｜Assistant｜>` up to and
    including `<｜end▁of▁sentence｜>` (think block included)."""
    check_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    parts = [(BOS + system, False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            parts.append((USER + m["content"], False))
        elif m["role"] == "assistant":
            parts.append((ASSISTANT, False))
            if i > last_user:
                reasoning = m.get("reasoning_content") or ""
                reply = f"{THINK}\n{reasoning}\n{END_THINK}\n\n{m['content']}"
            else:
                reply = m["content"].split(END_THINK)[-1]
            parts.append((reply + EOS, True))
    if add_generation_prompt:
        parts.append((ASSISTANT + THINK + "\n", False))
    return parts


# ---- tool use (DeepSeek-V3's format) --------------------------------------------------------------
def render_tool_call(name: str, arguments: str) -> str:
    """One call as DeepSeek-V3 writes it: function<sep>NAME, then the arguments in a json fence."""
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{arguments}\n```{TOOL_CALL_END}"


def render_tools(tools: Sequence[dict]) -> str:
    """The system prompt's tool list (DeepSeek-V3.1's wording): each function's name, description and
    JSON-schema parameters, then the exact call format."""
    text = "## Tools\nYou have access to the following tools:\n"
    for tool in tools:
        f = tool.get("function", tool)
        text += (f"\n### {f['name']}\nDescription: {f.get('description') or ''}\n\n"
                 f"Parameters: {json.dumps(f.get('parameters') or {'type': 'object', 'properties': {}}, ensure_ascii=False)}\n")
    example = render_tool_call("tool_call_name", "tool_call_arguments")
    return text + f"\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n{TOOL_CALLS_BEGIN}{example}{TOOL_CALLS_END}"


def check_tool_messages(messages) -> None:
    """check_messages for conversations with tools: also `tool` messages (string content) and assistant
    messages with `tool_calls` ([{function: {name, arguments}}]; content may then be None)."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is not an object")
        if m.get("role") == "tool":
            if not isinstance(m.get("content"), str):
                raise DataError(f"message {i} (tool) has no string content")
            continue
        if m.get("role") == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                f = call.get("function") if isinstance(call, dict) else None
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or \
                        not isinstance(f.get("arguments"), str):
                    raise DataError(f"message {i} (assistant) has a tool call without a function name and "
                                    "string arguments")
            m = dict(m, content=m.get("content") or "")
        plain.append(m)
    if plain:
        check_messages(plain)


def render_tool_chat(messages: Sequence[dict], tools: Sequence[dict] | None,
                     add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """`render_chat` with DeepSeek-V3's tool use: the tool list joins the system prompt; an assistant
    turn with `tool_calls` ends with them (<calls_begin><call_begin>function<sep>NAME ```json ARGS```
    <call_end>, joined by newlines, <calls_end>) before its EOS; a run of `tool` messages is
    <outputs_begin><output_begin>RESULT<output_end>(\\n<output_begin>...)*<outputs_end>, and the assistant
    turn that follows continues without a new <｜Assistant｜> (as in DeepSeek-V3's template), with a
    think block when it comes after the last user message (so does the generation prompt)."""
    check_tool_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if tools:
        system = (system + "\n\n" if system else "") + render_tools(tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    parts = [(BOS + system, False)]
    in_outputs = False
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "tool":
            opening = "\n" + TOOL_OUTPUT_BEGIN if in_outputs else TOOL_OUTPUTS_BEGIN + TOOL_OUTPUT_BEGIN
            parts.append((opening + m["content"] + TOOL_OUTPUT_END, False))
            in_outputs = True
            continue
        opener = ASSISTANT
        if in_outputs:
            parts.append((TOOL_OUTPUTS_END, False))
            in_outputs = False
            opener = ""  # the assistant turn the tool outputs interrupted goes on
        if role == "user":
            parts.append((USER + m["content"], False))
        elif role == "assistant":
            content = m.get("content") or ""
            if opener:
                parts.append((opener, False))
            if i > last_user:
                reply = f"{THINK}\n{m.get('reasoning_content') or ''}\n{END_THINK}\n\n{content}"
            else:
                reply = content.split(END_THINK)[-1]
            calls = m.get("tool_calls") or []
            if calls:
                reply += TOOL_CALLS_BEGIN + "\n".join(
                    render_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in calls) + TOOL_CALLS_END
            parts.append((reply + EOS, True))
    if in_outputs:
        parts.append((TOOL_OUTPUTS_END, False))
    if add_generation_prompt:
        parts.append(((ASSISTANT if not in_outputs else "") + THINK + "\n", False))
    return parts


# ---- the tokenizer ---------------------------------------------------------------------------------
class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` plus R1's special tokens and chat template.

    `encode` never adds special tokens unless asked (bos/eos); `apply_chat_template` and `encode_chat`
    produce the same ids as transformers' `apply_chat_template` on the saved folder.
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer lacks the special tokens {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id, self.user_id, self.assistant_id, self.think_id, \
            self.end_think_id = (backend.token_to_id(t) for t in SPECIAL_TOKENS)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> "Tokenizer":
        """Train a byte-level BPE of `vocab_size` tokens (specials and 256 bytes included) on `texts`.
        A small corpus may yield fewer tokens than asked: `vocab_size` is an upper bound."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"vocab size {vocab_size} is below the minimum {MIN_VOCAB_SIZE} "
                            f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(texts, trainer)
        # HF convention (DeepSeek's too): tokenizer(text) prepends BOS; nanoseek's encode does not.
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))])
        return cls(backend)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read the tokenizer.json in folder `path` (or the file itself)."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no {TOKENIZER_FILE} in {path} (train one with `nanoseek tokenizer train`)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # the library raises plain Exception on bad JSON or an unknown model
            raise DataError(f"{file}: not a valid tokenizers file ({e})") from None
        return cls(backend)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into folder `path`. Each file is written to a
        temporary name and renamed into place; other files in the folder (a model) are kept."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path / TOKENIZER_FILE, self.backend.to_str(pretty=True) + "\n")
        write_text_atomic(path / CONFIG_FILE, json.dumps(self.hf_config(), indent=2, ensure_ascii=False) + "\n")
        return path

    def hf_config(self) -> dict:
        """tokenizer_config.json for transformers: special tokens, BOS added by default, the template."""
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                "pad_token": PAD, "unk_token": None, "add_bos_token": True, "add_eos_token": False,
                "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}

    # -- properties ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included): a model's vocab_size must be at least this."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of what decides token ids (model, added tokens, pre-tokenizer, normalizer): data
        manifests record it so shards are never read with a different tokenizer."""
        spec = json.loads(self.backend.to_str())
        added = [(t["id"], t["content"]) for t in spec.get("added_tokens", [])]
        key = {k: spec.get(k) for k in ("model", "pre_tokenizer", "normalizer")} | {"added_tokens": added}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    @property
    def special_ids(self) -> list[int]:
        """Ids of the added (special) tokens."""
        return sorted(self.backend.get_added_tokens_decoder())

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    # -- text ------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings inside it become their single ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many texts at once (parallel in Rust); no special tokens added."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, numpy array or 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: Sequence[dict] | None = None) -> list[int] | str:
        """R1 chat rendering: token ids (or the string when tokenize=False), as transformers gives.
        With `tools` (a list, possibly empty) the conversation may use tools (`render_tool_chat`);
        the Jinja template saved for transformers does not render tools."""
        if tools is not None:
            parts = render_tool_chat(messages, tools, add_generation_prompt)
            text = "".join(t for t, _ in parts)
            return text if not tokenize else [i for e in self.encode_batch([t for t, _ in parts]) for i in e]
        parts = render_chat(messages, add_generation_prompt)
        if not tokenize:
            return "".join(text for text, _ in parts)
        return self.encode_chat(messages, add_generation_prompt=add_generation_prompt)[0]

    def encode_chat(self, messages: Sequence[dict], *,
                    add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask): mask[i] is True for the tokens of assistant replies (think block,
        answer and the closing <｜end▁of▁sentence｜>), the tokens SFT computes its loss on."""
        return self.encode_chats([messages], add_generation_prompt=add_generation_prompt)[0]

    def encode_chats(self, conversations: Sequence[Sequence[dict]], *,
                     add_generation_prompt: bool = False) -> list[tuple[list[int], list[bool]]]:
        """`encode_chat` of many conversations with one (parallel) tokenizer call. Each part of a
        rendering is encoded on its own: parts meet at special tokens, where the tokenizer splits the
        whole string anyway, so the ids equal those of the joined string."""
        renders = [render_chat(messages, add_generation_prompt) for messages in conversations]
        encoded = iter(self.encode_batch([text for parts in renders for text, _ in parts]))
        out = []
        for parts in renders:
            ids: list[int] = []
            mask: list[bool] = []
            for _, is_reply in parts:
                part_ids = next(encoded)
                ids += part_ids
                mask += [is_reply] * len(part_ids)
            out.append((ids, mask))
        return out

