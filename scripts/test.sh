#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite.
source "$(dirname "${BASH_SOURCE[0]}")/ensure_env.sh"
cd "$FLOWHUB_ROOT"
exec "$FLOWHUB_PY" -m pytest "$@"
