#!/usr/bin/env bash
# Train the demo model on a GPU machine, then compare strategies on it (a device-tool run).
# Usage (repo root, wheels for pydantic/transformers in .whl/): bash scripts/train_demo_gpu.sh OUTDIR [TRAIN ARGS...]
set -euo pipefail
out=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m tokenprune.demo.train --out /tmp/demo --device cuda --workers 14 "$@" 2>&1 | grep -v Warn | tee "$out/train.log"
tar -C /tmp -cf "$out/demo.tar" demo
sweep="random,uniform,vtc-cls,vtc-cls(layer=-1),vtc-cls-ensemble,vtc-cls-ensemble(start_layer=0),vtc-cls-ensemble(start_layer=1),vtc-cls-ensemble(start_layer=2),vtc-cls-ensemble(start_layer=3)"
tokenprune compare --model /tmp/demo --device cuda --limit 2000 --batch-size 250 \
  --strategies "$sweep" --budgets 1.0,0.5,0.25,0.125,0.0625 --out /tmp/cmp --json > "$out/compare.json" 2>/dev/null
python3 -c "
import json
d=json.load(open('$out/compare.json'))
for r in d['rows']: print(f\"{r['spec'] or 'unpruned':45s} kept={r['kept']} acc={r['accuracy']:.4f} agree={r['agreement']:.4f}\")
"
