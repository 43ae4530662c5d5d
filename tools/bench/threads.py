"""How many torch threads: training steps and batch-1 chunk latency at 1 and N threads, on a quiet machine and
beside other work, measured in one run (the data behind robolearn/cli/threads.py's defaults).

    python tools/bench/threads.py                       # JSON in tools/bench/results/threads.json

Conditions: "quiet" (nothing else running: check the load average printed first); "beside MuJoCo" (one process
stepping peg_insert with random actions, as an evaluation worker or the runner's simulation does); "beside torch"
(another process running torch matrix products with torch's default thread count, as a second training job does).
Models are the CPU defaults (`diffusion_unet`, `cpu` preset, 1.2M; batch 128 for training) on Push-T-sized inputs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

OBS = {"agent_pos": [2], "block_pose": [3], "block_yaw_sincos": [2]}


def _load_mujoco(stop: "mp.synchronize.Event") -> None:
    import sim

    env = sim.make("peg_insert")
    env.reset(seed=0)
    while not stop.is_set():
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()


def _load_torch(stop: "mp.synchronize.Event") -> None:
    import torch

    a = torch.randn(512, 512)
    while not stop.is_set():
        a = torch.tanh(a @ a * 1e-3)


def _policy(threads: int):
    import torch

    from robolearn.policies import make_policy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    stats = {k: {"min": -np.ones(n), "max": np.ones(n), "mean": np.zeros(n), "std": np.ones(n)}
             for k, (n,) in {**OBS, "action": [2]}.items()}
    return make_policy({"type": "diffusion", "backbone": {"name": "unet", "preset": "cpu"}, "obs": OBS,
                        "action_dim": 2}, stats)


def measure(threads: int, repeats: int) -> dict:
    import torch

    from robolearn.accel import prepare_for_inference

    policy = _policy(threads)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    batch = {"obs": {k: torch.randn(128, 2, n) for k, (n,) in OBS.items()}, "action": torch.randn(128, 16, 2)}
    policy.train()
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        loss = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    train_ms = 1000 * statistics.median(times)
    policy = prepare_for_inference(policy.eval())
    obs = {k: torch.randn(1, 2, n) for k, (n,) in OBS.items()}
    lat = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        policy.predict_action(obs)
        if i >= 2:
            lat.append(time.perf_counter() - t0)
    return {"threads": threads, "train_step_ms": round(train_ms, 1), "chunk_ms_ddim10": round(1000 * statistics.median(lat), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/threads.json")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average before: {os.getloadavg()}", flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    for condition, target in (("quiet", None), ("beside MuJoCo", _load_mujoco), ("beside torch", _load_torch)):
        stop = ctx.Event()
        proc = None
        if target is not None:
            proc = ctx.Process(target=target, args=(stop,), daemon=True)
            proc.start()
            time.sleep(3.0)  # let it import and settle
        for threads in sorted({1, cores}):
            r = {"condition": condition, **measure(threads, args.repeats)}
            rows.append(r)
            print(r, flush=True)
        if proc is not None:
            stop.set()
            proc.join(10)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(), "cores": cores,
           "python": platform.python_version(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\n{'condition':<14} {'threads':>7} {'train step ms (b128)':>21} {'DDIM-10 chunk ms (b1)':>22}")
    for r in rows:
        print(f"{r['condition']:<14} {r['threads']:>7} {r['train_step_ms']:>21.1f} {r['chunk_ms_ddim10']:>22.1f}")
    print(json.dumps({"out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
