"""Axolotl recipes (YAML) and `recipes.guard`, the pre-flight/finite-loss plugin they load."""
