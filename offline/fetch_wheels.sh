#!/usr/bin/env bash
# offline/fetch_wheels.sh DEST --python X.Y [--small] [--no-liger]
#
# On a machine with pip access to PyPI: the wheels a GPU box WITHOUT internet needs to train,
# evaluate and merge with this repository (`python -m gpu_check`, bench/run_device.sh), for the
# box's Python X.Y on manylinux x86_64. The box must already have a CUDA build of torch and the
# usual packages of a CUDA/PyTorch image: transformers, tokenizers, sentencepiece, safetensors,
# numpy, pandas, pyarrow, matplotlib, pyyaml, requests, tqdm, psutil, pytest. Everything here is
# pinned and fetched with --no-deps (axolotl's own ~60 requirements include gradio, modal,
# lm_eval, ... that no command of this repository imports). offline/README.md is the whole way.
#
# What it covers (the imports of each command):
#   axolotl train / merge-lora   python -m axolotl.cli.train|merge_lora (QLoRA, sdpa, Liger)
#   python -m eval               peft, bitsandbytes (nf4), matplotlib (the image's)
#   python -m data_prep          the Mistral-7B tokenizer file of mistral-common (see --small)
# Versions: axolotl and mistral-common as pyproject.toml pins them (read from it); the rest at
# axolotl's own pins (transformers 5.16.1, peft 0.20.0, accelerate 1.13.0, huggingface_hub
# 1.17.0: on PYTHONPATH they shadow other versions in the image). tokenizers: the image's
# (transformers 5.16.1 accepts >=0.23.1,<0.24). axolotl-contribs-lgpl / -mit are sdist-only on
# PyPI: built here into pure-python wheels.
#
# wandb and mistral-common are NOT fetched by default: axolotl imports wandb at module level,
# and the Mistral tokenizer file comes from mistral-common, so the box's image must have both
# (offline/install.sh checks, and says so in one line). --small instead carries stand-ins, and
# says so wherever they are installed (offline/install.sh prints it):
#   * wandb 0.0.0+axolotlstub: import-only (no `run`, so transformers' is_wandb_available() is
#     False; any other use raises "wandb is an import-only stub"): do not set wandb_project.
#   * mistral_common 0.0.0+tokenizeronly: only mistral_common/data/tokenizer.model.v1 of
#     mistral-common (the file data_prep and the model builder read); its version is below what
#     transformers needs for its own mistral-common integration, so transformers never uses it.
#   * bitsandbytes repacked with one CUDA library (BNB_CUDA, default cuda130 for torch cu130)
#     and the CPU one: ~3.4 MiB instead of 43 MiB; set BNB_CUDA=cuda128 (etc.) for another CUDA.
# With --small the set is ~24 MiB (checked below 40 MiB); without it, about 65 MiB.
#
# Then copy DEST along with the checkout and, on the box, from the checkout's root:
#   bash offline/install.sh DEST          # all wheels in ONE pip call (axolotl and the contribs
#                                         # wheels share the axolotl/ package directory)
#   bash offline/run.sh python3 -m gpu_check --launcher python
set -euo pipefail

usage="usage: offline/fetch_wheels.sh DEST --python X.Y [--small] [--no-liger]"
DEST=${1:?$usage}
shift
PYVER="" SMALL=0 WITH_LIGER=1
while (( $# )); do
  case $1 in
    --python) PYVER=${2:?$usage}; shift ;;
    --small) SMALL=1 ;;
    --no-liger) WITH_LIGER=0 ;;
    *) echo "error: unknown option $1; $usage" >&2; exit 2 ;;
  esac
  shift
done
[[ $PYVER =~ ^3\.[0-9]+$ ]] || { echo "error: --python X.Y (the GPU box's Python, e.g. 3.12) is required; $usage" >&2; exit 2; }
ABI=cp${PYVER/./}
HERE=$(cd "$(dirname "$0")/.." && pwd)
pin() {  # pin NAME: the version pyproject.toml pins NAME to
  sed -nE "s/.*\"$1(\\[[^]]*\\])?==([^\";, ]+)\".*/\\2/p" "$HERE/pyproject.toml" | head -n 1
}
AXOLOTL=$(pin axolotl) MISTRAL_COMMON=$(pin mistral-common)
[[ -n $AXOLOTL && -n $MISTRAL_COMMON ]] || { echo "error: $HERE/pyproject.toml pins no axolotl or mistral-common" >&2; exit 2; }
PY=${PYTHON:-python3}
BNB_CUDA=${BNB_CUDA:-cuda130}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PIPDL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER"
       --implementation cp --abi "$ABI" --abi abi3 --abi none
       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

# name==version  # why it is needed (the import that fails without it)
PINS=(
  "axolotl==$AXOLOTL"          # the framework (pyproject.toml's pin)
  transformers==5.16.1         # axolotl's pin
  peft==0.20.0                 # axolotl's pin
  accelerate==1.13.0           # axolotl's pin
  huggingface_hub==1.17.0      # axolotl's pin
  datasets==4.8.4              # axolotl.common.datasets / axolotl.utils.data
  dill==0.4.1                  # datasets (<0.4.2)
  multiprocess==0.70.19        # datasets (<0.70.20)
  trl==1.9.0                   # axolotl.core.trainers
  bitsandbytes==0.50.2         # load_in_4bit, paged_adamw_8bit (repacked below)
  pydantic==2.12.5             # axolotl.utils.schemas
  pydantic-core==2.41.5        # pydantic 2.12.5's exact pin
  annotated-types==0.7.0       # pydantic
  typing-inspection==0.4.2     # pydantic
  fire==0.7.1                  # axolotl.cli.train / merge_lora
  termcolor==3.3.0             # fire
  addict==2.4.0                # axolotl.utils.dict
  python-dotenv==1.0.1         # axolotl.cli.main
  posthog==6.7.11              # axolotl.telemetry.manager (imported even with telemetry off)
  backoff==2.2.1               # posthog
  distro==1.9.0                # posthog
  fastcore==2.2.41             # axolotl.utils.model_shard_quant
  evaluate==0.4.1              # axolotl.utils.callbacks
)
[[ $WITH_LIGER == 1 ]] && PINS+=(liger-kernel==0.8.1)   # axolotl.integrations.liger (Triton)

for pin in "${PINS[@]}"; do
  "${PIPDL[@]}" -d "$DEST" "$pin"
done

# sdist-only packages -> pure-python wheels
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$WORK/sdist" \
  axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6
"$PY" -m pip wheel -q --no-deps -w "$DEST" "$WORK"/sdist/*.tar.gz

if [[ $SMALL == 1 ]]; then
  # the stand-ins and the repacked bitsandbytes described in the header
  "${PIPDL[@]}" -d "$WORK/mc" "mistral-common==$MISTRAL_COMMON"
  "$PY" - "$DEST" "$WORK" "$BNB_CUDA" "$MISTRAL_COMMON" <<'PY'
"""--small: repack bitsandbytes; write the wandb and mistral-common stand-in wheels."""
import base64
import glob
import hashlib
import os
import sys
import zipfile

dest, work, bnb_cuda, mistral_common = sys.argv[1:5]


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def write_wheel(name, version, files, summary):
    dist = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                 f"Version: {version}\nSummary: {summary}\n").encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: offline/fetch_wheels.sh --small\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    lines = [record_line(p, d) for p, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(lines) + "\n").encode()
    path = os.path.join(dest, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for p, d in files.items():
            z.writestr(p, d)
    print(f"wrote {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.2f} MiB)")


# bitsandbytes: keep one CUDA library and the CPU one
(src,) = glob.glob(os.path.join(dest, "bitsandbytes-0.50.2-*.whl"))
keep = (f"libbitsandbytes_{bnb_cuda}.so", "libbitsandbytes_cpu.so")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    names = [n for n in zin.namelist()
             if not (os.path.basename(n).startswith("libbitsandbytes_")
                     and os.path.basename(n) not in keep)]
    if not any(os.path.basename(n) == keep[0] for n in names):
        sys.exit(f"error: {keep[0]} is not in {os.path.basename(src)} (BNB_CUDA={bnb_cuda})")
    rec = next(n for n in names if n.endswith(".dist-info/RECORD"))
    for n in names:
        if n != rec:
            zout.writestr(zin.getinfo(n), zin.read(n))
    lines = [line for line in zin.read(rec).decode().splitlines() if line.split(",")[0] in names]
    zout.writestr(rec, "\n".join(lines) + "\n")
os.replace(tmp, src)
print(f"repacked {os.path.basename(src)} ({os.path.getsize(src) / 2**20:.1f} MiB, {keep[0]})")

# wandb: import-only stub
write_wheel("wandb", "0.0.0+axolotlstub", {"wandb/__init__.py": b'''"""Import-only stand-in
for wandb (offline/fetch_wheels.sh --small): axolotl imports it at module level but only uses it when
wandb_project is set. It defines no `run`, so transformers' is_wandb_available() is False."""
__version__ = "0.0.0+axolotlstub"


def __getattr__(attr):
    raise AttributeError(f"wandb is an import-only stub here (wandb.{attr}); unset wandb_project")
'''}, "import-only stub")

# mistral-common: the package's __init__.py and the Mistral-7B-v0.1 tokenizer file only
(mc,) = glob.glob(os.path.join(work, "mc", f"mistral_common-{mistral_common}-*.whl"))
with zipfile.ZipFile(mc) as z:
    files = {p: z.read(p) for p in ("mistral_common/__init__.py",
                                    "mistral_common/data/tokenizer.model.v1")}
write_wheel("mistral_common", "0.0.0+tokenizeronly", files,
            f"mistral-common {mistral_common} reduced to the Mistral-7B-v0.1 tokenizer file")
PY
fi

# one version of each package, and the size check
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[[ -z "$dups" ]] || { echo "error: several versions of: $dups (pip install would fail)" >&2; exit 1; }
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -la "$DEST"
echo "total: $((total / 1048576)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels"
(( SMALL == 0 || total < 40 * 1048576 )) || { echo "error: over 40 MiB of wheels with --small" >&2; exit 1; }
