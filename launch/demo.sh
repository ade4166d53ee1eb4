#!/usr/bin/env bash
# The main job on the embedded default corpus: prepare the Python standard library's sources
# into WebDataset shards, train the tiny memory GPT with ZeRO-3 on 2 processes (CPU or GPU),
# show validation loss by segment, then sample a continuation from the final checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
. "${VENV:-.venv}/bin/activate"
NPROC="${NPROC:-2}"
RUN_DIR="${RUN_DIR:-runs/tiny}"
[ -f data/default/manifest.json ] || memgpt-prepare --out data/default --vocab-size 4096
RESUME=none; [ -d "$RUN_DIR/checkpoints" ] && RESUME=auto
deepspeed --num_gpus "$NPROC" launch/train.py --config configs/tiny.yaml --run_dir="$RUN_DIR" --resume "$RESUME" "$@"
echo "--- validation (last eval) ---"
grep '"val/loss"' "$RUN_DIR/metrics.jsonl" | tail -1
echo "--- sample ---"
memgpt-generate --checkpoint "$RUN_DIR" --prompt "def read_config(path):" --max-new-tokens 60
echo "TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard"
