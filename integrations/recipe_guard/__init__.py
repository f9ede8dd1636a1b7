"""Pre-flight checks, a finite-loss stop and exact resume for our recipes: see README.md."""

from integrations.recipe_guard.args import RecipeGuardArgs
from integrations.recipe_guard.checks import check_recipe, main
from integrations.recipe_guard.plugin import RecipeGuardPlugin

__all__ = ["RecipeGuardArgs", "RecipeGuardPlugin", "check_recipe", "main"]
