"""Plugin options shared by the packages here: on/off switches in a recipe, on by default.

Each plugin's `args.py` declares its switches with `switch(description)` in a pydantic model that
Axolotl merges into its config schema (so the keys are known, typed and documented); the plugin
reads them with `enabled(cfg, name)`, which also works on the raw recipe Axolotl hands to
`register()` before validation (an absent key is on).
"""

from __future__ import annotations

from pydantic import Field


def switch(description: str):
    """A boolean option, on by default, with its description in the schema."""
    return Field(default=True, json_schema_extra={"description": description})


def enabled(cfg, name: str) -> bool:
    """A switch's value in a raw or validated config: absent (or null) means on."""
    value = cfg.get(name)
    return True if value is None else bool(value)
