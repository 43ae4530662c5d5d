"""GPU latency at batch 1: eager against CUDA-graph sampling (robolearn.accel.graphed), float32 and bfloat16, and
their agreement with the same policy on the CPU. Run by tools/gpu/run_all.sh on a lent GPU; prints a table and
writes JSON (``--out``).

Policies: the 64M U-Net (``dp`` preset) with DDIM-10 (the issue's target: <= 8 ms per chunk, stretch <= 5 ms;
Diffusion Policy's own code took 38-52 ms eager and 15.3 ms as a CUDA graph on an H200), also on PyTorch's stock
kernels (``use_kernels(policy, "stock")``: the layers Diffusion Policy's model code runs) as the same-run
baseline, and the 9M transformer (``default`` preset) with DDIM-10 and DDPM-100, uncached and with a uniform block
cache (a quarter of the steps). Agreement is against the same weights in float32 on the CPU; the GPU's float32
rows run with TF32 off (``--tf32`` allows it), so a difference over 1e-3 there is a bug, not rounding.

    python tools/gpu/graph_latency.py --out graph_latency.json          # on a GPU
    python tools/gpu/graph_latency.py --device cpu --repeats 2          # a dry run of the code paths on a CPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from robolearn.accel import graphed, prepare_for_inference, use_kernels  # noqa: E402
from robolearn.accel.cache import CachedPolicy, branch_keys, uniform_schedule  # noqa: E402
from robolearn.policies import make_policy  # noqa: E402


def stats(d: int) -> dict:
    return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.0)}


def build(backbone: str, preset: str, sampler: tuple[str, int], ptype: str = "diffusion"):
    torch.manual_seed(0)
    cfg = {"type": ptype, "backbone": {"name": backbone, "preset": preset}, "obs": {"state": [20]},
           "action_dim": 2, "sampler": {"kind": sampler[0], "steps": sampler[1]}}
    p = make_policy(cfg, {"state": stats(20), "action": stats(2)}).eval()
    for m in p.backbone.modules():  # away from zero-initialized output layers, so agreement means something
        if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, 0, 0.02)
    return p


#: largest relative difference from the CPU's float32 chunk that counts as agreement (TF32 off for float32)
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, repeats: int, dev: torch.device) -> float:
    for _ in range(3):
        fn()
    sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", default="cuda", help="cuda; cpu for a dry run (graph rows are skipped there)")
    ap.add_argument("--tf32", action="store_true", help="let float32 matrix products and convolutions use TF32")
    ap.add_argument("--compile", action="store_true",
                    help="also the 64M U-Net at DDIM-10 with its backbone compiled (torch.compile, inductor, no "
                         "CUDA graphs of its own) under the same graph modes: minutes of compilation")
    ap.add_argument("--only", choices=["robolearn", "stock", "compiled"], default=None,
                    help="only the rows of this kernel set (e.g. a dry run of the compiled rows on a CPU)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    rows = []
    cases = [("unet", "dp", ("ddim", 10), None, "robolearn"), ("unet", "dp", ("ddim", 10), None, "stock"),
             ("transformer", "default", ("ddim", 10), None, "robolearn"),
             ("transformer", "default", ("ddpm", 100), None, "robolearn"),
             ("transformer", "default", ("ddpm", 100), 25, "robolearn"),
             ("transformer", "default", ("euler", 10), None, "robolearn")]
    if args.compile:
        cases.append(("unet", "dp", ("ddim", 10), None, "compiled"))
    if args.only:
        cases = [c for c in cases if c[4] == args.only]
    # graph: the whole chunk as one CUDA graph (deterministic samplers); graph-call: one graph per denoiser call
    modes = [("eager", "float32"), ("eager", "bfloat16"), ("graph-call", "float32"), ("graph-call", "bfloat16"),
             ("graph", "float32"), ("graph", "bfloat16")]
    obs_cpu = {"state": torch.randn(1, 2, 20)}
    obs2_cpu = {"state": torch.randn(1, 2, 20)}  # a second input, after capture: a graph must not keep the first
    for backbone, preset, sampler, cache, kernels in cases:
        ptype = "flow" if sampler[0] in ("euler", "midpoint") else "diffusion"
        cpu = build(backbone, preset, sampler, ptype)
        noise = torch.randn(cpu.noise_shape(1))
        noise2 = torch.randn(cpu.noise_shape(1))
        ref = cpu.predict_action(obs_cpu, noise)
        ref2 = cpu.predict_action(obs2_cpu, noise2)
        obs = {"state": obs_cpu["state"].to(dev)}
        obs2 = {"state": obs2_cpu["state"].to(dev)}
        for mode, dtype in modes:
            if mode.startswith("graph") and dev.type != "cuda":
                continue
            if mode == "graph" and sampler[0] == "ddpm":  # stochastic: per-call graphs only
                continue
            if kernels == "stock" and dtype != "float32":
                continue
            if kernels == "compiled" and mode == "graph-call" and dtype == "float32":
                continue  # bf16 per-call and both whole-loop modes are the ones worth the compile time
            gpu = build(backbone, preset, sampler, ptype).to(dev)
            prepare_for_inference(gpu, dtype=dtype)
            if kernels == "stock":
                use_kernels(gpu, "stock")
            if kernels == "compiled":  # prepare_for_inference has cast it: the compiled code is per dtype
                use_kernels(gpu, "gemm")  # the models' plain forwards (what a GPU runs anyway): traceable
                gpu.backbone = torch.compile(gpu.backbone, mode="max-autotune-no-cudagraphs", dynamic=False)
            pol = graphed(gpu, dtype=dtype, whole=(mode == "graph")) if mode.startswith("graph") else gpu
            if cache:
                name = f"{sampler[0]}-{sampler[1]}"
                sched = uniform_schedule(branch_keys(gpu.backbone), name, sampler[1], cache)
                pol = CachedPolicy(gpu, sched) if mode == "eager" else None
                if pol is None:  # a cache's reuse is per step: its graph would be one per step; eager only
                    continue
            nz = noise.to(dev)
            ms = timed(lambda: pol.predict_action(obs, nz), args.repeats, dev)
            out = pol.predict_action(obs, nz).cpu()
            rel = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            out2 = pol.predict_action(obs2, noise2.to(dev)).cpu()
            rel2 = float((out2 - ref2).norm() / ref2.norm().clamp_min(1e-12))
            bound = TOLERANCE[dtype] * (100 if cache else 1)  # a cache's own error: about 2e-3 at k=25
            ok = max(rel, rel2) < bound
            whole_errors = getattr(pol, "whole_loop_errors", None) or None
            if whole_errors:
                print(f"whole-loop capture failed, per-call graphs used: {whole_errors}", flush=True)
            label = {"stock": " (stock)", "compiled": " (compiled)"}.get(kernels, "")
            rows.append({"whole_loop_errors": whole_errors, "backbone": f"{ptype} {backbone} {preset}{label}",
                         "sampler": f"{sampler[0]}-{sampler[1]}",
                         "cache": f"uniform k={cache}" if cache else "none", "mode": mode, "dtype": dtype,
                         "chunk_ms": round(ms, 3), "rel_diff_vs_cpu_fp32": rel,
                         "rel_diff_vs_cpu_fp32_second_input": rel2, "agrees": ok})
            print(rows[-1], flush=True)
    print(f"\n{'policy':<34} {'sampler':<9} {'cache':<13} {'mode':<10} {'dtype':<9} {'chunk ms':>9} "
          f"{'vs CPU':>9} {'2nd input':>9}")
    for r in rows:
        mode = r["mode"] + ("!" if r["whole_loop_errors"] else "")
        print(f"{r['backbone']:<34} {r['sampler']:<9} {r['cache']:<13} {mode:<10} {r['dtype']:<9} "
              f"{r['chunk_ms']:>9.2f} {r['rel_diff_vs_cpu_fp32']:>9.1e} {r['rel_diff_vs_cpu_fp32_second_input']:>9.1e}"
              + ("" if r["agrees"] else "  DISAGREES"))
    bad = [r for r in rows if not r["agrees"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} rows agree with the CPU (float32 < {TOLERANCE['float32']:g}, "
          f"bfloat16 < {TOLERANCE['bfloat16']:g}, relative; '!': the whole-loop capture fell back to per-call graphs)")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                                        "torch": torch.__version__, "tf32": bool(args.tf32), "repeats": args.repeats,
                                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "rows": rows}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
