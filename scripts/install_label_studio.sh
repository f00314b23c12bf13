#!/usr/bin/env bash
# Installs Label Studio 1.23.2 into its own virtual environment at <project root>/.ls-venv.
# It needs its own venv: Label Studio pins redis<5.3, rq<2.7 and label-studio-sdk==2.1.2, which clash with ours.
# Installs with -c constraints/label-studio.txt (the versions last tested; see scripts/freeze_constraints.sh).
# Idempotent: an existing .ls-venv is brought to those versions (seconds when it already matches), so a venv made
# before a pin was added, e.g. with sentry-sdk 3.0 which Label Studio 1.23.2 cannot start with, is mended too.
set -euo pipefail

LS_VERSION="${LS_VERSION:-1.23.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LS_VENV:-$ROOT/.ls-venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/constraints/label-studio.txt"

report() {
    # Never run `label-studio --version`: it runs migrations and then starts a server on :8080.
    local version
    version="$("$VENV/bin/python" -m pip show label-studio 2>/dev/null | awk '/^Version:/ {print $2}')"
    echo "label-studio ${version:-unknown} at $VENV/bin/label-studio"
}

if [[ -x "$VENV/bin/label-studio" ]]; then
    echo "already installed; checking its packages against $CONSTRAINTS"
else
    echo "creating $VENV (label-studio==$LS_VERSION, about 1 GB, a few minutes)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "label-studio==$LS_VERSION"
report
