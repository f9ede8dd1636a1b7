"""Moved to integrations/recipe_guard/ (see its README.md); kept so that recipes and scripts
naming `recipes.guard.RecipeGuardPlugin` or `python -m recipes.guard` still work."""

from integrations.recipe_guard import RecipeGuardPlugin, check_recipe, main

__all__ = ["RecipeGuardPlugin", "check_recipe", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
