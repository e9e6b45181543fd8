#!/bin/bash
# bootstrap.sh: create .venv and install pyvirtio (editable) with its dev tools.
# Works on a fresh Debian 12 as root: installs python3-venv if venv is missing,
# and gcc + the Python headers that mypyc needs to compile the ring's hot
# paths (setup.py; PYVIRTIO_NO_MYPYC=1 skips compiling).  Re-installs when
# pyproject.toml, setup.py or a compiled module changed since the last install,
# so the compiled extensions never lag behind their source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
need=()
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv python3-pip)
fi
if [ -z "${PYVIRTIO_NO_MYPYC:-}" ]; then
  command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$inc/Python.h" ] || need+=(python3-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pyvirtio-installed
compiled=$(PYTHONPATH=src "$PY" -c 'from pyvirtio._build import COMPILED_MODULES as m
print(" ".join("src/" + n.replace(".", "/") + ".py" for n in m))')
# shellcheck disable=SC2086
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py src/pyvirtio/_build.py $compiled -newer "$stamp")" ]; then
  echo "bootstrap: installing pyvirtio into .venv (compiling the ring with mypyc, about a minute)" >&2
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
