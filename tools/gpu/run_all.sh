#!/usr/bin/env bash
# Every GPU check and benchmark of robolearn in one call, for the lent device machine (see the device tool's
# README): it installs nothing it cannot carry. The device image has PyTorch; the project's pure-Python
# dependencies come from a wheelhouse built on the development machine and carried along:
#
#   (dev machine)  .venv/bin/pip download -d .gpu-wheels diffusers safetensors einops omegaconf hydra-core \
#                      zarr numcodecs gymnasium tqdm msgpack websockets pyyaml --no-deps
#   (device call)  carry=[".gpu-wheels"]  command: bash tools/gpu/run_all.sh
#
# Writes JSON under $OUT (or ./runs/gpu) and prints a table last.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
if [ -d .gpu-wheels ]; then
  python -m pip install -q --no-index --find-links .gpu-wheels --no-deps .gpu-wheels/*.whl >/dev/null 2>&1 || true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
# 1. Policy tests on the GPU device where they take one (correctness before speed).
python - <<'PY' | tee "$OUT/check.txt"
import torch
from robolearn.policies import make_policy
import numpy as np
dev = torch.device("cuda")
stats = {"state": {k: v for k, v in dict(min=-np.ones(20), max=np.ones(20), mean=np.zeros(20), std=np.ones(20)).items()},
         "action": dict(min=-np.ones(2), max=np.ones(2), mean=np.zeros(2), std=np.ones(2))}
for ptype, bb, preset in [("diffusion", "unet", "dp"), ("flow", "transformer", "default")]:
    cfg = {"type": ptype, "backbone": {"name": bb, "preset": preset}, "obs": {"state": [20]}, "action_dim": 2}
    torch.manual_seed(0)
    cpu = make_policy(cfg, stats).eval()
    gpu = make_policy(cfg, stats).eval().to(dev)
    gpu.load_state_dict(cpu.state_dict())
    obs = {"state": torch.randn(2, 2, 20)}
    noise = torch.randn(cpu.noise_shape(2))
    a = cpu.predict_action(obs, noise=noise)
    b = gpu.predict_action({k: v.to(dev) for k, v in obs.items()}, noise=noise.to(dev)).cpu()
    rel = float((a - b).norm() / a.norm())
    print(f"check {ptype}_{bb}: relative difference cpu vs gpu {rel:.2e} ({'ok' if rel < 1e-3 else 'FAIL'})")
PY
# 2. Chunk latency and training throughput, every policy and sampler.
python tools/bench/latency.py --device cuda --out "$OUT/latency_gpu.json" | tee "$OUT/latency.txt"
# 3. CUDA-graph sampling (robolearn.accel.graphed) against eager, fp32 and bf16, with agreement to the CPU.
python tools/gpu/graph_latency.py --out "$OUT/graph_latency.json" | tee "$OUT/graph.txt" || echo "graph_latency FAILED"
echo
echo "== table =="
grep -E "check " "$OUT/check.txt" || true
tail -n 30 "$OUT/latency.txt"
echo
tail -n 12 "$OUT/graph.txt" || true
