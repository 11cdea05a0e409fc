#!/usr/bin/env bash
# Everything issue 5 still needs from a GPU, in one command that fits the device tool's 10-minute call:
# the kernel tests on CUDA (test_triton.py runs on the GPU when one is present), then the decode
# benchmark (FFN at batch 1-16 for the three shapes, low-rank and 2/4-bit shadow, end-to-end generate
# of a Qwen2.5-7B-shaped model). Results land in ${OUT:-bench/results}; commit them with the device name.
#   device tool:  run(command="bash bench/gpu_session.sh", timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'" 2>/dev/null \
  || pip install -q -e ".[gpu]"
pip install -q -e . --no-deps
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu_device.txt"
python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$out/gpu_tests.txt" | tail -5
python bench/decode.py --device cuda --shadow-bits 2 4 --budget 0.5 --e2e-reps 3 --json --out "$out" \
  > "$out/decode_cuda.log" 2>&1 || tail -20 "$out/decode_cuda.log"
tail -60 "$out/decode_cuda.log"
