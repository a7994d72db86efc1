#!/usr/bin/env bash
# One prepared GPU check of Step3p5's training path (sections and output: benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                     # all sections, under 8 minutes on one H100 / H200
#   bash benchmarks/gpu_check.sh --sections train,logprob_gap --budget-s 300
#   bash benchmarks/gpu_check.sh --small             # tiny sizes on CPU (what CI runs)
#
# Needs PyTorch (+ Triton for the fused MoE kernels); uses transformers, pytest and flash_attn when they
# import, installs nothing, needs no network. Runs from a plain checkout: the repository goes on PYTHONPATH,
# no `pip install -e .` needed. JSON goes to --out, default $OUT/gpu_check.json when $OUT is set.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Large expert stacks and optimizer states come and go: expandable segments keep fragmentation down.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
if [ "${TRITON_INTERPRET:-0}" = "1" ]; then
  echo "note: unsetting TRITON_INTERPRET=1 (the Triton interpreter is for CPU tests; kernels would crawl)"
  unset TRITON_INTERPRET
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -z "$PY" ]; then
  echo "error: no python3 or python on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
fi
exec "$PY" benchmarks/gpu_check.py "$@"
