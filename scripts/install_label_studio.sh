#!/usr/bin/env bash
# Installs Label Studio 1.23.2 into its own virtual environment at <project root>/.ls-venv.
# It needs its own venv: Label Studio pins redis<5.3, rq<2.7 and label-studio-sdk==2.1.2, which clash with ours.
# Idempotent: does nothing (but report the version) when .ls-venv/bin/label-studio already exists.
set -euo pipefail

LS_VERSION="${LS_VERSION:-1.23.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LS_VENV:-$ROOT/.ls-venv}"
PYTHON="${PYTHON:-python3}"

report() {
    # Never run `label-studio --version`: it runs migrations and then starts a server on :8080.
    local version
    version="$("$VENV/bin/python" -m pip show label-studio 2>/dev/null | awk '/^Version:/ {print $2}')"
    echo "label-studio ${version:-unknown} at $VENV/bin/label-studio"
}

if [[ -x "$VENV/bin/label-studio" ]]; then
    echo "already installed, skipping"
    report
    exit 0
fi

echo "creating $VENV (label-studio==$LS_VERSION, about 1 GB, a few minutes)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "label-studio==$LS_VERSION"
report
