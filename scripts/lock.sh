#!/usr/bin/env bash
# Re-lock: resolve the project's dependencies (the newest transformers the declared range allows)
# in a fresh venv and write every exact version to constraints.txt, the file the README installs with.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q torch==2.13.0 -e ".[dev]"
{
  echo "# The exact versions CI tests (the newest end of the declared ranges); made by scripts/lock.sh."
  echo "# Install: python -m pip install torch==2.13.0 -c constraints.txt -e \".[dev]\""
  # torch without its local label (+cpu): the same pin then takes a CPU or a CUDA build of that release
  python -m pip freeze --exclude-editable | grep -v -E '^(pip|setuptools|wheel)==' | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} > constraints.txt
echo "locked $(grep -c '==' constraints.txt) packages; transformers $(grep '^transformers==' constraints.txt)"
