#!/usr/bin/env bash
# Set up edgesplit in .venv (exporter, server, client and test tools), then optionally run a command in it:
#   ./setup.sh                  set up only
#   ./setup.sh demo [options]   set up, then `edgesplit demo [options]` (the main job, on SmolLM2-135M)
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The pinned CPU build of PyTorch first: an unpinned torch could pull a multi-GB CUDA build.
# On a machine without a GPU, EDGESPLIT_TORCH_INDEX=https://download.pytorch.org/whl/cpu keeps it small.
.venv/bin/python -m pip install -q "torch==2.13.0" ${EDGESPLIT_TORCH_INDEX:+--index-url "$EDGESPLIT_TORCH_INDEX"}
.venv/bin/python -m pip install -q -e ".[export,server,dev]"
echo "edgesplit is installed in .venv (activate it with: . .venv/bin/activate)"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/edgesplit "$@"
fi
