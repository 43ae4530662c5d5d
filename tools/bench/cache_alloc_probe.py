"""Would BAC do better at DDIM-10 if its update budget were spread unevenly over the branches? Action errors only,
no evaluation in the task.

BAC's scheduler gives every branch (self-attention, cross-attention, feed-forward of each block) the same number
``k`` of update steps. This probe keeps each branch's dynamic-programming steps but lets the number vary per
branch under the same total (``k`` times the number of branches, so the same share of branch computations), chosen
greedily by the largest drop in one of two per-branch error curves:

- ``alloc-sim``: the branch's own caching error (the similarity it loses, BAC's objective) at each ``k``;
- ``alloc-iso``: the chunk's relative error when that branch alone is cached with its ``k``-step schedule and
  every other branch is computed (measured here, on one batch of calibration observations).

Each is compared, by the chunk's relative error against the uncached chunk (64 training observations, the same
initial noise for both), with BAC's equal ``k`` per branch (``bubble=0``), one DP-chosen set of steps shared by
all branches and uniform caching, at k = 4, 5, 6 of 10 steps.

    python tools/bench/cache_alloc_probe.py --checkpoint runs/accel/lift_dt5/checkpoints/latest \\
        --out tools/bench/results/cache_lift_ddim10_alloc_probe_fifth_base.json

182 s on 2 threads alone here, 292 s on one thread beside another job (2026-12-05; the isolated errors are 192
cached sampler runs).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch


def greedy_allocation(curves: dict[str, dict[int, float]], budget: int, lo: int, hi: int) -> dict[str, int]:
    """Per branch a number of update steps in ``[lo, hi]`` summing to ``budget``: start every branch at ``lo``
    and give one more step at a time to the branch whose error curve drops most by it."""
    ks = {b: lo for b in curves}
    while sum(ks.values()) < budget:
        open_ = [b for b in curves if ks[b] < hi]
        if not open_:
            break
        best = max(open_, key=lambda b: curves[b][ks[b]] - curves[b][ks[b] + 1])
        ks[best] += 1
    return ks


def main(argv: list[str] | None = None) -> int:
    from robolearn.accel.cache import (CacheSchedule, Reference, branch_keys, calibrate, caching_error,
                                       chunk_error as schedule_error, dp_update_steps, shared_schedule,
                                       uncached_references, uniform_steps)
    from robolearn.cli.accel import calibration_observations
    from robolearn.policies import load_policy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    policy = load_policy(args.checkpoint).eval()
    policy.set_sampler("ddim", args.steps)
    S, name = args.steps, f"ddim-{args.steps}"
    cal_obs = calibration_observations(policy, args.checkpoint, 256, 32, seed=0)
    test_obs = calibration_observations(policy, args.checkpoint, 64, 32, seed=1)
    keys = branch_keys(policy.backbone)

    def chunk_error(updates: dict[str, tuple[int, ...]], refs: list[Reference]) -> float:
        return schedule_error(policy, CacheSchedule("bac", name, S, updates), refs)

    cal = calibrate(policy, cal_obs)
    probe_refs, test_refs = uncached_references(policy, cal_obs[:1], 11), uncached_references(policy, test_obs, 5)
    every = tuple(range(S))
    dp = {b: {k: dp_update_steps(cal.similarity[b], k) for k in range(1, S + 1)} for b in keys}
    sim_err = {b: {k: caching_error(cal.similarity[b], dp[b][k]) for k in range(1, S + 1)} for b in keys}
    iso: dict[str, dict[int, float]] = {}
    for b in keys:
        iso[b] = {S: 0.0}
        for k in range(2, S):
            ups = {kk: every for kk in keys}
            ups[b] = dp[b][k]
            iso[b][k] = chunk_error(ups, probe_refs)

    rows: list[dict[str, Any]] = []
    for K in (4, 5, 6):
        budget = K * len(keys)
        for label, curves in (("alloc-sim", sim_err), ("alloc-iso", iso)):
            ks = greedy_allocation(curves, budget, 2, S)
            rows.append({"schedule": label, "updates": K, "action_rel_error": round(chunk_error(
                {b: dp[b][ks[b]] for b in keys}, test_refs), 4), "updates_per_branch": ks})
        rows.append({"schedule": "bac (bubble=0)", "updates": K,
                     "action_rel_error": round(chunk_error({b: dp[b][K] for b in keys}, test_refs), 4)})
        shared = shared_schedule(cal.similarity, name, K)
        rows.append({"schedule": f"shared {tuple(shared.info['steps'])}", "updates": K,
                     "action_rel_error": round(chunk_error(dict(shared.updates), test_refs), 4)})
        u = uniform_steps(S, K)
        rows.append({"schedule": f"uniform {u}", "updates": K,
                     "action_rel_error": round(chunk_error({b: u for b in keys}, test_refs), 4)})
    result = {
        "bench": "cache allocation probe (tools/bench/cache_alloc_probe.py)",
        "checkpoint": str(args.checkpoint), "sampler": name, "calibration_observations": 256,
        "error_observations": 64, "rows": rows,
        "isolated_error": {b: {str(k): round(v, 5) for k, v in c.items()} for b, c in iso.items()},
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "wall_s": round(time.time() - t_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['schedule']:<30} k={r['updates']}  action error {r['action_rel_error']:.4f}")
    print(json.dumps({"out": str(args.out), "wall_s": result["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
