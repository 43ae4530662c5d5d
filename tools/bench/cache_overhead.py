"""What a cached denoising step costs beyond the branches it computes, on one trained transformer checkpoint.

Times ``predict_action`` at batch 1 in one process, alternating call by call: the uncached policy, a cache with
every branch computed at every step (its cost over the uncached call is the cache's bookkeeping), a cache that
computes only at step 0 (what no cache removes: the sampler's update, the input embedding, the head, the loop),
and any cached checkpoints given (their schedules over the same base).

    python tools/bench/cache_overhead.py --checkpoint runs/accel/push_t_dt/checkpoints/latest --sampler ddpm \\
        --steps 100 --cached runs/accel/push_t_ddpm100_fused/bac runs/accel/push_t_ddpm100_fused/shared \\
        --out tools/bench/results/cache_overhead_push_t_ddpm100.json

Prints a table; last line JSON with every row. Run it alone: latencies are only comparable within one quiet run.
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

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a diffusion/flow transformer checkpoint")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cached", nargs="*", type=Path, default=[], help="cached checkpoints over this base")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from robolearn.accel.cache import CachedPolicy, all_steps, backbone_calls, branch_keys, uniform_schedule
    from robolearn.cli.accel import time_alternately
    from robolearn.cli.runtime import load_checkpoint
    from robolearn.policies import read_checkpoint_config

    base = load_checkpoint(args.checkpoint)
    sc = base.sampler_config
    kind, steps = args.sampler or sc["kind"], args.steps or int(sc["steps"])
    base.set_sampler(kind, steps)
    name, total = f"{kind}-{steps}", backbone_calls(base, kind, steps)
    keys = branch_keys(base.backbone)
    policies: dict[str, Any] = {
        "uncached": base,
        "cache, every branch every step": CachedPolicy(base, all_steps(keys, name, total)),
        "cache, step 0 only": CachedPolicy(base, uniform_schedule(keys, name, total, 1)),
    }
    for path in args.cached:  # only the schedule is read: it runs over this process's base (weights checked)
        cfg = read_checkpoint_config(path)
        if cfg.get("type") != "cached":
            raise SystemExit(f"{path} is not a cached checkpoint (type {cfg.get('type')!r})")
        if cfg["schedule"].get("sampler") != name:  # before wrapping, which would switch the base's sampler
            raise SystemExit(f"{path} was calibrated for {cfg['schedule'].get('sampler')}, not {name}")
        cached = CachedPolicy(base, cfg["schedule"])
        policies[f"{cached.schedule.method} ({path.name})"] = cached
    torch.manual_seed(0)
    obs = {k: torch.randn(1, base.n_obs_steps, *shape) * 0.3 for k, shape in base.cfg.obs.items()}
    noise = torch.randn(base.noise_shape(1))
    fns: dict[str, Callable[[], Any]] = {k: (lambda pol=pol: pol.predict_action(obs, noise))
                                         for k, pol in policies.items()}
    t0 = time.time()
    ms = {k: statistics.median(v) for k, v in time_alternately(fns, args.repeats, warmup=1).items()}
    ref = ms["uncached"]
    fraction = {k: p.schedule.compute_fraction if isinstance(p, CachedPolicy) else 1.0 for k, p in policies.items()}
    rows = [{"policy": k, "compute_fraction": round(fraction[k], 4), "chunk_ms": round(v, 1),
             "speedup": round(ref / v, 3)} for k, v in ms.items()]
    result = {"bench": "cached-step overhead (tools/bench/cache_overhead.py)", "checkpoint": str(args.checkpoint),
              "sampler": name, "batch": 1, "repeats": args.repeats, "threads": args.threads, "rows": rows,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count()},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
              "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"{name}, batch 1, {args.threads} threads, {args.repeats} alternations")
    print(f"{'policy':<44} {'compute':>8} {'chunk ms':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['policy']:<44} {r['compute_fraction']:>8.1%} {r['chunk_ms']:>9.1f} {r['speedup']:>7.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
