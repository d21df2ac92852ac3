"""The network only: pure PyTorch, no I/O, no training logic."""

from .attention import MLA
from .cache import LatentCache
from .moe import MLP, Gate, MoE, RoutedExperts
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, rope_frequencies
from .transformer import Block, MTPModule, Transformer

__all__ = ["MLA", "LatentCache", "MLP", "Gate", "MoE", "RoutedExperts", "RMSNorm", "RotaryEmbedding",
           "apply_rope", "rope_frequencies", "Block", "MTPModule", "Transformer"]
