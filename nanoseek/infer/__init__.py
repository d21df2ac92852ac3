"""Inference: the generation engine (continuous batching over the MLA latent cache, streaming text,
speculative decoding with MTP), its scheduler thread, and `generate` for token ids."""

from .engine import Engine, Request, RequestOutput
from .generate import check_generation, generate, generate_batches
from .sampling import SamplingParams
from .text import ChatTokenizer, IncrementalDetokenizer, ReasoningSplitter, StopStrings, load_tokenizer

__all__ = ["Engine", "Request", "RequestOutput", "SamplingParams", "generate", "generate_batches", "check_generation", "ChatTokenizer",
           "IncrementalDetokenizer", "ReasoningSplitter", "StopStrings", "load_tokenizer"]
