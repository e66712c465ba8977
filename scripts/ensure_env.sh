#!/usr/bin/env bash
# Creates (or reuses) this clone's Python 3.10 environment, then exports FLOWHUB_PY.
# Source it: `source scripts/ensure_env.sh`.
#
# The environment is the conventional per-clone `.venv` (gitignored; override with FLOWHUB_VENV),
# so each clone's `import flowhub` is its own code from any working directory and nothing can go
# stale when another clone moves or disappears. OneFlow's wheels are ~4 GB: they are installed by
# `uv`, whose global cache (~/.cache/uv, override with UV_CACHE_DIR) hard-links files into the
# venv, so a second clone's set-up copies nothing. Without uv (it is bootstrapped from PyPI into
# ~/.cache/flowhub/uv-py310 on first use) pip is used instead, which is slower but equivalent.
set -euo pipefail

FLOWHUB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLOWHUB_VENV="${FLOWHUB_VENV:-$FLOWHUB_ROOT/.venv}"
flowhub_tools="${XDG_CACHE_HOME:-$HOME/.cache}/flowhub/uv-py310"

find_python310() {
    local c
    for c in "${FLOWHUB_PYTHON310:-}" python3.10 "$HOME"/.pyenv/versions/3.10*/bin/python3.10 \
             /usr/local/bin/python3.10 /usr/bin/python3.10; do
        [ -n "$c" ] || continue
        if "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

# uv from PyPI, in a small environment of its own shared by every clone (it holds no project code).
find_uv() {
    if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
    if [ ! -x "$flowhub_tools/bin/uv" ]; then
        "$1" -m venv "$flowhub_tools" >/dev/null 2>&1 \
            && "$flowhub_tools/bin/python" -m pip install -q --disable-pip-version-check 'uv>=0.4' >&2 \
            || { rm -rf "$flowhub_tools"; return 1; }
    fi
    echo "$flowhub_tools/bin/uv"
}

# The stamp covers everything that decides what is installed.
stamp="$(cat "$FLOWHUB_ROOT/setup.cfg" "$FLOWHUB_ROOT/pyproject.toml" "$FLOWHUB_ROOT/scripts/ensure_env.sh" \
         | sha256sum | cut -c1-16)"
marker="$FLOWHUB_VENV/.flowhub-env-$stamp"

if [ ! -f "$marker" ]; then
    py310="$(find_python310)" || {
        echo "flowhub needs Python 3.10 (OneFlow 0.9.0 has no wheels for newer Pythons)." >&2
        echo "Install it (e.g. 'pyenv install 3.10' or 'apt-get install python3.10-venv') or set FLOWHUB_PYTHON310." >&2
        exit 1
    }
    echo "flowhub: preparing the environment in $FLOWHUB_VENV (the first set-up on a machine downloads ~4 GB)..." >&2
    rm -f "$FLOWHUB_VENV"/.flowhub-env-*
    if uv_bin="$(find_uv "$py310")"; then
        [ -x "$FLOWHUB_VENV/bin/python" ] || "$uv_bin" venv -q --seed --python "$py310" "$FLOWHUB_VENV" >&2
        "$uv_bin" pip install -q --python "$FLOWHUB_VENV/bin/python" -e "$FLOWHUB_ROOT[test]" >&2
    else
        echo "flowhub: uv is not available; installing with pip (slower)" >&2
        [ -x "$FLOWHUB_VENV/bin/python" ] || "$py310" -m venv "$FLOWHUB_VENV"
        "$FLOWHUB_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$FLOWHUB_ROOT[test]" >&2
    fi
    touch "$marker"
fi

export FLOWHUB_PY="$FLOWHUB_VENV/bin/python"
# Bytecode for flowhub's own modules, as a regular install has: an editable install never gets it where
# PYTHONDONTWRITEBYTECODE is set, and every fresh process would compile flowhub again (~60 ms).
"$FLOWHUB_PY" -m compileall -q "$FLOWHUB_ROOT/flowhub" >/dev/null 2>&1 || true
export PATH="$FLOWHUB_VENV/bin:$PATH"
set +euo pipefail
