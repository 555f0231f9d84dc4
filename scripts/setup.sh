#!/usr/bin/env bash
# Set up ACWI Node in ./.venv (idempotent). With --test, also the tools the test suite talks to:
# Orthanc, DCMTK, dicom3tools and Chromium from Debian's packages (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test_tools=0
[[ "${1:-}" == "--test" ]] && want_test_tools=1

if [[ $want_test_tools == 1 ]]; then
  missing=()
  command -v Orthanc >/dev/null || missing+=(orthanc orthanc-dicomweb)
  [[ -x /usr/bin/storescu ]] || missing+=(dcmtk)
  command -v dciodvfy >/dev/null || missing+=(dicom3tools)
  # The review app's browser test drives Debian's Chromium through Playwright (no browser download).
  [[ -x /usr/bin/chromium ]] || missing+=(chromium)
  if (( ${#missing[@]} )); then
    sudo=""; [[ $(id -u) != 0 ]] && sudo="sudo"
    echo "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of PyTorch is enough for the node's CPU path; override for CUDA machines.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${ACWI_TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev,onnx,codecs,models]"
echo "ACWI Node installed in .venv"
