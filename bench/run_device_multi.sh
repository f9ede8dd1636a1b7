#!/usr/bin/env bash
# bench/run_device_multi.sh - one call on a machine with 2+ GPUs: single-GPU variants side by side
# (one lane of variants per GPU, each configuration alone on its GPU), then one configuration
# data-parallel over several GPUs, then a check that the adapters those runs saved load in peft.
#
# Run from the repository root, with what bench/run_device.sh needs (its header lists it):
#   OUT=/tmp/bench-out bash bench/run_device_multi.sh
# Settings (environment, all optional):
#   LANES="a,b|c,d"        single-GPU variant lists, list i on GPU i (phase A)
#   PHASE_A_S=300          budget of phase A, seconds after setup
#   MULTI_VARIANTS=recipe  variants run on MULTI_GPUS GPUs at once (phase B; empty: no phase B)
#   MULTI_RECIPE=recipes/mistral-qlora.yml   MULTI_GPUS=2   PHASE_B_S=130
#   WARMUP=3 STEPS=30      steps per run (30 measured steps cross an epoch boundary)
# $OUT receives: env.txt, throughput.jsonl (every run's summary line), steps.jsonl (every step),
# profiles.txt (BENCH_PROFILE_STEP), runs.log, adapters.json, summary.txt (the tables).
# SCRATCH=/tmp/bench-multi holds each phase's own results, work and logs; SITE=/tmp/site the wheels.
set -uo pipefail
: "${OUT:?OUT must be set}"
LANES=${LANES:-"notebook,recipe,previous_recipe|bnb_paged_adamw,default_dataloader"}
PHASE_A_S=${PHASE_A_S:-300}
MULTI_VARIANTS=${MULTI_VARIANTS-recipe}
MULTI_RECIPE=${MULTI_RECIPE:-recipes/mistral-qlora.yml}
MULTI_GPUS=${MULTI_GPUS:-2}
PHASE_B_S=${PHASE_B_S:-130}
export WARMUP=${WARMUP:-3} STEPS=${STEPS:-30}
export MODEL_DIR=${MODEL_DIR:-/tmp/mistral-7b-random}
# every run gets the project's environment, multicast NVLink off included (core/launch.py)
SCRATCH=${SCRATCH:-/tmp/bench-multi}  # each phase's results, work and logs
SITE=${SITE:-/tmp/site}
mkdir -p "$SCRATCH" "$OUT"
T0=$(date +%s)

SETUP_ONLY=1 SITE=$SITE OUT=$SCRATCH/out-setup bash bench/run_device.sh || exit 1
cp "$SCRATCH/out-setup/env.txt" "$OUT/env.txt"
if [[ ${INSTALL_WHEELS:-1} != 0 ]]; then
  export INSTALL_WHEELS=0 PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
fi
echo "[multi] setup done after $(( $(date +%s) - T0 )) s"

# a first guess of each run's cost for the time guard, until a run of its kind has finished
ESTIMATES=(--estimate-s 90 110 60)
LANES="$LANES" OUT=$SCRATCH/out-lanes WORK_DIR=$SCRATCH/runs-lanes BUDGET_S=$PHASE_A_S \
  bash bench/run_device.sh "${ESTIMATES[@]}" > "$SCRATCH/lanes.stdout" 2>&1
echo "[multi] phase A (lanes) done after $(( $(date +%s) - T0 )) s"

if [[ -n $MULTI_VARIANTS ]]; then
  LANES= VARIANTS=$MULTI_VARIANTS GPUS=$MULTI_GPUS RECIPE=$MULTI_RECIPE OUT=$SCRATCH/out-multi \
    WORK_DIR=$SCRATCH/runs-multi BUDGET_S=$PHASE_B_S bash bench/run_device.sh "${ESTIMATES[@]}" \
    > "$SCRATCH/multi.stdout" 2>&1
  echo "[multi] phase B ($MULTI_GPUS GPUs) done after $(( $(date +%s) - T0 )) s"
fi

# The adapter a data-parallel run saved must load in peft with the expected LoRA shapes.
: > "$SCRATCH/adapters.jsonl"
for out_dir in "$SCRATCH"/runs-multi/*/out; do  # the data-parallel run's adapter(s)
  [[ -f $out_dir/adapter_config.json ]] || continue
  python3 -m bench.check_adapter "$out_dir" --model "$MODEL_DIR" --out "$SCRATCH/adapter.json" \
    > "$SCRATCH/adapter.stdout" 2>&1
  python3 - "$out_dir" "$?" "$SCRATCH/adapter.json" >> "$SCRATCH/adapters.jsonl" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[3])
result = json.loads(path.read_text()) if path.is_file() else {}
print(json.dumps({"run": sys.argv[1], "exit": int(sys.argv[2]), **result}))
PY
  rm -f "$SCRATCH/adapter.json"
done
python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  "$SCRATCH/adapters.jsonl" > "$OUT/adapters.json"

for part in lanes multi; do
  [[ -d $SCRATCH/out-$part ]] || continue
  cat "$SCRATCH/out-$part"/throughput.jsonl >> "$OUT/throughput.jsonl" 2>/dev/null
  cat "$SCRATCH/out-$part"/steps.jsonl >> "$OUT/steps.jsonl" 2>/dev/null
  cat "$SCRATCH/out-$part"/profiles.txt >> "$OUT/profiles.txt" 2>/dev/null
  cat "$SCRATCH/out-$part"/runs.log >> "$OUT/runs.log" 2>/dev/null
  { echo "===== $part"; tail -n 20 "$SCRATCH/$part.stdout"; } >> "$OUT/summary.txt"
done
python3 -m bench.train_throughput --table "$OUT/throughput.jsonl" | tee -a "$OUT/summary.txt"
echo "[multi] done in $(( $(date +%s) - T0 )) s; adapters: $(grep -c '"exit": 0' "$SCRATCH/adapters.jsonl") loaded ok of $(wc -l < "$SCRATCH/adapters.jsonl")"
