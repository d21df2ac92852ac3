"""Serving: the OpenAI/DeepSeek-compatible HTTP API, the web chat page and the content policy."""

from __future__ import annotations

from pathlib import Path

from .access import uvicorn_options
from .app import create_app
from .config import ServerConfig
from .policy import Decision, Policy, PolicyError
from .wire import APIError

__all__ = ["APIError", "ServerConfig", "create_app", "Decision", "Policy", "PolicyError", "load_engine",
           "build_app", "uvicorn_options"]


def load_engine(path: str | Path, *, max_batch: int = 16, max_model_len: int | None = None,
                speculative: bool = False, prefill_chunk: int = 512, device=None, dtype=None, precision=None,
                quantize: str = "none"):
    """(Engine, ChatTokenizer) for an HF-format model folder with tokenizer files.

    precision (auto | fp32 | bf16; `nanoseek.infer.compute`) chooses how the model computes and so the
    dtype its weights load in; dtype instead loads them in that dtype and computes in it; neither: the
    stored dtype (FP8 becomes bf16). quantize int8 (with precision auto/fp32 or None) reads the weights
    tensor by tensor straight into int8 Linears and experts (`nanoseek.infer.int8_load`: memory for the
    int8 model, never the full-precision one). `engine.precision_plan` says what was chosen."""
    from ..checkpoint import load_model
    from ..errors import ConfigError, DataError
    from ..infer import Engine, load_tokenizer
    from ..infer.compute import inference_precision
    from ..infer.int8_load import load_int8_model
    if dtype is not None and (precision is not None or quantize != "none"):
        raise ConfigError("give load_engine a dtype or a precision (and quantize), not both: the precision "
                          "chooses the dtype")
    if quantize != "none" and precision is None:
        precision = "auto"
    plan = inference_precision(precision, device or "cpu", quantize) if precision is not None else None
    tokenizer = load_tokenizer(path)
    if plan is not None and plan.quantize == "int8":
        model = load_int8_model(path)  # the plan checked the device: a CPU
    else:
        model = load_model(path, device=device, dtype=plan.weights if plan is not None else dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DataError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}")
    context = min(max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_model_len=context, speculative=speculative,
                    prefill_chunk=prefill_chunk, precision=plan)
    return engine, tokenizer


def build_app(path: str | Path, *, config: ServerConfig | None = None, policy: Policy | None = None,
              max_waiting: int = 64, **engine_options):
    """(FastAPI app, Scheduler) serving the model folder `path`; call scheduler.shutdown() when done."""
    from ..infer.scheduler import Scheduler
    engine, tokenizer = load_engine(path, **engine_options)
    config = config or ServerConfig(model_name=Path(path).resolve().name)
    scheduler = Scheduler(engine, max_waiting=max_waiting)
    return create_app(scheduler, tokenizer, config, policy), scheduler
