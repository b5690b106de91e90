#!/usr/bin/env bash
# Run the GPU subset (tests/gpu) under a wall-clock budget and print a summary table:
#   tests/gpu/run.sh [--only one|multi|all] [--budget-s SECONDS] [--junit PATH] [-- PYTEST_ARGS...]
# See tests/gpu/runner.py for the table and the exit status. Uses .venv/bin/python if present,
# else $PYTHON, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
cd "$root"
exec "$python" "$here/runner.py" "$@"
