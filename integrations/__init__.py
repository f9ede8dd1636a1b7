"""Axolotl extensions of this repository, one package each with its README.

Plugins (`integrations/<name>/plugin.py`): a recipe turns one on by listing its class under
`plugins:`, e.g. `integrations.fast_steps.FastStepsPlugin`. Dataset types: a recipe names the
package as a dataset's `type:`, e.g. `type: integrations.passage_start`.
"""
