#!/usr/bin/env bash
# The test command: builds .venv/ in this checkout when missing, installs the test requirements there,
# then runs pytest.  Extra arguments go to pytest, e.g.  bash tests/run.sh -k pag -x
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.attn-toolkit-requirements"
WANT="$(cat tests/requirements.txt tests/run.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    stable-diffusion-sdkit==2.1.5 k-diffusion==0.1.1.post1
  echo "$WANT" > "$STAMP"
fi
exec "$VENV/bin/python" -m pytest "$@"
