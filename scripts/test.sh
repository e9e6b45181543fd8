#!/bin/bash
# test.sh: the whole test suite on a fresh Debian 12 machine (as root).
# Creates .venv, installs the real peers (QEMU, qemu-storage-daemon, ...),
# then runs ruff, mypy and pytest.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/peers/install-peers.sh >/dev/null
echo "== ruff";  .venv/bin/ruff check src tests bench setup.py
echo "== mypy";  .venv/bin/mypy
echo "== pytest"; .venv/bin/pytest "$@"
