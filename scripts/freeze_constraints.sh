#!/usr/bin/env bash
# Rewrites constraints/*.txt from the two venvs, after `make lint` and `MEDEBIASER_E2E=1 make test` pass on them.
# Why constraints at all: few of our dependencies (and fewer of Label Studio's) have upper bounds, so a fresh
# install follows each day's releases. sentry-sdk 3.0 dropped an option Label Studio 1.23.2 passes, and a fresh
# .ls-venv stopped starting (CI of stop 33). make install, the Dockerfile and install_label_studio.sh install
# with -c these files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
{
    echo "# Label Studio 1.23.2's dependencies as last tested (scripts/freeze_constraints.sh; do not edit by hand)."
    .ls-venv/bin/python -m pip freeze
} > constraints/label-studio.txt
{
    echo "# The project's dependencies and dev tools as last tested (scripts/freeze_constraints.sh; do not edit by hand)."
    echo "# torch, torchvision, triton and the CUDA wheels are left out: which build exists depends on the machine"
    echo "# and the wheel index (CPU, CUDA variant); pyproject.toml sets their floors."
    .venv/bin/python -m pip freeze --exclude-editable | grep -vE '^(torch|torchvision|triton|nvidia-)'
} > constraints/project.txt
wc -l constraints/*.txt
