"""Recipes: chain compression steps, measure each, print the table."""

from edgeslim.recipe.core import Recipe, Step, load_recipe
from edgeslim.recipe.run import RecipeResult, run_recipe

__all__ = ["Recipe", "RecipeResult", "Step", "load_recipe", "run_recipe"]
