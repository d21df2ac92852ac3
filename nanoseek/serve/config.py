"""ServerConfig: the identity and limits of one server (set by `nanoseek serve`'s flags)."""

from __future__ import annotations

from dataclasses import dataclass


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (None: it can). Clients send it in an HTTP header, which drops
    surrounding spaces, so an empty or padded key would lock every client out."""
    if not key:
        return "is empty"
    if key != key.strip():
        return "has leading or trailing spaces"
    if any(not 32 < ord(c) < 127 for c in key):
        return "must be printable ASCII without spaces (it travels in an HTTP header)"
    return None


@dataclass
class ServerConfig:
    """Limits and identity of one server. None limits derive from the engine's context length.
    Raises ValueError for an unusable api_key."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # default: context length - 1
    max_tokens_limit: int | None = None  # default: context length
    default_max_tokens: int = 512
    max_n: int = 8
    rate_limit: int = 0  # requests per minute per client address; 0: off
    auth_failure_limit: int = 30  # requests with a wrong key per minute per client address; 0: off
    rate_limit_clients: int = 10_000  # client addresses the rate limiter remembers
    keepalive_s: float = 15.0
    tokenizer_threads: int = 2  # prompts tokenized at once (off the event loop)

    def __post_init__(self):
        if self.api_key is not None:
            problem = api_key_problem(self.api_key)
            if problem:
                raise ValueError(f"api_key {problem}")
