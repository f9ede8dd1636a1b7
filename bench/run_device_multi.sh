#!/usr/bin/env bash
# bench/run_device_multi.sh - one call on a 2-GPU machine: the single-GPU comparison (notebook vs
# recipe vs the 80 GB profile) on GPU 0 while the FSDP2 recipe runs on GPU 1 alone, then the FSDP2
# recipe on both GPUs, then a check that the adapter the sharded run saved loads with peft.
#
# Device call (repo root, carrying .whl, data/prepared, models/mistral-tokenizer):
#   bash bench/run_device_multi.sh            (timeout_s 600)
# $OUT receives: single.tgz, fsdp1.tgz, fsdp2.tgz (each run_device.sh's files), fsdp2-adapter.json,
# summary.txt (all tables).
set -uo pipefail
: "${OUT:?OUT must be set}"
PHASE_A_S=${PHASE_A_S:-300}   # budget of each single/FSDP-1 lane after setup
PHASE_B_S=${PHASE_B_S:-170}   # budget of the 2-GPU run
export MODEL_DIR=${MODEL_DIR:-/tmp/mistral-7b-random}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

SETUP_ONLY=1 OUT=/tmp/out-setup bash bench/run_device.sh || exit 1
cp /tmp/out-setup/env.txt "$OUT/env.txt"
export INSTALL_WHEELS=0 PYTHONPATH=/tmp/site

CUDA_VISIBLE_DEVICES=0 OUT=/tmp/out-single WORK_DIR=/tmp/runs-single VARIANTS=notebook,recipe,mbs2 \
  BUDGET_S=$PHASE_A_S bash bench/run_device.sh > /tmp/single.stdout 2>&1 &
single=$!
CUDA_VISIBLE_DEVICES=1 OUT=/tmp/out-fsdp1 WORK_DIR=/tmp/runs-fsdp1 VARIANTS=recipe GPUS=1 \
  RECIPE=recipes/mistral-qlora-fsdp.yml BUDGET_S=$PHASE_A_S bash bench/run_device.sh \
  > /tmp/fsdp1.stdout 2>&1 &
fsdp1=$!
wait $single; wait $fsdp1

OUT=/tmp/out-fsdp2 WORK_DIR=/tmp/runs-fsdp2 VARIANTS=recipe GPUS=2 \
  RECIPE=recipes/mistral-qlora-fsdp.yml BUDGET_S=$PHASE_B_S bash bench/run_device.sh \
  > /tmp/fsdp2.stdout 2>&1
python3 -m bench.check_adapter /tmp/runs-fsdp2/recipe/out --model "$MODEL_DIR" \
  --out "$OUT/fsdp2-adapter.json" > /tmp/adapter.stdout 2>&1 || cat /tmp/adapter.stdout

for part in single fsdp1 fsdp2; do
  cp /tmp/$part.stdout /tmp/out-$part/stdout.txt 2>/dev/null
  # results, step records and logs only: run dirs also hold adapters, datasets and tokenizers
  tar czf "$OUT/$part.tgz" -C /tmp "out-$part" 2>/dev/null
  { echo "===== $part"; tail -n 15 /tmp/$part.stdout; } >> "$OUT/summary.txt"
done
cat "$OUT/summary.txt"
