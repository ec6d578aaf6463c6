# Sourced by demo.sh and test.sh: creates .venv (Python 3.11) and installs the project with the
# extras given as $1 (e.g. ".[test,bench]"), again only when pyproject.toml or the extras change.
# --- Python 3.11 virtualenv -------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
  if command -v python3.11 >/dev/null 2>&1; then
    PY=python3.11
  elif command -v python3 >/dev/null 2>&1 && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY=python3
  else
    echo "error: Python 3.11 is required (neither python3.11 nor a 3.11 python3 found)" >&2
    exit 1
  fi
  echo "creating .venv with $PY"
  "$PY" -m venv .venv
fi

# reinstall only when pyproject.toml changed
stamp=".venv/.installed-$(cat pyproject.toml <(echo "$1") | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" ]]; then
  echo "installing surgeflow$1 into .venv"
  .venv/bin/python -m pip install -q -e "$1"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

