"""Why BAC's scheduler loses to evenly spaced steps at DDIM-10, and whether weighing the steps helps: action errors
of several schedules of one transformer checkpoint, no evaluation in the task.

For the checkpoint under DDIM-10 it calibrates BAC (256 training observations drawn with seed 0, cosine) and
compares, by the chunk's relative error against the uncached chunk (64 training observations drawn with seed 1,
which may overlap the first; the same initial noise for both chunks):

- BAC's own per-branch schedule (``step_weights=false``, ``bubble=0``: no Bubbling Union in any row) at k = 4, 5, 6
  update steps;
- BAC with ``step_weights=true`` (each step's lost similarity weighed by how far the chunk moves when that
  denoiser call's output is nudged: :func:`robolearn.accel.cache.step_sensitivity`);
- BAC with per-branch, per-step weights measured here (not shipped): for every branch ``b`` and step ``j``, the
  chunk error when ``b`` alone reuses its step ``j - 1`` output at ``j``, per unit of the similarity that loses;
- one set of steps for every branch, e.g. uniform caching's (0, 2, 4, 6, 8).

    python tools/bench/cache_step_weights_probe.py --checkpoint runs/accel/lift_dt3/checkpoints/latest \\
        --out tools/bench/results/cache_lift_ddim10_step_weights_probe.json

About 3.5 minutes on 2 threads here (213 s on 2026-12-05; the per-branch weights are 216 cached sampler runs, each
compared with uncached chunks computed once).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHARED_SETS = [(0, 2, 4, 6, 8), (0, 3, 6, 8), (0, 2, 4, 6, 8, 9), (0, 2, 5, 7, 9), (0, 3, 6, 8, 9)]


def main(argv: list[str] | None = None) -> int:
    from robolearn.accel.cache import (CacheSchedule, Reference, branch_keys, calibrate,
                                       chunk_error as schedule_error, dp_update_steps, step_sensitivity,
                                       uncached_references)
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
    step_w = step_sensitivity(policy, cal_obs[:1], sampler="ddim", steps=S)
    every = tuple(range(S))
    branch_w: dict[str, np.ndarray] = {}
    for k in keys:  # per branch and step: chunk error per unit of lost similarity, that branch alone skipping j
        g = np.zeros(S)
        for j in range(1, S):
            ups = {kk: every for kk in keys}
            ups[k] = tuple(s for s in every if s != j)
            lost = max(1e-6, float(cal.similarity[k][j, j] - cal.similarity[k][j - 1, j]))
            g[j] = chunk_error(ups, probe_refs) / lost
        g[0] = g[1:].mean()  # step 0 always updates: its weight never counts
        branch_w[k] = g / g.mean()

    rows: list[dict[str, Any]] = []
    for k in (4, 5, 6):
        for label, weights in (("bac", None), ("bac, step_weights=true", step_w), ("bac, per-branch weights", None)):
            per = {b: dp_update_steps(cal.similarity[b], k, branch_w[b] if "per-branch" in label else weights)
                   for b in keys}
            rows.append({"schedule": label, "updates": k, "action_rel_error": round(chunk_error(per, test_refs), 4),
                         "steps_of_first_branches": {b: list(per[b]) for b in keys[:3]}})
    for steps in SHARED_SETS:
        rows.append({"schedule": f"every branch at {steps}", "updates": len(steps),
                     "action_rel_error": round(chunk_error({b: steps for b in keys}, test_refs), 4)})
    result = {
        "bench": "cache step weights probe (tools/bench/cache_step_weights_probe.py)",
        "checkpoint": str(args.checkpoint), "sampler": name, "calibration_observations": 256,
        "error_observations": 64, "step_weights": [round(float(v), 4) for v in step_w],
        "branch_weights": {b: [round(float(v), 3) for v in w] for b, w in branch_w.items()},
        "rows": rows,
        "machine": {"platform": platform.platform(), "threads": args.threads},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "wall_s": round(time.time() - t_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['schedule']:<34} k={r['updates']}  action error {r['action_rel_error']:.4f}")
    print(json.dumps({"out": str(args.out), "wall_s": result["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
