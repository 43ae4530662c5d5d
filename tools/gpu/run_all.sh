#!/usr/bin/env bash
# Every GPU check and benchmark of robolearn in one call, for the lent device machine (the device tool's README):
# it installs nothing it cannot carry. The device image has PyTorch, numpy, tqdm, msgpack and pyyaml; zarr (with its
# compiled dependencies) and diffusers travel as Python 3.12 wheels fetched here (the folder is ignored by git):
#
#   (here, once)   echo /.gpu-wheels/ >> .git/info/exclude
#                  .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#                      --platform manylinux2014_x86_64 -d .gpu-wheels zarr==3.1.6 numcodecs==0.16.6 \
#                      donfig==0.8.1.post1 google-crc32c==1.9.0 diffusers==0.42.1 importlib_metadata
#   (device call)  carry=[".gpu-wheels"]  command: bash tools/gpu/run_all.sh   (120 s on an H100, 2026-12-05)
#
# 1. tools/gpu/graph_latency.py: batch-1 chunk latency eager / CUDA graph (each denoiser call, and the whole chunk
#    as one graph for deterministic samplers), float32 / bfloat16, for the 64M U-Net
#    (also on PyTorch's stock kernels, Diffusion Policy's path, the same-run baseline) and the transformer, with
#    each one's agreement with the same weights on the CPU (TF32 off);
# 2. tools/bench/latency.py --device cuda: every policy and sampler eager, float32 and bfloat16, and one training
#    step's throughput.
# Writes JSON and logs under $OUT (or runs/gpu) and prints a table last. Runs on a CPU too (graph rows skipped):
#   DRY=1 bash tools/gpu/run_all.sh
# COMPILE=1 adds the U-Net compiled with torch.compile (inductor) under the same graph modes; give it
# GRAPH_TIMEOUT=540 and the device call timeout_s=600 (compilation takes minutes).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
[ -x .venv/bin/python ] && [ -n "${DRY:-}" ] && PY=.venv/bin/python
if [ -d .gpu-wheels ] && [ -z "${DRY:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu-wheels/*.whl || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${DRY:-}" ]; then DEV=cpu; REPS=1; else DEV=cuda; REPS=50; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"; } 2>&1 | tee "$OUT/gpu.txt"

COMPILE_FLAG=(); [ -n "${COMPILE:-}" ] && COMPILE_FLAG=(--compile)   # COMPILE=1: torch.compile rows too (minutes)
timeout "${GRAPH_TIMEOUT:-300}" $PY tools/gpu/graph_latency.py --device "$DEV" --repeats "$REPS" "${COMPILE_FLAG[@]}" \
  --out "$OUT/graph_latency.json" 2>&1 | tee "$OUT/graph.txt"
echo "graph_latency.py exit status ${PIPESTATUS[0]}" | tee -a "$OUT/graph.txt"
if [ -n "${DRY:-}" ]; then LAT=(--quick --device cpu); else LAT=(--device cuda); fi
timeout 240 $PY tools/bench/latency.py "${LAT[@]}" --dtypes float32 bfloat16 --out "$OUT/latency_gpu.json" \
  2>&1 | tee "$OUT/latency.txt"
echo "latency.py exit status ${PIPESTATUS[0]}" | tee -a "$OUT/latency.txt"

echo
echo "== table =="
cat "$OUT/gpu.txt"
grep -A 30 "^policy " "$OUT/latency.txt" | grep -v '^{' || tail -n 5 "$OUT/latency.txt"
echo
grep -A 20 "^policy " "$OUT/graph.txt" || tail -n 8 "$OUT/graph.txt"
