"""Chunk latency (batch 1) and training throughput of the chunk policies.

Why: a chunk must come out faster than the robot executes the previous one; Diffusion Policy's own model
code takes about 326 ms per DDIM-10 chunk on this kind of 2-core CPU (docs: /work/shared/PLATFORM.md), and
robolearn's target is <= 260 ms for the same 64M-parameter U-Net. This script measures, for each policy
(diffusion/flow x U-Net "dp" preset / transformer "default" preset) and sampler (DDPM-100, DDIM-10,
flow Euler 10/4/1 steps):

- chunk latency: ``predict_action`` at batch 1, observation encoding included, median of ``--repeats`` runs
  after warm-up;
- one denoiser call (the backbone alone), median;
- training samples/s: one AdamW step at batch 64 through ``compute_loss`` (forward, backward, step);
- the same-run baseline for the target row (diffusion U-Net, DDIM-10, float32): the same model and weights
  computed with PyTorch's own ``Conv1d``/``ConvTranspose1d``/``F.linear`` kernels -- the path Diffusion
  Policy's model code takes, ``robolearn.accel.use_kernels(policy, "stock")`` -- so the speed-up is measured
  on the same machine in the same minute (``--no-baseline`` skips it).

robolearn's rows run the policy as the CLI does, through ``robolearn.accel.prepare_for_inference`` (oneDNN
kernels; ``ROBOLEARN_FAST_LINEAR=0`` in the environment: the plain GEMM kernels), with the bfloat16 rows'
backbone cast by ``robolearn.accel.set_inference_dtype``.

Observations are Push-T-like: a 20-d state, 2 observation steps, 2-d actions, horizon 16, 8 action steps.

    python tools/bench/latency.py --out tools/bench/results/latency.json
    python tools/bench/latency.py --quick                # small presets, few repeats
    python tools/bench/latency.py --device cuda          # on a GPU (see tools/gpu/)

Prints a table, then a one-line JSON summary as the last line of standard output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

from robolearn.accel import kernels_in_use, prepare_for_inference, set_inference_dtype, use_kernels  # noqa: E402
from robolearn.policies import ChunkPolicy, make_policy  # noqa: E402

POLICIES = {
    "diffusion_unet": ("diffusion", "unet", "dp", "small"),
    "diffusion_transformer": ("diffusion", "transformer", "default", "small"),
    "flow_unet": ("flow", "unet", "dp", "small"),
    "flow_transformer": ("flow", "transformer", "default", "small"),
}
SAMPLERS = {"diffusion": [("ddpm", 100), ("ddim", 10)], "flow": [("euler", 10), ("euler", 4), ("euler", 1)]}


def synthetic_stats(obs_dim: int, action_dim: int) -> dict[str, dict[str, np.ndarray]]:
    def s(d: int) -> dict[str, np.ndarray]:
        return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.0)}

    return {"state": s(obs_dim), "action": s(action_dim)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "n": repeats}


@contextmanager
def torch_kernels(policy: ChunkPolicy) -> Iterator[None]:
    """Run the policy's U-Net on PyTorch's stock convolution and linear kernels (Diffusion Policy's path)."""
    before = kernels_in_use(policy)
    use_kernels(policy, "stock")
    try:
        yield
    finally:
        use_kernels(policy, before or "gemm")


def build(name: str, args: argparse.Namespace, device: torch.device) -> ChunkPolicy:
    ptype, backbone, preset, quick_preset = POLICIES[name]
    cfg = {
        "type": ptype,
        "backbone": {"name": backbone, "preset": quick_preset if args.quick else preset},
        "horizon": args.horizon,
        "n_obs_steps": 2,
        "n_action_steps": 8,
        "obs": {"state": [args.obs_dim]},
        "action_dim": args.action_dim,
    }
    return make_policy(cfg, synthetic_stats(args.obs_dim, args.action_dim)).to(device)


def bench_policy(name: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    policy = build(name, args, device)
    n_params = sum(p.numel() for p in policy.parameters())
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        rows.extend(bench_sampling(policy, name, n_params, dtype, args, device))
    set_inference_dtype(policy, "float32")
    rows.extend(bench_training(policy, name, rows, args, device))
    return rows


def bench_sampling(policy: ChunkPolicy, name: str, n_params: int, dtype: str, args: argparse.Namespace,
                   device: torch.device) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    policy.eval()
    prepare_for_inference(policy, dtype=dtype)
    obs = {"state": torch.randn(1, 2, args.obs_dim, device=device)}
    noise = torch.randn(policy.noise_shape(1), device=device)

    with torch.inference_mode():
        cond = policy._prepare(policy.encode_obs(obs))
        t = torch.full((1,), 5.0, device=device)
        x = noise.to(policy.backbone_dtype)
        call = timed(lambda: policy.backbone(x, t, cond), device, args.repeats * 3, 3)

    for kind, steps in SAMPLERS[policy.policy_type]:
        nfe = steps * (2 if kind == "midpoint" else 1)
        reps = max(2, args.repeats // 3) if nfe >= 50 else args.repeats
        r = timed(lambda: policy.predict_action(obs, noise, sampler=kind, steps=steps), device, reps, 1)
        row = {"policy": name, "params_m": n_params / 1e6, "dtype": dtype, "sampler": f"{kind}-{steps}",
               "nfe": nfe, "kernels": "robolearn",
               "chunk_ms": r["median_ms"], "chunk_min_ms": r["min_ms"], "repeats": r["n"],
               "call_ms": call["median_ms"]}
        rows.append(row)
        if args.baseline and name == "diffusion_unet" and dtype == "float32" and kind == "ddim":
            with torch_kernels(policy), torch.inference_mode():
                bcall = timed(lambda: policy.backbone(x, t, cond), device, args.repeats * 3, 3)
                b = timed(lambda: policy.predict_action(obs, noise, sampler=kind, steps=steps), device, reps, 1)
            rows.append({**row, "kernels": "torch (baseline)", "chunk_ms": b["median_ms"],
                         "chunk_min_ms": b["min_ms"], "repeats": b["n"], "call_ms": bcall["median_ms"]})
            row["speedup_vs_baseline"] = b["median_ms"] / r["median_ms"]
    return rows


def bench_training(policy: ChunkPolicy, name: str, rows: list[dict[str, Any]], args: argparse.Namespace,
                   device: torch.device) -> list[dict[str, Any]]:
    """One AdamW step at batch ``--train-batch`` through compute_loss; the result is added to ``rows``."""
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    B = args.train_batch
    batch = {"obs": {"state": torch.randn(B, 2, args.obs_dim, device=device)},
             "action": torch.rand(B, args.horizon, args.action_dim, device=device) * 2 - 1}

    def step() -> None:
        loss = policy.compute_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    r = timed(step, device, args.train_steps, 1)
    for row in rows:
        row["train_step_ms"] = r["median_ms"]
        row["train_samples_per_s"] = B / (r["median_ms"] / 1e3)
    return []


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'policy':<22} {'params':>7} {'dtype':<8} {'kernels':<17} {'sampler':<10} {'NFE':>4} {'chunk ms':>9} " \
           f"{'min ms':>8} {'call ms':>8} {'train samp/s':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['policy']:<22} {r['params_m']:>6.2f}M {r['dtype']:<8} {r['kernels']:<17} {r['sampler']:<10} "
              f"{r['nfe']:>4} {r['chunk_ms']:>9.1f} "
              f"{r['chunk_min_ms']:>8.1f} {r['call_ms']:>8.2f} {r['train_samples_per_s']:>12.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="small presets and few repeats (a smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--dtypes", nargs="*", default=["float32"], choices=["float32", "bfloat16"],
                   help="backbone dtypes to time sampling with (bfloat16: robolearn.accel.set_inference_dtype)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip the same-run baseline (the diffusion U-Net's DDIM-10 chunk on PyTorch's stock "
                        "Conv1d/ConvTranspose1d/F.linear kernels, the path Diffusion Policy's code takes)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--obs-dim", type=int, default=20)
    p.add_argument("--action-dim", type=int, default=2)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.train_steps = args.train_steps or (2 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    load_before = os.getloadavg()
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    for name in args.policies:
        rows.extend(bench_policy(name, args, device))
    print_table(rows)
    result = {
        "bench": "latency",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "seconds": time.time() - t0,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    key = [r for r in rows if r["policy"] == "diffusion_unet" and r["sampler"] == "ddim-10"
           and r["dtype"] == "float32"]
    ours = [r for r in key if r["kernels"] == "robolearn"]
    base = [r for r in key if r["kernels"] != "robolearn"]
    summary = {"bench": "latency", "out": str(args.out) if args.out else None, "device": str(device),
               "threads": torch.get_num_threads(), "quick": args.quick,
               "diffusion_unet_ddim10_ms": round(ours[0]["chunk_ms"], 1) if ours else None,
               "baseline_ddim10_ms": round(base[0]["chunk_ms"], 1) if base else None}
    print(json.dumps(summary))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
