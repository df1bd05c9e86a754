#!/usr/bin/env bash
# Set up the development environment of napari-cell2location in .venv (idempotent).
#
#   bash scripts/setup.sh
#
# 1. System packages for GUI tests (Xvfb and the X11 libraries Qt6 needs), with apt-get,
#    only when some are missing. Needs root (or password-less sudo); otherwise it says what
#    to run and goes on (Qt tests then run offscreen).
# 2. .venv (created with $PYTHON, default python3, when missing).
# 3. torch==2.13.0 as a CPU build FIRST (a bare "torch" requirement would pull a multi-GB
#    CUDA build), then `pip install -e '.[qt,testing]'`.
# A second run with nothing changed skips the installs and takes a few seconds.
#
# Environment: PYTHON (interpreter for the venv), VENV (default .venv), TORCH_INDEX_URL (index to
# take torch from), SKIP_APT=1 (never call apt-get), FORCE_PIP=1 (reinstall even if up to date).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.napari-cell2location-setup"

log() { echo "[setup] $*" >&2; }

# ------------------------------------------------------------------ 1. system packages
apt_packages=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxcb-image0 libxcb-render-util0
    libxcb-randr0 libxcb-shape0 libxcb-xkb1 libxkbcommon-x11-0 libegl1 libgl1 libfontconfig1 libdbus-1-3)

install_system_packages() {
    if [ "${SKIP_APT:-0}" = "1" ]; then
        log "SKIP_APT=1: not checking system packages"
        return 0
    fi
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        command -v Xvfb >/dev/null 2>&1 || log "no apt-get here: install Xvfb yourself for the GUI tests (they fall back to offscreen)"
        return 0
    fi
    local missing=() pkg
    for pkg in "${apt_packages[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            log "missing system packages for GUI tests: ${missing[*]}"
            log "run as root:  apt-get update && apt-get install -y ${missing[*]}"
            log "continuing without them (Qt tests run offscreen; those needing OpenGL may fail)"
            return 0
        fi
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! { "${sudo[@]}" apt-get update -qq </dev/null \
        && "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null; }; then
        log "apt-get failed; continuing without: ${missing[*]} (Qt tests run offscreen)"
    fi
}

# ------------------------------------------------------------------ 2. virtual environment
create_venv() {
    if [ -x "$VENV/bin/python" ]; then
        return 0
    fi
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        log "interpreter '$PYTHON' not found; set PYTHON=/path/to/python3.11+"
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        log "$("$PYTHON" --version 2>&1) is too old; napari-cell2location needs Python >= 3.11 (set PYTHON=...)"
        exit 1
    fi
    log "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV"; then
        log "could not create a venv; on Debian/Ubuntu: apt-get install -y python3-venv"
        exit 1
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
}

# ------------------------------------------------------------------ 3. python packages
stamp_value() {
    # what the environment was installed from: changes to the dependencies trigger a reinstall
    { cat pyproject.toml; echo "torch==$TORCH_VERSION"; echo "$ROOT"; } | sha256sum | cut -d' ' -f1
}

python_env_ok() {
    # fast check (no heavy imports): right torch, the package installed editable from this tree, extras present
    "$VENV/bin/python" - "$ROOT" "$TORCH_VERSION" <<'PY' 2>/dev/null
import importlib.metadata as md
import importlib.util
import os
import sys

root, torch_version = sys.argv[1], sys.argv[2]
assert md.version("torch").split("+")[0] == torch_version
spec = importlib.util.find_spec("napari_cell2location")
assert spec is not None and spec.origin is not None
assert os.path.realpath(spec.origin).startswith(os.path.realpath(os.path.join(root, "src")) + os.sep)
for dist in ("napari-cell2location", "PyQt6", "pytest", "pytest-qt", "hatchling", "napari", "pyro-ppl", "spatialdata"):
    md.version(dist)
PY
}

torch_index_args() {
    # Prints pip arguments that make `pip install torch==X` get a CPU build.
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        printf '%s\n' --index-url "$TORCH_INDEX_URL"
        return 0
    fi
    [ "$(uname -s)" = "Linux" ] || return 0  # macOS / Windows wheels on PyPI are CPU builds already
    local resolved
    resolved="$("$VENV/bin/python" -m pip install --dry-run --no-deps --quiet --ignore-installed --report - \
        "torch==$TORCH_VERSION" 2>/dev/null | "$VENV/bin/python" -c '
import json, sys
report = json.load(sys.stdin)
print(report["install"][0]["metadata"]["version"] if report.get("install") else "")
' 2>/dev/null || true)"
    case "$resolved" in
        *+cpu*) ;;  # pip's configured sources already offer the CPU build
        *)
            log "no CPU build of torch $TORCH_VERSION in pip's sources (got '${resolved:-nothing}'); using the PyTorch CPU index"
            printf '%s\n' --index-url https://download.pytorch.org/whl/cpu
            ;;
    esac
}

install_python_packages() {
    if [ "${FORCE_PIP:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] && python_env_ok; then
        log "python environment up to date ($VENV)"
        return 0
    fi
    local pip=("$VENV/bin/python" -m pip install --quiet)
    local installed_torch
    installed_torch="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
    if [ "${installed_torch%%+*}" != "$TORCH_VERSION" ]; then
        local args
        mapfile -t args < <(torch_index_args)
        log "installing torch==$TORCH_VERSION (CPU build) ${args[*]}"
        "${pip[@]}" "${args[@]}" "torch==$TORCH_VERSION"
    fi
    log "installing napari-cell2location (editable) with extras qt,testing"
    "${pip[@]}" -e "$ROOT[qt,testing]"
    python_env_ok || { log "environment check failed after installing"; exit 1; }
    stamp_value >"$STAMP"
    log "python environment ready ($VENV)"
}

install_system_packages
create_venv
install_python_packages
