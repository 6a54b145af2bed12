# Sourced by the scripts: make .venv with durable and its test tools installed, using only the
# Python on PATH. Re-installs when pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.durable-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # setuptools reminds every editable install that a folder named like the package could
    # shadow it (ours is the package): nothing a newcomer can act on, so not shown.
    PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
