#!/usr/bin/env bash
# Quick start on scikit-learn's bundled digits (no download), a few minutes on a 2-core CPU:
# a dense PGD-AT model, Hydra (score_prune/score_finetune) and HARP (harp_prune/harp_finetune) at k = 0.01
# (99 % of the weights pruned), each evaluated with natural and PGD-10 accuracy, then one table.
#   bash scripts/quickstart.sh [extra train.py flags, e.g. --overwrite]
# Environment: PYTHON (default .venv/bin/python), RESULT_DIR (default trained_models).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${RESULT_DIR:-trained_models}
run() { echo "+ $*" >&2; "$@"; }

run "$PY" train.py --dataset digits --result-dir "$RESULTS" --exp-mode pretrain "$@"
run "$PY" train.py --dataset digits --result-dir "$RESULTS" --exp-mode harp_prune --k 0.01 "$@"
run "$PY" train.py --dataset digits --result-dir "$RESULTS" --exp-mode harp_finetune --k 0.01 "$@"
run "$PY" train.py --dataset digits --result-dir "$RESULTS" --exp-mode score_prune --k 0.01 "$@"
run "$PY" train.py --dataset digits --result-dir "$RESULTS" --exp-mode score_finetune --k 0.01 "$@"
for mode in pretrain harp_finetune score_finetune; do
  run "$PY" test.py --dataset digits --result-dir "$RESULTS" --exp-mode "$mode" --k 0.01 --attacks natural,pgd10
done
run "$PY" scripts/make_tables.py "$RESULTS" --dataset digits --attack pgd10 --show-sparsity
