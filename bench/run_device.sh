#!/usr/bin/env bash
# bench/run_device.sh - the benchmark's one command on a GPU box: install the wheels copied along
# (offline/install.sh), build a random-init Mistral-7B, run the notebook baseline, the recipe and
# its variants (under a time budget if BUDGET_S is set), and leave the results in $OUT.
#
# The GPU box needs a CUDA build of torch and the usual packages of a CUDA/PyTorch image; the
# rest comes as wheels (offline/README.md: the way for a box without internet). On a machine
# with this repository and PyPI access, prepare:
#   .whl                      <- bash offline/fetch_wheels.sh .whl --python X.Y [--small]
#   data/prepared             <- python -m data_prep --mode both
#   models/mistral-tokenizer  <- python -m bench.build_random_mistral --tokenizer-only \
#                                    --out models/mistral-tokenizer          (3.5 MB; the GPU
#                                box needs no mistral_common package then)
# copy the repository with those three folders to the GPU box (rsync, scp, a shared disk), and
# there, from the repository root:
#   OUT=/tmp/bench-out BUDGET_S=510 bash bench/run_device.sh   (ends itself by ~BUDGET_S + 20 s)
# Without those folders it stops with one line saying which is missing and how to make it. With
# the packages installed already (pip install -e . on the GPU box), set INSTALL_WHEELS=0.
#
# Environment knobs (all optional):
#   VARIANTS=notebook,recipe,...  (default: bench/variants.py DEFAULT_VARIANTS)
#   LANES="a,b|c,d"  run variant lists in parallel, list i on GPU i (replaces VARIANTS)
#   OUT=outputs/bench-<date>   where the results go
#   BUDGET_S=SECONDS  from this script's start, by which the last run must end (default: none)
#   GPUS=1           GPUs for the axolotl runs (torchrun, one process each)
#   RECIPE=recipes/mistral-qlora.yml   WARMUP=3   STEPS=10
#   TOKENIZER_DIR=models/mistral-tokenizer (falls back to models/tiny-mistral)
#   MODEL_DIR=/tmp/mistral-7b-random   (kept if already built on this machine)
#   WORK_DIR=/tmp/bench-runs   PYTHON=python3   SITE=/tmp/site (where the wheels are installed)
#   INSTALL_WHEELS=0 / BUILD_ARGS="--tiny --device cpu"   (CPU smoke test of this script)
#   SETUP_ONLY=1     stop after installing the wheels and building the model
#   TIME_TO_ADAPTER="recipes/mistral-qlora.yml,recipes/mistral-qlora.yml+key=yaml+key=yaml"
#                    before the variants: each recipe run as users run it (`axolotl train`,
#                    evaluations and checkpoints as written; +key=yaml overrides), timed part by
#                    part (bench/time_to_adapter.py) into $OUT/time_to_adapter.jsonl
#   COMPILE_PYC=1    byte-compile the installed wheels first (as pip does without --no-compile)
#   BENCH_PROFILE_STEP=N BENCH_PROFILE_VARIANTS=a,b  torch profile of step N of those variants
#                    (BENCH_PROFILE_TRACE=1: its trace too, $OUT/trace-<variant>.json.gz, and
#                    where the GPU sat idle; BENCH_SYNC_STEP=M: what made the host wait for the
#                    GPU in step M, $OUT/syncs.txt; bench/step_recorder.py)
#   STARTUP_PROFILE=1  time the imports of each process `axolotl train` starts ($OUT/startup.txt)
# Extra arguments go to `python -m bench.train_throughput` (e.g. --set key=value).
#
# Files left in $OUT: env.txt, build.log, throughput.jsonl (one summary line per variant),
# steps.jsonl (every per-step record), runs.log (all run logs), profiles.txt, syncs.txt,
# eval-perplexity.json. The table is printed last.
set -uo pipefail

T0=$(date +%s)
BUDGET_S=${BUDGET_S:-}
OUT=${OUT:-outputs/bench-$(date +%F)}
MODEL_DIR=${MODEL_DIR:-/tmp/mistral-7b-random}
WORK_DIR=${WORK_DIR:-/tmp/bench-runs}
# Only what this call wrote goes to $OUT: on a machine kept warm between calls WORK_DIR still holds
# the step records of earlier calls' variants.
mkdir -p "$WORK_DIR" && STARTED_MARK=$(mktemp "$WORK_DIR/.started.XXXXXX")
this_calls() {  # $1 = directory, $2 = file name pattern[, $3 = depth]: its files written since this script began
  find "$1" -maxdepth "${3:-2}" -name "$2" -newer "$STARTED_MARK" -type f 2>/dev/null | sort
}
PYTHON=${PYTHON:-python3}
RECIPE=${RECIPE:-recipes/mistral-qlora.yml}
GPUS=${GPUS:-1}
WARMUP=${WARMUP:-3}
STEPS=${STEPS:-10}
# exit statuses as everywhere here (core/errors.py): 2 a missing input, 1 a step that failed
fail() { echo "error: $*" >&2; exit 2; }
die() { echo "error: $*" >&2; exit 1; }

# -- what must have been copied along ---------------------------------------------------------
[[ -f bench/run_device.sh ]] || fail "run from the repository root (bench/run_device.sh not found)"
for mode in clean seed; do
  [[ -s data/prepared/$mode/train.jsonl ]] || fail "data/prepared/$mode/train.jsonl missing: run" \
    "\`python -m data_prep --mode $mode\` where the repository has PyPI access and copy data/prepared"
done
[[ ${INSTALL_WHEELS:-1} == 0 ]] || compgen -G ".whl/*.whl" >/dev/null || fail ".whl/*.whl missing: run" \
  "\`bash offline/fetch_wheels.sh .whl --python X.Y\` where there is PyPI access and copy .whl (or INSTALL_WHEELS=0)"
if [[ -z ${TOKENIZER_DIR:-} ]]; then
  TOKENIZER_DIR=models/mistral-tokenizer
  [[ -f $TOKENIZER_DIR/tokenizer.json || ! -f models/tiny-mistral/tokenizer.json ]] \
    || TOKENIZER_DIR=models/tiny-mistral
fi
[[ -f $TOKENIZER_DIR/tokenizer.json ]] || fail "$TOKENIZER_DIR/tokenizer.json missing: run" \
  "\`python -m bench.build_random_mistral --tokenizer-only --out models/mistral-tokenizer\`" \
  "where the repository has PyPI access and copy models/mistral-tokenizer"
[[ -f $RECIPE ]] || fail "$RECIPE missing (commit the recipe or set RECIPE=...)"
mkdir -p "$OUT" || fail "cannot create OUT=$OUT"

# -- packages -----------------------------------------------------------------------------
if [[ ${INSTALL_WHEELS:-1} != 0 ]]; then
  SITE=${SITE:-/tmp/site}
  # COMPILE_PYC=1: byte-compiled as `pip install` does by default (start-up timings)
  PYTHON=$PYTHON bash offline/install.sh .whl "$SITE" || die "installing .whl/*.whl failed (above)"
  export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH  # axolotl, accelerate commands
fi
# the runs themselves get the project's environment from the runners (core/launch.py)
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1

{
  date -u +"%F %T UTC"; git rev-parse --short HEAD 2>/dev/null
  nvidia-smi --query-gpu=index,name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
  "$PYTHON" - <<'PY'
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpus", torch.cuda.device_count(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(" | ".join(f"{n} {version(n)}" for n in ("transformers", "peft", "accelerate", "axolotl",
      "bitsandbytes", "datasets", "trl", "liger-kernel", "triton", "tokenizers")))
PY
  free -g | head -2; df -h /tmp | tail -1; nproc
} 2>&1 | tee "$OUT/env.txt"

# -- the model ----------------------------------------------------------------------------
# shellcheck disable=SC2086 - BUILD_ARGS is a list of words
"$PYTHON" -m bench.build_random_mistral --out "$MODEL_DIR" --tokenizer-from "$TOKENIZER_DIR" \
  ${BUILD_ARGS:-} 2>&1 | tee "$OUT/build.log"
[[ ${PIPESTATUS[0]} == 0 ]] || die "building the random Mistral-7B failed (see build.log)"
echo "[run_device] setup done after $(( $(date +%s) - T0 )) s"
[[ ${SETUP_ONLY:-0} == 1 ]] && exit 0

# -- start-up and time to adapter ---------------------------------------------------------
if [[ ${STARTUP_PROFILE:-0} == 1 ]]; then
  for module in axolotl.cli.main accelerate.commands.launch axolotl.cli.train; do
    start=$EPOCHREALTIME
    "$PYTHON" -c "import $module" >/dev/null 2>&1
    awk -v a="$start" -v b="$EPOCHREALTIME" -v m="$module" 'BEGIN { printf "import %s: %.2f s\n", m, b - a }'
  done | tee "$OUT/startup.txt"
  for module in axolotl.cli.main accelerate.commands.launch; do
    "$PYTHON" -X importtime -c "import $module" 2>&1 | grep "import time" | sort -t'|' -k2 -n -r \
      | head -25 >> "$OUT/startup.txt"
  done
fi
if [[ -n ${TIME_TO_ADAPTER:-} ]]; then
  IFS=',' read -r -a tta_runs <<< "$TIME_TO_ADAPTER"
  for i in "${!tta_runs[@]}"; do
    IFS='+' read -r -a words <<< "${tta_runs[$i]}"
    sets=()
    for kv in "${words[@]:1}"; do sets+=(--set "$kv"); done
    label="$(basename "${words[0]}" .yml)-$i"
    BENCH_PROFILE_LOAD=${PROFILE_LOAD:-0} timeout "${TTA_TIMEOUT_S:-300}" "$PYTHON" -m bench.time_to_adapter --model "$MODEL_DIR" \
      --recipe "${words[0]}" --label "$label" "${sets[@]}" --work-dir "$WORK_DIR/tta" \
      --results "$OUT/time_to_adapter.jsonl"
    cp "$WORK_DIR/tta/$label/timeline.jsonl" "$OUT/tta-$label.timeline.jsonl" 2>/dev/null
    cp "$WORK_DIR/tta/$label/timeline.load-profile.txt" "$OUT/tta-$label.load-profile.txt" \
      2>/dev/null
    cp "$WORK_DIR/tta/$label/log.txt" "$OUT/tta-$label.log.txt" 2>/dev/null
  done
fi

# -- the runs ----------------------------------------------------------------------------
# LANES="a,b|c,d" runs each |-separated list of variants in parallel, lane i on GPU i (single-GPU
# variants only): twice the configurations per call on a 2-GPU machine, each timed on its own GPU.
run_variants() {  # $1 = variant list ('' = default), $2 = results, $3 = work dir, $4 = log
  local variants_arg=()
  [[ -n $1 ]] && variants_arg=(--variants "$1")
  local deadline=()
  [[ -n $BUDGET_S ]] && deadline=(--deadline-unix $(( T0 + BUDGET_S )))
  "$PYTHON" -m bench.train_throughput --model "$MODEL_DIR" --recipe "$RECIPE" "${variants_arg[@]}" \
    --gpus "$GPUS" --warmup "$WARMUP" --steps "$STEPS" "${deadline[@]}" \
    --results "$2" --work-dir "$3" --log "$4" "${EXTRA_ARGS[@]}"
}
EXTRA_ARGS=("$@")
if [[ -n ${LANES:-} ]]; then
  IFS='|' read -r -a lanes <<< "$LANES"
  pids=()
  for i in "${!lanes[@]}"; do
    mkdir -p "$WORK_DIR/lane$i"
    CUDA_VISIBLE_DEVICES=$i run_variants "${lanes[$i]}" "$WORK_DIR/lane$i/throughput.jsonl" \
      "$WORK_DIR/lane$i" "$WORK_DIR/lane$i.log" > "$WORK_DIR/lane$i.stdout" 2>&1 &
    pids+=($!)
  done
  rc=0
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  for i in "${!lanes[@]}"; do
    cat "$WORK_DIR/lane$i/throughput.jsonl" >> "$OUT/throughput.jsonl" 2>/dev/null
    this_calls "$WORK_DIR/lane$i" 'steps.rank*.jsonl' | xargs -r cat >> "$OUT/steps.jsonl"
    { echo "===== lane $i (GPU $i): ${lanes[$i]}"; cat "$WORK_DIR/lane$i.stdout"; } >> "$OUT/runs.log"
  done
  [[ -f $OUT/throughput.jsonl ]] && "$PYTHON" -m bench.train_throughput --table "$OUT/throughput.jsonl"
else
  run_variants "${VARIANTS:-}" "$OUT/throughput.jsonl" "$WORK_DIR" "$OUT/runs.log"
  rc=$?
  this_calls "$WORK_DIR" 'steps.rank*.jsonl' | xargs -r cat > "$OUT/steps.jsonl"
fi
this_calls "$WORK_DIR" steps.rank0.profile.txt 3 | xargs -r cat > "$OUT/profiles.txt"
[[ -s $OUT/profiles.txt ]] || rm -f "$OUT/profiles.txt"
this_calls "$WORK_DIR" steps.rank0.syncs.txt 3 | xargs -r cat > "$OUT/syncs.txt"
[[ -s $OUT/syncs.txt ]] || rm -f "$OUT/syncs.txt"
for f in $(this_calls "$WORK_DIR" steps.rank0.trace.json.gz 3); do
  cp "$f" "$OUT/trace-$(basename "$(dirname "$f")").json.gz"
done
for f in "$WORK_DIR"/eval_ppl*/eval/perplexity.json "$WORK_DIR"/lane*/eval_ppl*/eval/perplexity.json; do
  [[ $f -nt $STARTED_MARK ]] && cp "$f" "$OUT/eval-perplexity.json" && break
done
echo "[run_device] done in $(( $(date +%s) - T0 )) s (exit $rc); files: $(ls "$OUT" | tr '\n' ' ')"
exit $rc
