#!/usr/bin/env bash
# Validate docker-compose.yml offline: no Docker engine needed, only the docker-compose binary
# (Debian: apt-get install -y docker-compose, 1.29.2). Run by `make compose-check`.
#  1. the file passes Compose's own schema check with every required secret set;
#  2. it is refused when any one of them is missing (secrets have no defaults).
# A local .env is ignored (an empty --env-file) so it cannot hide a missing variable.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${COMPOSE:-docker-compose}
SECRETS=(POSTGRES_PASSWORD REDIS_PASSWORD FLOWER_USER FLOWER_PASSWORD)

if ! command -v "$COMPOSE" >/dev/null; then
    echo "validate-compose: '$COMPOSE' not found (apt-get install -y docker-compose)" >&2
    exit 2
fi

# 1.29.2 refuses --env-file /dev/null ("is not a file"): use an empty file.
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
config() { "$COMPOSE" --env-file "$empty_env" -f docker-compose.yml config -q; }

# Dummy values: only the file's structure is checked here.
for name in "${SECRETS[@]}"; do export "$name=validate-compose"; done
config
echo "docker-compose.yml: valid"

for name in "${SECRETS[@]}"; do
    if (unset "$name"; config 2>/dev/null); then
        echo "docker-compose.yml: accepted without $name; make it \${$name:?...}" >&2
        exit 1
    fi
done
echo "docker-compose.yml: refused without each of ${SECRETS[*]}"
