"""`python -m eval RECIPE_OR_RUN_DIR`: perplexity, generations and report with one model load."""

from eval.pipeline import main

raise SystemExit(main())
