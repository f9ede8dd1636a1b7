#!/usr/bin/env bash
# bench/fetch_gpu_wheels.sh DEST [--no-liger]
#
# Downloads, on a machine with pip access to PyPI, the wheels that `python -m bench.gpu_check`
# (and bench/run_device.sh) need on an offline GPU box that already has Python 3.12 with a CUDA
# build of torch, transformers, tokenizers, sentencepiece, safetensors, numpy, pandas, pyarrow,
# matplotlib, pyyaml, requests, tqdm, psutil and pytest (a typical CUDA/PyTorch image), but
# none of axolotl, bitsandbytes, datasets, trl, pydantic, mistral-common. Everything is pinned,
# py3.12 / manylinux x86_64, fetched with --no-deps; the set is small enough (~24 MiB) to copy
# along with the repository.
#
# What it covers (the imports of each stage of the GPU check):
#   axolotl train / merge-lora   python -m axolotl.cli.train|merge_lora (QLoRA, sdpa, Liger)
#   python -m data_prep          the Mistral-7B tokenizer file (see mistral-common below)
#   python -m eval               peft, bitsandbytes (nf4), matplotlib (the image's)
#   bench.build_random_mistral   transformers, the tokenizer as above
# Of axolotl's ~60 declared requirements only the ones imported on these paths are fetched;
# gradio, modal, lm_eval, torchao, kernels, optimum, xformers, flash-attn, s3fs/gcsfs, ... are
# not needed there.
#
# Deliberate differences from `pip install -e .`:
#   * transformers/peft/accelerate/huggingface_hub at axolotl 0.19.0's own pins
#     (5.16.1 / 0.20.0 / 1.13.0 / 1.17.0): on PYTHONPATH they shadow newer ones in the image.
#     tokenizers: the image's 0.23.x is used (transformers 5.16.1 accepts >=0.23.1,<0.24).
#   * bitsandbytes 0.50.2 (43 MB, one native library per CUDA/ROCm/XPU version) is repacked
#     with only libbitsandbytes_cuda130.so (torch cu130) and libbitsandbytes_cpu.so: ~3.4 MiB.
#     Set BNB_CUDA=cuda128 (etc.) for a torch built for another CUDA version.
#   * wandb is a 1 kB import-only stub (axolotl imports it at module level, uses it only when
#     wandb_project is set; do not set wandb_project with this set).
#   * mistral-common is a stub holding only the Mistral-7B-v0.1 tokenizer file
#     (mistral_common/data/tokenizer.model.v1, 0.5 MB) that data_prep and the model builder read.
#     Its version is 0.0.0+tokenizeronly, below what transformers requires for its own
#     mistral-common integration, so transformers never tries to use the missing parts.
#   * axolotl-contribs-lgpl / -mit are sdist-only on PyPI: built here into pure-python wheels.
#
# On the GPU box, from the repository root (install ALL wheels in ONE pip call: axolotl and the
# two contribs wheels share the axolotl/ package directory, and a second `--target --upgrade`
# run would replace it):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
#   HF_HUB_OFFLINE=1 python3 -m bench.gpu_check --launcher python
# (`axolotl train` re-launches through the `accelerate` command, which a --target install does
# not put on PATH; --launcher python runs `python -m axolotl.cli.train` instead.)
set -euo pipefail

DEST=${1:?usage: bench/fetch_gpu_wheels.sh DEST [--no-liger]}
WITH_LIGER=1
[[ "${2:-}" == "--no-liger" ]] && WITH_LIGER=0
PY=${PYTHON:-python3}
BNB_CUDA=${BNB_CUDA:-cuda130}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PIPDL=("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
       --implementation cp --abi cp312 --abi abi3 --abi none
       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

# name==version  # why it is needed (the import that fails without it)
PINS=(
  axolotl==0.19.0              # the framework
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

# mistral-common: only the Mistral-7B-v0.1 tokenizer file
"${PIPDL[@]}" -d "$WORK/mc" mistral-common==1.11.5

"$PY" - "$DEST" "$WORK" "$BNB_CUDA" <<'PY'
"""Repack bitsandbytes; write the wandb and mistral-common stub wheels."""
import base64
import glob
import hashlib
import os
import sys
import zipfile

dest, work, bnb_cuda = sys.argv[1:4]


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def write_wheel(name, version, files, summary):
    dist = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\n"
                                 f"Version: {version}\nSummary: {summary}\n").encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: bench/fetch_gpu_wheels.sh\n"
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
for wandb (bench/fetch_gpu_wheels.sh): axolotl imports it at module level but only uses it when
wandb_project is set. It defines no `run`, so transformers' is_wandb_available() is False."""
__version__ = "0.0.0+axolotlstub"


def __getattr__(attr):
    raise AttributeError(f"wandb is an import-only stub here (wandb.{attr}); unset wandb_project")
'''}, "import-only stub")

# mistral-common: the package's __init__.py and the Mistral-7B-v0.1 tokenizer file only
(mc,) = glob.glob(os.path.join(work, "mc", "mistral_common-1.11.5-*.whl"))
with zipfile.ZipFile(mc) as z:
    files = {p: z.read(p) for p in ("mistral_common/__init__.py",
                                    "mistral_common/data/tokenizer.model.v1")}
write_wheel("mistral_common", "0.0.0+tokenizeronly", files,
            "mistral-common 1.11.5 reduced to the Mistral-7B-v0.1 tokenizer file")
PY

# one version of each package, and the size check
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[[ -z "$dups" ]] || { echo "error: several versions of: $dups (pip install would fail)" >&2; exit 1; }
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -la "$DEST"
echo "total: $((total / 1048576)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels"
(( total < 40 * 1048576 )) || { echo "error: over 40 MiB of wheels" >&2; exit 1; }
