"""Axolotl plugins of this repository, one package each (`integrations/<name>/plugin.py`).

A recipe turns one on by listing its class under `plugins:`, e.g.
`integrations.fast_steps.FastStepsPlugin`.
"""
