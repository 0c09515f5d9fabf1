# Shared by scripts/*.sh: make (or reuse) the project's virtual environment and enter it.
# Reinstalls only when requirements.txt or pyproject.toml changed (stamp file in the venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MI300X_CERT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.mi300x-cert-stamp"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  echo "[setup] installing pinned requirements (first run takes a few minutes)" >&2
  python -m pip install -q --upgrade pip >&2
  python -m pip install -q -r "$ROOT/requirements.txt" >&2
  python -m pip install -q --no-deps -e "$ROOT" >&2
  echo "$WANT" > "$STAMP"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"
