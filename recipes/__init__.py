"""Axolotl recipes (YAML). The plugin they load is integrations.recipe_guard; guard.py here
only keeps its former import path working."""
