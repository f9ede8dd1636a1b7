#!/usr/bin/env bash
# offline/run.sh COMMAND [ARG...] - run COMMAND with the packages offline/install.sh put in SITE
# (default .offline/site): SITE first on PYTHONPATH, then this checkout; SITE/bin first on PATH
# (the axolotl and accelerate commands); HF_HUB_OFFLINE=1 unless set. For example:
#   bash offline/run.sh python3 -m gpu_check --launcher python
#   bash offline/run.sh python3 -m eval recipes/mistral-qlora.yml
set -euo pipefail
(( $# )) || { echo "usage: offline/run.sh COMMAND [ARG...]" >&2; exit 2; }
SITE=${SITE:-.offline/site}
[[ -d $SITE ]] || { echo "error: $SITE not found: run \`bash offline/install.sh WHEELS\` first" >&2; exit 2; }
SITE=$(cd "$SITE" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$@"
