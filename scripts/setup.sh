#!/usr/bin/env bash
# Set-up in one command (README "Set-up"; .ci/run runs it too): a virtual environment .venv in the repository root
# with the toolkit's dependencies and the tests'.
#   bash scripts/setup.sh
# Environment: PYTHON (default python3; 3.9 or newer) creates the environment. Rerunning it updates .venv in place.
# The test-only requirements go in without their own dependencies (requirements-test.txt says why).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ $*" >&2; "$@"; }
run "${PYTHON:-python3}" -m venv .venv
run .venv/bin/python -m pip install --upgrade pip
run .venv/bin/python -m pip install -r requirements.txt
run .venv/bin/python -m pip install --no-deps -r requirements-test.txt
.venv/bin/python -c "import torch, torchvision, torchattacks; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
