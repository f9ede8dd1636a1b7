#!/usr/bin/env bash
# Evaluate the adapter a recipe trained: perplexity (base vs adapter), generations, then the report.
#
#   RECIPE=recipes/mistral-qlora.yml bash docker/eval.sh    # what `docker compose run --rm eval` runs
#
# This file is the one place the eval service's commands live, and works outside docker too.
# The base model, run directory (output_dir), held-out data (first test_datasets path), training
# data (first datasets path, for the memorisation check) and 4-bit loading are read from the
# recipe itself, so another RECIPE needs no other change.
set -euo pipefail

recipe="${RECIPE:-recipes/mistral-qlora.yml}"
if [[ ! -f "$recipe" ]]; then
    echo "eval.sh: RECIPE=$recipe: no such file in $(pwd)" >&2
    exit 2
fi

mapfile -t fields < <(python - "$recipe" <<'PY'
import sys

import yaml

with open(sys.argv[1], encoding="utf-8") as handle:
    cfg = yaml.safe_load(handle) or {}
tests = cfg.get("test_datasets") or [{}]
trains = cfg.get("datasets") or [{}]
print(cfg.get("base_model") or "")
print(cfg.get("output_dir") or "")
print(tests[0].get("path") or "data/prepared/clean/eval.jsonl")
print(trains[0].get("path") or "data/prepared/clean/train.jsonl")
print("yes" if cfg.get("load_in_4bit") else "no")
PY
)
if [[ ${#fields[@]} -ne 5 || -z "${fields[0]}" || -z "${fields[1]}" ]]; then
    echo "eval.sh: $recipe: could not read base_model and output_dir from it" >&2
    exit 2
fi
base_model="${fields[0]}"
run_dir="${fields[1]}"
eval_data="${fields[2]}"
train_data="${fields[3]}"
quantise=()
if [[ "${fields[4]}" == "yes" ]]; then
    quantise=(--load-in-4bit)
fi

if [[ ! -f "$run_dir/adapter_config.json" ]]; then
    echo "eval.sh: $run_dir/adapter_config.json not found: train first" \
         "(docker compose up train, or axolotl train $recipe)" >&2
    exit 2
fi

set -x
python -m eval.perplexity --model "$base_model" --adapter "$run_dir" --data "$eval_data" \
    --compare "${quantise[@]}"
python -m eval.generate --model "$base_model" --adapter "$run_dir" --train "$train_data" \
    "${quantise[@]}"
python -m eval.report "$run_dir"
