#!/usr/bin/env python
"""Which caching schedule keeps the chunk closest to the uncached one at the same compute? One calibration, then
every schedule's action error on the same held-out observations and initial noise.

For a trained transformer checkpoint and a sampler, the script calibrates once (``--observations`` training
observations, every branch recorded at every step, cosine and negative-L1 similarities), builds for each
``--updates`` k:

- ``bac``: BAC, each branch's own k update steps by dynamic programming, then Bubbling Union (``--bubble``);
- ``bac_nobubble``: the same without Bubbling Union;
- ``shared``: one set of k adaptive steps for every branch (the dynamic program on the branches' mean similarity);
- ``uniform``: every branch at k evenly spaced steps; and ``uniform_matched``: at BAC's compute after the union;
- ``shared_searched`` (``--search K``): the shared set of k steps with the smallest action error on one
  calibration batch, by exhaustive search (other observations and noise than those the error is reported on);
- ``bac_weighted`` / ``shared_weighted``: the same dynamic programs with each skipped step's similarity loss
  weighted by that step's measured sensitivity (:func:`step_sensitivity`: how far the chunk moves when that
  step's denoiser output is perturbed),

and measures each one's relative action error ||cached - uncached|| / ||uncached|| on ``--eval-observations``
other training observations with the same initial noise (batch 1 each, as a robot runs it). The compute fraction
(branch computations made / uncached) stands for speed: at batch 1 the latency follows it (README, BAC table).

    .venv/bin/python tools/bench/cache_schedules.py --checkpoint runs/accel/lift_dt/checkpoints/latest \\
        --sampler ddim --steps 10 --updates 4 5 6 --out tools/bench/results/cache_schedules_lift_ddim10.json

Prints a table; the JSON holds every number and every schedule's update steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

from robolearn.accel.cache import relative_error as rel_error  # noqa: E402


def step_sensitivity(policy, batches, seed: int = 0, eps: float = 0.05) -> list[float]:
    """How much the chunk moves when the denoiser's output at one step moves: per step ``j``, the mean relative
    change of the final action when step ``j``'s output gets Gaussian noise of ``eps`` times its RMS, over
    ``eps`` (the same initial noise). Samplers weigh steps very differently (a DDIM step near the end moves the
    sample little per unit of its noise estimate), which branch similarities alone do not see."""
    import torch

    sc = policy.sampler_config

    class Perturbed:
        def __init__(self, j: int, gen: torch.Generator) -> None:
            self.j, self.gen = j, gen

        def __call__(self, x, t, prepared, step=None):
            out = policy.backbone(x, t, prepared, step=step)
            if step is not None and step.index == self.j:
                rms = out.float().pow(2).mean().sqrt()
                out = out + eps * rms * torch.randn(out.shape, generator=self.gen).to(out.dtype)
            return out

    gen = torch.Generator().manual_seed(seed)
    noises = [torch.randn(policy.noise_shape(int(next(iter(b.values())).shape[0])), generator=gen)
              for b in batches]
    with torch.no_grad():
        base = [policy.predict_action(b, n) for b, n in zip(batches, noises)]
        from robolearn.accel.cache import backbone_calls

        total = backbone_calls(policy, sc["kind"], sc["steps"])
        out = []
        for j in range(total):
            d = Perturbed(j, torch.Generator().manual_seed(seed + 1 + j))
            rel = [float(rel_error(policy.predict_action(b, n, denoiser=d), a).mean())
                   for b, n, a in zip(batches, noises, base)]
            out.append(sum(rel) / len(rel) / eps)
    return out


def weigh(sim, weights):
    """A similarity matrix whose dynamic program minimizes the sensitivity-weighted loss of the skipped steps:
    entry ``[i, j]`` = ``w_j * (sim[i, j] - sim[j, j])`` (0 at an update step, negative where step ``j`` reusing
    step ``i``'s output loses similarity, scaled by how much step ``j`` moves the chunk)."""
    sim = np.asarray(sim, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    return w[None, :] * (sim - np.diag(sim)[None, :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--sampler", default=None, help="ddim, ddpm, euler, midpoint (default: the checkpoint's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--updates", type=int, nargs="+", default=[5])
    ap.add_argument("--metrics", nargs="+", default=["cosine", "l1"])
    ap.add_argument("--bubble", type=int, default=4)
    ap.add_argument("--observations", type=int, default=256, help="calibration observations")
    ap.add_argument("--eval-observations", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--search", type=int, default=0,
                    help="also search every shared set of k update steps (k up to this) for the smallest action "
                         "error on one calibration batch (not the observations the error is reported on)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from robolearn.accel.cache import (CachedPolicy, CacheSchedule, bac_schedule, calibrate,
                                       schedule_from_calibration, searched_schedule, shared_schedule,
                                       uniform_schedule)
    from robolearn.cli.accel import calibration_observations
    from robolearn.cli.runtime import load_checkpoint

    t0 = time.time()
    policy = load_checkpoint(args.checkpoint)
    if args.sampler is not None or args.steps is not None:
        policy.set_sampler(args.sampler, args.steps)
    sc = policy.sampler_config
    cal_obs = calibration_observations(policy, args.checkpoint, args.observations, 32, seed=0)
    test_obs = calibration_observations(policy, args.checkpoint, args.eval_observations, 1, seed=1)
    gen = torch.Generator().manual_seed(1)
    noises = [torch.randn(policy.noise_shape(1), generator=gen) for _ in test_obs]
    with torch.no_grad():
        reference = [policy.predict_action(o, n) for o, n in zip(test_obs, noises)]

    def action_error(sched: CacheSchedule) -> dict:
        cached = CachedPolicy(policy, sched)
        errs = []
        with torch.no_grad():
            for o, n, a in zip(test_obs, noises, reference):
                errs.append(float(rel_error(cached.predict_action(o, n), a)))
        return {"action_rel_error": round(statistics.mean(errs), 5),
                "action_rel_error_median": round(statistics.median(errs), 5),
                "compute_fraction": round(sched.compute_fraction, 4)}

    weights = step_sensitivity(policy, cal_obs[:2], seed=0)
    print("step sensitivity (relative action change per relative output change):",
          " ".join(f"{w:.3f}" for w in weights), flush=True)
    rows = []
    for metric in args.metrics:
        cal = calibrate(policy, cal_obs, metric=metric, seed=0)
        for k in args.updates:
            bac = schedule_from_calibration(cal, "bac", k, bubble=args.bubble)
            scheds = {
                "bac": bac,
                "bac_nobubble": schedule_from_calibration(cal, "bac", k, bubble=0),
                "shared": schedule_from_calibration(cal, "shared", k),
                "uniform": uniform_schedule(list(cal.similarity), cal.sampler, cal.total, k),
            }
            weighted = {key: weigh(sim, weights) for key, sim in cal.similarity.items()}
            scheds["bac_weighted"] = bac_schedule(weighted, cal.n_blocks, cal.sampler, k, bubble=0)
            scheds["shared_weighted"] = shared_schedule(weighted, cal.sampler, k)
            if args.search and metric == args.metrics[0] and k <= args.search:
                # one calibration batch, its own noise (seed 7): not the observations the error is reported on
                scheds["shared_searched"] = searched_schedule(policy, [cal_obs[0]], k, seed=7)
            matched = max(1, round(bac.compute_fraction * cal.total))
            if matched != k:
                scheds["uniform_matched"] = uniform_schedule(list(cal.similarity), cal.sampler, cal.total, matched)
            for name, sched in scheds.items():
                if metric != args.metrics[0] and name.startswith("uniform"):
                    continue  # the same schedules as under the first metric
                row = {"metric": metric, "updates": k, "schedule": name, **action_error(sched)}
                if name.startswith(("shared", "uniform")):  # one set of steps for every branch
                    row["steps"] = list(next(iter(sched.updates.values())))
                else:
                    row["updates_per_branch"] = {b: list(s) for b, s in sched.updates.items()}
                rows.append(row)
                print(f"{metric:6s} k={k:<3d} {name:16s} compute {row['compute_fraction']:.3f}  "
                      f"action error {row['action_rel_error']:.4f} (median {row['action_rel_error_median']:.4f})",
                      flush=True)
    result = {"bench": "caching schedules at equal compute (tools/bench/cache_schedules.py)",
              "checkpoint": str(args.checkpoint), "sampler": f"{sc['kind']}-{sc['steps']}",
              "calibration_observations": args.observations, "eval_observations": len(test_obs),
              "bubble": args.bubble, "step_sensitivity": [round(w, 5) for w in weights], "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}",
              "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "wall_s": round(time.time() - t0)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'metric':6s} {'k':>3s} {'schedule':16s} {'compute':>8s} {'action error':>12s}")
    for r in rows:
        print(f"{r['metric']:6s} {r['updates']:3d} {r['schedule']:16s} {r['compute_fraction']:8.3f} "
              f"{r['action_rel_error']:12.4f}")


if __name__ == "__main__":
    main()
