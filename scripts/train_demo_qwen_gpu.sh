#!/usr/bin/env bash
# Train the demo-qwen model on a GPU machine in one device-tool run (under 8 minutes on an H200).
# Usage (repo root; wheels for pydantic/transformers in .whl/ where the machine's are older):
#   bash scripts/train_demo_qwen_gpu.sh OUTDIR [TRAIN ARGS...]
# OUTDIR gets demo-qwen.tar (the checkpoint directory with training.json and training.log) and train.log.
set -euo pipefail
out=$1; shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# installed (not imported from the source tree, which lacks the tokenprune.strategies mapping)
python3 -m pip install -q --no-index --no-deps --no-build-isolation . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
(cd /tmp && python3 -m tokenprune.demo.train_qwen --out /tmp/demo-qwen --device cuda "$@") 2>&1 | grep -v Warn | tee "$out/train.log"
tar -C /tmp -cf "$out/demo-qwen.tar" demo-qwen
