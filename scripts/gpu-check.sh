#!/usr/bin/env bash
# Checks the node's GPU paths on a machine with an NVIDIA GPU, from a checkout of the project
# with its Python dependencies importable (an installed virtualenv, or PYTHONPATH):
#   * what the machine has (GPU, driver, PyTorch/CUDA/cuDNN, TensorRT, ONNX Runtime providers);
#   * the engine and analyser tests, the CUDA ones included (PyTorch CUDA fp32/fp16/bf16 parity
#     with the CPU, CUDA graphs against eager PyTorch, the worker's task on CUDA, ONNX Runtime
#     CUDA and TensorRT where installed; each absent one skips with its reason);
#   * python -m bench.parity --device cuda (each engine's largest differences from the CPU);
#   * python -m bench.inference --device cuda, with its JSON.
# usage: scripts/gpu-check.sh [OUT_DIR]   (default ./gpu-check; PYTHON overrides python3)
set -u
out=${1:-gpu-check}
py=${PYTHON:-python3}
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$out/machine.txt" 2>&1
"$py" - >>"$out/machine.txt" 2>&1 <<'PY'
import importlib.util
import os

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "capability", torch.cuda.get_device_capability(0) if torch.cuda.is_available() else "-")
print("cpu cores", os.cpu_count())
print("tensorrt", "installed" if importlib.util.find_spec("tensorrt") else "not installed")
try:
    import onnxruntime

    print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError:
    print("onnxruntime not installed")
PY
cat "$out/machine.txt"

"$py" -m pytest -q -p no:cacheprovider -rs tests/unit/test_engines.py tests/unit/test_analyser.py \
  >"$out/pytest.txt" 2>&1 || status=1
tail -n 25 "$out/pytest.txt"

"$py" -m bench.parity --device cuda --json "$out/parity-cuda.json" >"$out/parity-cuda.txt" 2>&1 || status=1
cat "$out/parity-cuda.txt"

"$py" -m bench.inference --device cuda --iters "${ITERS:-50}" --json "$out/inference-cuda.json" \
  >"$out/inference-cuda.txt" 2>&1 || status=1
cat "$out/inference-cuda.txt"
exit $status
