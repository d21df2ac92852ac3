"""nanoseek: build, train, teach to reason, serve and evaluate DeepSeek-style MoE language models."""

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError, NanoseekError
from .model import LatentCache, Transformer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "Transformer", "LatentCache", "ConfigError", "CheckpointError", "DataError",
           "NanoseekError", "load_model", "save_model", "count_parameters"]


def __getattr__(name):  # lazy: importing the model does not import the checkpoint layer
    if name in ("load_model", "save_model"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "count_parameters":
        from .params import count_parameters
        return count_parameters
    raise AttributeError(name)
