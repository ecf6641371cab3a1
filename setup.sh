#!/usr/bin/env bash
# Set up edgesplit in .venv (everything: exporter, server, client, tests). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The pinned CPU build of PyTorch first: an unpinned torch could pull a multi-GB CUDA build.
# On a machine without a GPU, EDGESPLIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu keeps it small.
python -m pip install -q "torch==2.13.0" ${EDGESPLIT_TORCH_INDEX:+--index-url "$EDGESPLIT_TORCH_INDEX"}
python -m pip install -q -e ".[export,server,dev]"
echo "edgesplit is installed in .venv: activate it with '. .venv/bin/activate'"
