"""nanoseek: build, train, teach to reason, serve and evaluate DeepSeek-style MoE language models."""

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError, NanoseekError
from .infer import generate
from .model import LatentCache, Transformer
from .params import count_parameters

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Transformer", "LatentCache", "load_model", "save_model", "count_parameters", "generate",
           "ConfigError", "CheckpointError", "DataError", "NanoseekError"]
