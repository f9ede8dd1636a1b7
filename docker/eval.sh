#!/usr/bin/env bash
# Evaluate the adapter a recipe trained: perplexity (base vs adapter), generations, then the report.
#
#   RECIPE=recipes/mistral-qlora.yml bash docker/eval.sh    # what `docker compose run --rm eval` runs
#
# The work is `python -m eval RECIPE` (one model load; the same entry point `make demo` uses): the
# base model, run directory (output_dir), held-out data, training data for the memorisation check,
# special tokens and 4-bit loading all come from the recipe (core/runs.py), so another RECIPE needs
# no other change. Extra arguments are passed on (e.g. `--max-new-tokens 30`).
set -euo pipefail

recipe="${RECIPE:-recipes/mistral-qlora.yml}"
set -x
exec python -m eval "$recipe" "$@"
