"""Everything that changes weights: recipes, the pretraining/SFT loop, checkpoints and resume."""

from .recipe import TrainRecipe, load_recipe
from .trainer import TrainingError, train

__all__ = ["TrainRecipe", "load_recipe", "train", "TrainingError"]
