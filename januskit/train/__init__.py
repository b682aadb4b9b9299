"""Training: recipes (recipe.py), stages (stages.py), the loss (loss.py), the loop (loop.py), parallelism
(parallel.py), checkpoints (checkpoint.py) and run feedback (feedback.py). Entry point: `januskit train`."""

from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "train"]


def __getattr__(name):
    if name == "train":  # the loop pulls in the model and the data pipeline: import it on first use
        from .loop import train

        return train
    raise AttributeError(f"module 'januskit.train' has no attribute {name!r}")
