#!/usr/bin/env bash
# Entrypoint of every docker-compose service: load the secrets, check what the job needs, then
# exec the service's command. Each failed check prints ONE line saying what to do, exits non-zero.
#
#   bash docker/entrypoint.sh COMMAND [ARG...]
#
# Environment it reads (docker-compose.yml sets them):
#   HF_HOME       the Hugging Face cache (the image sets it; compose mounts the host's there):
#                 must be writable by the job's uid.
#   SECRETS_DIR   where compose mounts the secrets (default /run/secrets): hf_token and
#                 wandb_api_key become HF_TOKEN / WANDB_API_KEY for this process only, so the
#                 values never show in `docker compose config` or `docker inspect`.
#   RECIPE        if set, must name an existing file (relative to the checkout).
#   REQUIRE_GPUS  if set and not 0, docker/check_gpu.py --min-gpus REQUIRE_GPUS runs first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
secrets_dir="${SECRETS_DIR:-/run/secrets}"

load_secret() {  # load_secret FILE VAR: export VAR from the secret file if it is non-empty
    local file="$secrets_dir/$1" value
    [[ -e "$file" ]] || return 0
    if [[ ! -r "$file" ]]; then
        echo "entrypoint: warning: $file is not readable by uid $(id -u); $2 stays unset" \
             "(set UID/GID in .env to your own id -u / id -g)" >&2
        return 0
    fi
    value="$(tr -d '\r\n' < "$file")"
    if [[ -n "$value" ]]; then
        export "$2=$value"
    fi
}

load_secret hf_token HF_TOKEN
load_secret wandb_api_key WANDB_API_KEY

if [[ ! -w . ]]; then
    echo "entrypoint: $(pwd) is not writable by uid $(id -u): set UID and GID in .env to the" \
         "owner of the checkout (id -u; id -g) so data/ and outputs/ can be written" >&2
    exit 2
fi

# docker-compose.yml bind-mounts the host's Hugging Face cache here. Docker creates a missing
# source directory as root, which the job's uid then cannot write to.
if [[ -n "${HF_HOME:-}" && -d "$HF_HOME" && ! -w "$HF_HOME" ]]; then
    echo "entrypoint: the Hugging Face cache $HF_HOME (your HF_HOME, default ~/.cache/huggingface," \
         "on the host) is not writable by uid $(id -u): create it as yourself before the first" \
         "run (mkdir -p ~/.cache/huggingface), or chown it to your UID/GID" >&2
    exit 2
fi

if [[ -n "${RECIPE:-}" && ! -f "$RECIPE" ]]; then
    available="$(ls -- recipes/*.yml 2>/dev/null | paste -sd ' ' - || true)"
    echo "entrypoint: RECIPE=$RECIPE: no such file in $(pwd); set RECIPE to one of:" \
         "${available:-(no recipes/*.yml found)}" >&2
    exit 2
fi

if [[ -n "${REQUIRE_GPUS:-}" && "${REQUIRE_GPUS}" != "0" ]]; then
    python "$here/check_gpu.py" --min-gpus "$REQUIRE_GPUS"
    if [[ -z "${HF_TOKEN:-}" ]]; then
        echo "entrypoint: note: HF_TOKEN is empty; downloading a gated base model" \
             "(mistralai/Mistral-7B-v0.1) needs it: put it in .env" >&2
    fi
fi

exec "$@"
