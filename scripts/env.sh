# Sourced by the other scripts: choose the Python that diffguide is installed into.
# - $PYTHON if set (bring your own interpreter or venv);
# - else the active virtual environment ($VIRTUAL_ENV);
# - else this checkout's own .venv, created on first use, so two checkouts on one machine never
#   replace each other's `diffguide` command.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  PY="$PWD/.venv/bin/python"
fi
export PYTHON="$PY"
export PATH="$(dirname "$PY"):$PATH"
