#!/bin/sh
# Entrypoint of the MEDebiaser image: runs its command (`medebiaser serve` or `medebiaser worker`), after
# checking that MODEL_DIR is writable (a bind mount owned by root is the usual surprise), or, as
# `medebiaser-entrypoint healthcheck`, asks the local server's /health (with basic auth when configured).
set -eu

if [ "${1:-}" = "healthcheck" ]; then
    exec python - <<'PY'
import base64, os, sys, urllib.request

request = urllib.request.Request(f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health")
user = os.environ.get("BASIC_AUTH_USER")
if user:
    token = base64.b64encode(f"{user}:{os.environ.get('BASIC_AUTH_PASS', '')}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
try:
    with urllib.request.urlopen(request, timeout=8) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure means unhealthy
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
PY
fi

model_dir="${MODEL_DIR:-/data/models}"
mkdir -p "$model_dir" 2>/dev/null || true
if ! [ -w "$model_dir" ]; then
    echo "MODEL_DIR $model_dir is not writable by uid $(id -u); use a named volume or chown the bind mount" >&2
    exit 1
fi

exec "$@"
