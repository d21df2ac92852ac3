"""`nanoseek chat` (terminal chat) and `nanoseek serve` (OpenAI/DeepSeek-compatible HTTP server)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from ..cli import EXIT_OK, command
from ..errors import NanoseekError
from ..infer.compute import QUANTIZE
from ..infer.scheduler import Scheduler
from ..precision import PRECISIONS

# serve/ (FastAPI, pydantic: about 0.7 s) and uvicorn are imported inside the commands that run a
# model, so that `nanoseek --help`, which imports every command module, does not pay for them.

DTYPES = {"auto": None, "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="PATH", help="an HF-format model folder with tokenizer files")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="how the model computes: fp32, bf16 (bf16 weights and cache), or auto (default): "
                        "bf16 where a cached probe finds it faster; on a CPU then fp32 for forwards of fewer "
                        "than 64 tokens (decoding, short prompts) and a bf16 copy of the weights for the rest")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="load the weights in this dtype and compute in it (instead of --precision; default: "
                        "as --precision says)")
    add_quantize_argument(p)
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="context length: prompt + reply tokens (default: the model's max_position_embeddings)")
    p.add_argument("--speculative", action="store_true",
                   help="self-speculative decoding with the model's MTP head (same output, fewer steps)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--policy", type=Path, metavar="FILE", help="content policy YAML (default: no policy)")
    p.add_argument("--audit", type=Path, metavar="FILE",
                   help="audit log (JSONL) of policy decisions (default: the policy file's 'audit' entry)")


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    """--quantize, shared by chat, serve and eval."""
    p.add_argument("--quantize", default="none", choices=QUANTIZE,
                   help="int8: int8 weights for the Linears and routed experts (a quarter of fp32's bytes per "
                        "decoded token; CPU only, with --precision auto or fp32; embeddings, norms, router "
                        "and cache stay fp32). Default none")


def _set_threads(threads: int | None) -> None:
    """--threads: torch's CPU threads (None or 0: torch's choice)."""
    if threads is not None and threads < 0:
        raise NanoseekError(f"--threads must be a positive integer (0: torch's choice), got {threads}")
    if threads:
        torch.set_num_threads(threads)


def _compute_options(args) -> dict:
    """load_engine's dtype, precision and quantize from --dtype, --precision and --quantize (--dtype
    excludes the other two)."""
    dtype = DTYPES[args.dtype]
    if dtype is None:
        return {"dtype": None, "precision": args.precision, "quantize": args.quantize}
    for flag, value, default in (("--precision", args.precision, "auto"), ("--quantize", args.quantize, "none")):
        if value != default:
            raise NanoseekError(f"--dtype {args.dtype} and {flag} {value} both choose how the model computes: "
                                "give one of them")
    return {"dtype": getattr(torch, dtype), "precision": None}


def _setup(args, max_batch: int):
    from ..serve import Policy, load_engine
    _set_threads(args.threads)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise NanoseekError("--max-model-len must be at least 2")
    compute = _compute_options(args)
    policy = Policy.load(args.policy, audit_path=args.audit) if args.policy else None
    engine, tokenizer = load_engine(args.path, max_batch=max_batch, max_model_len=args.max_model_len,
                                    speculative=args.speculative, device=args.device, **compute)
    print(f"precision: {engine.precision_plan.describe()}", file=sys.stderr)
    return engine, tokenizer, policy


# ---- nanoseek chat -------------------------------------------------------------------------------
def _chat_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, R1's)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--max-tokens", type=int, default=1024, help="reply tokens at most (default 1024)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible replies)")
    p.add_argument("--no-color", action="store_true", help="plain text (also when NO_COLOR is set or not a tty)")


@command("chat", "chat with a model in the terminal (streaming, thinking shown dimmed; /help for commands)",
         _chat_arguments)
def cmd_chat(args: argparse.Namespace) -> int:
    from ..infer.sampling import SamplingParams
    from ..serve.chat import TerminalChat
    try:  # the checks every request gets, before the model loads
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    engine, tokenizer, policy = _setup(args, max_batch=1)
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    chat = TerminalChat(engine, tokenizer, policy=policy, temperature=args.temperature, top_p=args.top_p,
                        max_tokens=args.max_tokens, system=args.system, seed=args.seed, color=color,
                        name=args.path.resolve().name)
    chat.run(sys.stdin, sys.stdout)
    return EXIT_OK


# ---- nanoseek serve ------------------------------------------------------------------------------
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $NANOSEEK_API_KEY, else none); "
                        "printable ASCII without spaces")
    p.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests queued beyond the batch before answering 503 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, help="largest max_tokens accepted (default: context length)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens of chat requests that give none (default 512)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: context length - 1)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--max-messages", type=int, default=256, help="most messages per chat request (default 256)")
    p.add_argument("--max-n", type=int, default=8, help="most choices per request (default 8)")
    p.add_argument("--rate-limit", type=int, default=0, metavar="RPM",
                   help="requests per minute per client address; 0: unlimited (default)")
    p.add_argument("--auth-failure-limit", type=int, default=30, metavar="RPM",
                   help="requests with a wrong API key per minute per client address before it gets 429 "
                        "(default 30; 0: unlimited)")
    p.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="reverse proxies (comma-separated IPs or networks) whose X-Forwarded-For names the "
                        "client; default: none, the client is the connection's peer")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step, so long prompts don't stall decoding (default 512)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


@command("serve", "serve a model over an OpenAI/DeepSeek-compatible HTTP API with a web chat page",
         _serve_arguments)
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve import Policy, ServerConfig, create_app, load_engine, uvicorn_options
    from ..serve.config import api_key_problem
    source = "--api-key" if args.api_key is not None else "$NANOSEEK_API_KEY"
    key = args.api_key if args.api_key is not None else os.environ.get("NANOSEEK_API_KEY")
    if key is not None and api_key_problem(key):  # it would start, then answer every client 401
        raise NanoseekError(f"{source} {api_key_problem(key)}: no client could send it "
                            "(give a key of printable ASCII without spaces, or none)")
    for name in ("max_batch", "max_waiting", "default_max_tokens", "max_body_bytes", "max_messages", "max_n",
                 "prefill_chunk"):
        if getattr(args, name) < 1:
            raise NanoseekError(f"--{name.replace('_', '-')} must be positive")
    for name in ("rate_limit", "auth_failure_limit"):
        if getattr(args, name) < 0:
            raise NanoseekError(f"--{name.replace('_', '-')} must be 0 (off) or positive")
    _set_threads(args.threads)
    compute = _compute_options(args)
    policy = Policy.load(args.policy, audit_path=args.audit) if args.policy else None
    engine, tokenizer = load_engine(args.path, max_batch=args.max_batch, max_model_len=args.max_model_len,
                                    speculative=args.speculative, prefill_chunk=args.prefill_chunk,
                                    device=args.device, **compute)
    config = ServerConfig(model_name=args.served_model_name or args.path.resolve().name, api_key=key,
                          max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                          max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                          default_max_tokens=args.default_max_tokens, max_n=args.max_n, rate_limit=args.rate_limit,
                          auth_failure_limit=args.auth_failure_limit)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    scheduler = Scheduler(engine, max_waiting=args.max_waiting)
    app = create_app(scheduler, tokenizer, config, policy)
    print(f"serving {config.model_name} (context {engine.max_model_len}, batch {engine.max_batch}"
          f"{', speculative' if args.speculative else ''}{', policy ' + str(args.policy) if policy else ''}) "
          f"on http://{args.host}:{args.port}  (web chat at /, API at /v1); precision "
          f"{engine.precision_plan.describe()}", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    **uvicorn_options(args.forwarded_allow_ips))
    finally:
        scheduler.shutdown()
    return EXIT_OK
