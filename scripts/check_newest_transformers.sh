#!/usr/bin/env bash
# Not a gate: install the newest transformers release (whatever the declared range says) into a
# fresh venv next to the lock's other pins and run the whole suite, so widening the range is one
# command. Usage: bash scripts/check_newest_transformers.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/tokenprune-newest}
python3 -m venv "$venv"
. "$venv/bin/activate"
grep -v -E '^(transformers|huggingface[-_]hub|tokenizers|safetensors)==' constraints.txt > "$venv/constraints.txt"
python -m pip install -q torch==2.13.0 -c "$venv/constraints.txt" -e ".[dev]"
python -m pip install -q --upgrade transformers
newest=$(python -c 'import transformers; print(transformers.__version__)')
echo "declared: transformers$(python scripts/transformers_range.py spec); testing the newest release: $newest"
python -m pytest -q || { echo "transformers $newest: failures above; the declared range stays"; exit 1; }
echo "transformers $newest passes: widen the range in pyproject.toml, re-lock (bash scripts/lock.sh) and run CI"
