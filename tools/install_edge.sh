#!/usr/bin/env bash
# The edge client on a device, in one command: a venv at DIR with edgesplit's edge dependencies resolved by pip,
# without huggingface-hub, sympy and coloredlogs (declared, never used by the client) and the packages only they
# need, and without pip and setuptools.
#
#   tools/install_edge.sh ~/edgesplit ./edgesplit-0.1.0-py3-none-any.whl
#   tools/install_edge.sh DIR SPEC [--keep-pip] [--replace] [-- PIP_OPTIONS...]
#
# SPEC: a wheel, a checkout, a git URL or `edgesplit`. PIP_OPTIONS go to every pip command, for example
# `-- --no-index --find-links wheels/cp311` on a device without internet. PYTHON picks the interpreter
# (default python3; it must be 3.10 or newer). The work is done by install_edge.py next to this file; its
# docstring says what each step does and why.
set -euo pipefail

PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "install_edge: $PYTHON not found: install Python 3.10 or newer with venv support" \
        "(Debian, Ubuntu: sudo apt install python3 python3-venv), or set PYTHON to one" >&2
    exit 1
fi
exec "$PYTHON" "$(dirname "$0")/install_edge.py" "$@"
