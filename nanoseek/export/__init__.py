"""Exports of nanoseek models to other runtimes' formats (GGUF for llama.cpp, Ollama, LM Studio)."""

from .gguf import GGUF_TYPES, ExportSummary, export_gguf

__all__ = ["GGUF_TYPES", "ExportSummary", "export_gguf"]
