#!/usr/bin/env bash
# Quick start on scikit-learn's bundled digits (no download), a few minutes on a 2-core CPU:
# a dense PGD-AT model, Hydra (score_prune/score_finetune), LWM (lwm_finetune) and HARP (harp_prune/harp_finetune)
# at k = 0.01 (99 % of the weights pruned), each evaluated with natural and PGD-10 accuracy, then one table.
#   bash scripts/quickstart.sh [extra train.py flags, e.g. --overwrite]
# Rerunning it skips the stages that finished (train.py --skip-finished) and resumes an interrupted one; with
# --overwrite every stage is trained again from scratch.
# Environment: PYTHON (default .venv/bin/python), RESULT_DIR (default trained_models).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RESULTS=${RESULT_DIR:-trained_models}
run() { echo "+ $*" >&2; "$@"; }
train() { run "$PY" train.py --dataset digits --result-dir "$RESULTS" --skip-finished "$@"; }

train --exp-mode pretrain "$@"
train --exp-mode harp_prune --k 0.01 "$@"
train --exp-mode harp_finetune --k 0.01 "$@"
train --exp-mode score_prune --k 0.01 "$@"
train --exp-mode score_finetune --k 0.01 "$@"
train --exp-mode lwm_finetune --k 0.01 "$@"
for mode in pretrain harp_finetune score_finetune lwm_finetune; do
  run "$PY" test.py --dataset digits --result-dir "$RESULTS" --exp-mode "$mode" --k 0.01 --attacks natural,pgd10
done
run "$PY" scripts/make_tables.py "$RESULTS" --dataset digits --attack pgd10 --show-sparsity
