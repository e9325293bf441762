#!/usr/bin/env bash
# Creates (or reuses) a separate virtualenv with the real funcX 1.0.13 SDK from
# PyPI (`pip install funcx==1.0.13`, never vendored), for compatibility tests
# and demos; prints the path of its python on stdout (progress on stderr).
#
#   scripts/make-funcx-venv.sh [--dill-0.3.6] [VENV_DIR]
#
# VENV_DIR defaults to $FUNCX_VENV, else .state/venv-funcx-1.0.13 in this checkout.
# A venv that already imports funcx 1.0.13 is reused as it is.
#
# On Python 3.11 the dill that funcx pins (0.3.5.1) cannot pickle functions,
# so only serialization method 04 (the function's source) works: fine for
# functions defined in a .py file, not for ones typed at a prompt.
# --dill-0.3.6 installs dill 0.3.6 afterwards (pip warns about the pin), which
# makes method 01 work too.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dill=""
if [ "${1:-}" = "--dill-0.3.6" ]; then
  dill="0.3.6"
  shift
fi
venv="${1:-${FUNCX_VENV:-$root/.state/venv-funcx-1.0.13}}"
python="${PYTHON:-python3}"

ok() {
  "$venv/bin/python" - "$dill" <<'PY' >/dev/null 2>&1
import sys
import funcx
import dill
assert funcx.__version__ == "1.0.13", funcx.__version__
want = sys.argv[1]
assert not want or dill.__version__ == want, dill.__version__
PY
}

if [ -x "$venv/bin/python" ] && ok; then
  echo "$venv/bin/python"
  exit 0
fi

echo ">>> Creating $venv with funcx==1.0.13 from PyPI (about a minute)" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip >&2
"$venv/bin/pip" install -q --disable-pip-version-check "funcx==1.0.13" >&2
if [ -n "$dill" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check "dill==$dill" >&2 || true
fi
if ! ok; then
  echo "The venv $venv does not import funcx 1.0.13" >&2
  exit 1
fi
echo "$venv/bin/python"
