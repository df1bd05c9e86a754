#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then fit the model on the built-in synthetic data, headless.
#
#   bash scripts/demo.sh                  # results in demo_out/
#   OUT=elsewhere bash scripts/demo.sh    # results in elsewhere/
#
# Extra arguments go to `napari-cell2location demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"

bash "$ROOT/scripts/setup.sh"
exec "$VENV/bin/napari-cell2location" demo --headless --out "${OUT:-demo_out}" "$@"
