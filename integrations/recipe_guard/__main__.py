"""`python -m integrations.recipe_guard RECIPE...`: check recipes before training."""

from integrations.recipe_guard.checks import main

raise SystemExit(main())
