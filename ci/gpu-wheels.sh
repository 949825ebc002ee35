#!/usr/bin/env bash
# Wheels of what the GPU check needs beyond a CUDA PyTorch image (torch, numpy, pillow, pyyaml, pytest,
# pytest-xdist and onnx/onnxruntime/onnxscript are usually there), for a GPU machine without package access:
#   bash ci/gpu-wheels.sh            # here, where pip reaches a registry: writes .whl/ (ignored by git)
#   there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#          PYTHONPATH=/tmp/site make gpu-check
# With package access there, `pip install -e ".[dev]"` (plain torch: the CUDA build) does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
for pkg in webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl "$pkg" 2>/dev/null ||
  "$PY" -m pip download -q --no-deps -d .whl "$pkg"
done
ls -l .whl
