#!/usr/bin/env bash
# offline/install.sh WHEELS [SITE] - on the GPU box without internet, from the checkout's root.
#
# Installs every wheel in WHEELS (offline/fetch_wheels.sh made them) in ONE pip call - axolotl
# and the axolotl-contribs wheels share the axolotl/ package directory, so a second
# `--target --upgrade` call would replace it - into SITE (default .offline/site), without
# dependencies, an index or byte-compiling (COMPILE_PYC=1 compiles, as pip does by default).
# Then checks, without importing them, that the packages the commands import are there (from
# SITE or from the image) and names each stand-in of `fetch_wheels.sh --small` it installed.
# A missing one is one `error:` line with the fix, exit status 2. Run commands with them:
#   bash offline/run.sh python3 -m gpu_check --launcher python
set -uo pipefail
WHEELS=${1:?usage: offline/install.sh WHEELS [SITE]}
SITE=${2:-${SITE:-.offline/site}}
PYTHON=${PYTHON:-python3}
compgen -G "$WHEELS/*.whl" >/dev/null || {
  echo "error: no wheels in $WHEELS: run \`bash offline/fetch_wheels.sh $WHEELS --python X.Y\`" \
       "where there is PyPI access and copy $WHEELS here" >&2
  exit 2
}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl || { echo "error: pip install of $WHEELS/*.whl failed" >&2; exit 1; }
if [[ ${COMPILE_PYC:-0} == 1 ]]; then
  "$PYTHON" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1
fi
PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" - "$SITE" <<'PY'
"""What the commands import is there; the stand-ins say what they are."""
import importlib.metadata as metadata
import importlib.util
import sys
from pathlib import Path

site = Path(sys.argv[1])
fix = ("install it into the image while it has internet, or fetch with "
       "`offline/fetch_wheels.sh DEST --python X.Y --small` (a stand-in: offline/README.md)")
needed = {"axolotl": "the wheels", "peft": "the wheels", "bitsandbytes": "the wheels",
          "datasets": "the wheels", "trl": "the wheels", "torch": "the image",
          "transformers": "the wheels", "wandb": fix, "mistral_common": fix}
missing = [(name, where) for name, where in needed.items()
           if importlib.util.find_spec(name) is None]
for name, where in missing:
    where = f"it comes with {where}" if where in ("the wheels", "the image") else where
    print(f"error: {name} is not installed here ({site} or the image): {where}", file=sys.stderr)
for name, what in (("wandb", "an import-only stand-in: do not set wandb_project"),
                   ("mistral_common", "only the Mistral-7B-v0.1 tokenizer file")):
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        continue
    if "+" in version:
        print(f"note: {name} {version} is {what} (offline/fetch_wheels.sh --small)")
libraries = sorted(p.name for p in (site / "bitsandbytes").glob("libbitsandbytes_*"))
if 0 < len(libraries) <= 2:
    print(f"note: bitsandbytes carries only {', '.join(libraries)} (--small)")
if missing:
    raise SystemExit(2)
print(f"offline/install.sh: installed into {site}; run commands with `bash offline/run.sh ...`")
PY
