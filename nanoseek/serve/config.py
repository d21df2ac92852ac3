"""ServerConfig: the identity and limits of one server (set by `nanoseek serve`'s flags)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    """Limits and identity of one server. None limits derive from the engine's context length."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompt_tokens: int | None = None  # default: context length - 1
    max_tokens_limit: int | None = None  # default: context length
    default_max_tokens: int = 512
    max_n: int = 8
    rate_limit: int = 0  # requests per minute per client (API key or address); 0: off
    keepalive_s: float = 15.0
