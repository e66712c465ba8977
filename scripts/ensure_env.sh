#!/usr/bin/env bash
# Creates (or reuses) the Python 3.10 environment flowhub runs in, then exports FLOWHUB_PY.
# Source it: `source scripts/ensure_env.sh`. The environment lives outside the clone
# (default ~/.cache/flowhub/venv-py310, override with FLOWHUB_VENV) because OneFlow's
# wheels are ~4 GB; it is reused whenever its dependency stamp matches setup.cfg.
set -euo pipefail

FLOWHUB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLOWHUB_VENV="${FLOWHUB_VENV:-$HOME/.cache/flowhub/venv-py310}"

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

# The stamp covers everything that decides what is installed.
stamp="$(cat "$FLOWHUB_ROOT/setup.cfg" "$FLOWHUB_ROOT/scripts/ensure_env.sh" | sha256sum | cut -c1-16)"
marker="$FLOWHUB_VENV/.flowhub-env-$stamp"

if [ ! -f "$marker" ]; then
    py310="$(find_python310)" || {
        echo "flowhub needs Python 3.10 (OneFlow 0.9.0 has no wheels for newer Pythons)." >&2
        echo "Install it (e.g. 'pyenv install 3.10' or 'apt-get install python3.10-venv') or set FLOWHUB_PYTHON310." >&2
        exit 1
    }
    echo "flowhub: preparing the environment in $FLOWHUB_VENV (first run downloads ~4 GB)..." >&2
    rm -f "$FLOWHUB_VENV"/.flowhub-env-*
    [ -x "$FLOWHUB_VENV/bin/python" ] || "$py310" -m venv "$FLOWHUB_VENV"
    "$FLOWHUB_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$FLOWHUB_VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$FLOWHUB_ROOT[test]" >&2
    touch "$marker"
fi

# The environment is shared between clones: point its editable install at this clone.
if ! "$FLOWHUB_VENV/bin/python" -c 'import flowhub, os, sys; sys.exit(os.path.dirname(os.path.dirname(os.path.realpath(flowhub.__file__))) != os.path.realpath(sys.argv[1]))' "$FLOWHUB_ROOT" >/dev/null 2>&1; then
    "$FLOWHUB_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$FLOWHUB_ROOT" >&2
fi

export FLOWHUB_PY="$FLOWHUB_VENV/bin/python"
export PATH="$FLOWHUB_VENV/bin:$PATH"
set +euo pipefail
