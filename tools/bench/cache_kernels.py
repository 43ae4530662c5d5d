"""Caching's speedup under each transformer kernel set: does block caching still pay once the uncached transformer
runs the fused inference path (``robolearn/accel/fast_transformer.py``)?

For the ``default`` transformer preset (9.4M, random weights: speed does not depend on them) at batch 1, this
times in one process, alternating call by call, for each kernel set (``onednn``: the fused inference path, the
default; ``stock``: the models' own code) and each sampler: the uncached ``predict_action`` and the same policy
under a uniform cache schedule (every branch recomputed at ``updates`` evenly spaced steps; the compute of a BAC
schedule with the same ``updates`` is within a few percent of it: see the README's table). BAC's own success and
action error need a trained checkpoint (``tools/bench/cache_eval.py``); this measures only what the kernels do
to the speedup.

    python tools/bench/cache_kernels.py --threads 2 --out tools/bench/results/cache_kernels.json

Prints a table; last line JSON with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--configs", nargs="*", default=["ddpm:100:25", "ddim:10:5"],
                   help="SAMPLER:STEPS:UPDATES to time (default: DDPM-100 with 25 updates, DDIM-10 with 5)")
    p.add_argument("--repeats", type=int, default=None, help="alternating rounds (default: 8 for >=50 steps, else 30)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from robolearn.accel import prepare_for_inference, use_kernels
    from robolearn.accel.cache import CachedPolicy, branch_keys, uniform_schedule
    from robolearn.cli.accel import time_alternately
    from robolearn.policies import make_policy

    def s(d: int) -> dict[str, np.ndarray]:
        return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.)}

    obs_dim, act_dim, horizon, n_obs = 20, 2, 16, 2
    rows = []
    for spec in args.configs:
        kind, steps, updates = spec.split(":")
        steps, updates = int(steps), int(updates)
        torch.manual_seed(0)
        policy = make_policy({"type": "diffusion", "backbone": {"name": "transformer", "preset": "default"},
                              "horizon": horizon, "n_obs_steps": n_obs, "n_action_steps": 8,
                              "obs": {"state": [obs_dim]}, "action_dim": act_dim,
                              "sampler": {"kind": kind, "steps": steps}},
                             {"state": s(obs_dim), "action": s(act_dim)}).eval()
        prepare_for_inference(policy)
        sched = uniform_schedule(branch_keys(policy.backbone), f"{kind}-{steps}", steps, updates)
        cached = CachedPolicy(policy, sched)
        obs = {"state": torch.randn(1, n_obs, obs_dim)}
        noise = torch.randn(policy.noise_shape(1))
        fns: dict[str, Callable[[], Any]] = {}
        for kernels in ("onednn", "stock"):
            def plain(k: str = kernels) -> Any:
                use_kernels(policy, k)
                return policy.predict_action(obs, noise)

            def cache(k: str = kernels) -> Any:
                use_kernels(policy, k)
                return cached.predict_action(obs, noise)

            fns[f"{kernels}/uncached"], fns[f"{kernels}/cached"] = plain, cache
        repeats = args.repeats or (8 if steps >= 50 else 30)
        ms = {k: statistics.median(v) for k, v in time_alternately(fns, repeats, warmup=2).items()}
        for kernels in ("onednn", "stock"):
            rows.append({"sampler": f"{kind}-{steps}", "updates": updates,
                         "compute_fraction": round(sched.compute_fraction, 3), "kernels": kernels,
                         "uncached_ms": round(ms[f"{kernels}/uncached"], 1),
                         "cached_ms": round(ms[f"{kernels}/cached"], 1),
                         "speedup": round(ms[f"{kernels}/uncached"] / ms[f"{kernels}/cached"], 2),
                         **({"fused_over_stock_uncached": round(ms["onednn/uncached"] / ms["stock/uncached"], 3)}
                            if kernels == "onednn" else {})})
    result = {"bench": "uniform-cache speedup per transformer kernel set, default preset, batch 1", "rows": rows,
              "threads": torch.get_num_threads(),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"batch 1, {torch.get_num_threads()} threads, default transformer preset (random weights)")
    print(f"{'sampler':<10} {'updates':>7} {'kernels':<8} {'uncached ms':>12} {'cached ms':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['sampler']:<10} {r['updates']:>7} {r['kernels']:<8} {r['uncached_ms']:>12.1f} "
              f"{r['cached_ms']:>10.1f} {r['speedup']:>7.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
