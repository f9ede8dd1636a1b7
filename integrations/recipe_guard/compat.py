"""Start-up checks of the Axolotl internals this plugin patches.

Each fix that replaces a private method (or relies on the order of Axolotl's calls) is written
against the pinned Axolotl. Before patching, `patch_target` checks that the method exists and
that either Axolotl is the pinned version or the method's signature still has the parameters
the wrapper binds; otherwise training stops with one line naming the method, the versions and
the option that turns the fix off, instead of the fix doing nothing without a word.
The fixes (resume.py, saving.py) call `patch_target`; the plugin checks every target the recipe's
options need in `register()`, before the model is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from core.errors import UserError
from core.pins import pinned

NAME = "integrations.recipe_guard.RecipeGuardPlugin"
PINNED_AXOLOTL = pinned("axolotl")  # the version pyproject.toml installs


def axolotl_version() -> str:
    import axolotl

    return getattr(axolotl, "__version__", "unknown")


def patch_target(owner, name: str, params: tuple[str, ...], option: str) -> Callable:
    """`owner.name` (a method of a class or an instance), checked as described above."""
    version = axolotl_version()
    where = f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"
    fix = f"pin axolotl=={PINNED_AXOLOTL} or set `{option}: false`"
    method = getattr(owner, name, None)
    if not callable(method):
        raise UserError(f"{NAME}: axolotl {version} has no {where}, which `{option}` patches "
                        f"(written against axolotl {PINNED_AXOLOTL}): {fix}")
    if version == PINNED_AXOLOTL or not params:
        return method
    try:
        have = set(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        have = set()
    missing = [p for p in params if p not in have]
    if missing:
        raise UserError(f"{NAME}: {where} of axolotl {version} has no parameter(s) "
                        f"{', '.join(missing)}, which `{option}` relies on (written against "
                        f"axolotl {PINNED_AXOLOTL}): {fix}")
    return method
