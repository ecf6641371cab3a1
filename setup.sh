#!/usr/bin/env bash
# Set up edgesplit in .venv (exporter, server, client and test tools), then optionally run a command in it:
#   ./setup.sh                  set up only
#   ./setup.sh demo [options]   set up, then `edgesplit demo [options]` (the main job, on SmolLM2-135M)
# Which PyTorch build: EDGESPLIT_TORCH_INDEX=URL picks the index (for example .../whl/cu124 for a GPU server).
# Without it, a Linux machine with no NVIDIA GPU takes the CPU build from PyTorch's CPU index when that index
# answers (about 200 MB instead of several GB of CUDA libraries); otherwise pip's own configured index decides.
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
index=${EDGESPLIT_TORCH_INDEX:-}
if [ -z "$index" ] && [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # A short probe: a machine that cannot reach the CPU index must not wait minutes for pip's retries.
  if .venv/bin/python - "$CPU_INDEX/torch/" <<'PY' 2>/dev/null; then
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).close()
PY
    index=$CPU_INDEX
  fi
fi
if .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: torch $TORCH_VERSION is already installed in .venv"
elif [ -n "$index" ]; then
  echo "setup: installing torch==$TORCH_VERSION from $index"
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" --index-url "$index" --extra-index-url https://pypi.org/simple
else
  echo "setup: installing torch==$TORCH_VERSION from pip's configured index (set EDGESPLIT_TORCH_INDEX to choose)"
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
fi
.venv/bin/python -m pip install -q -e ".[export,server,metrics,dev]"
# Say what was installed: a CUDA build on a machine without a GPU is several GB for nothing.
.venv/bin/python -c "
import torch
build = f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'
gpu = 'a GPU is visible' if torch.cuda.is_available() else 'no GPU visible'
print(f'setup: torch {torch.__version__} ({build}; {gpu})')
"
echo "edgesplit is installed in .venv (activate it with: . .venv/bin/activate)"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/edgesplit "$@"
fi
