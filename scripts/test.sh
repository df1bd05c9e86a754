#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), then run the test suite; extra arguments go to pytest.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not slow"   # the quick part
#
# GUI tests run under Xvfb when xvfb-run is installed, otherwise with QT_QPA_PLATFORM=offscreen.
# Exits non-zero on any failure, and also when no test ran (pytest exit code 5).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"

bash "$ROOT/scripts/setup.sh" || { echo "[test] setup failed" >&2; exit 1; }

pytest_cmd=("$VENV/bin/python" -m pytest "$@")
if command -v xvfb-run >/dev/null 2>&1; then
    echo "[test] running pytest under xvfb-run" >&2
    xvfb-run -a -s "-screen 0 1920x1080x24" "${pytest_cmd[@]}" </dev/null
    rc=$?
else
    echo "[test] xvfb-run not found: Qt runs offscreen (no OpenGL); see scripts/setup.sh" >&2
    QT_QPA_PLATFORM="${QT_QPA_PLATFORM:-offscreen}" "${pytest_cmd[@]}" </dev/null
    rc=$?
fi

if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
exit "$rc"
