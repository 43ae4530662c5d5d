"""Probes of what a per-step residual could do for a peg_insert base, without any learning.

Runs the base chunk policy through the executor's per-step corrector hook with three kinds of corrections and
reports success over the same seeds, computed by :func:`robolearn.evaluation.evaluate` as ``robolearn eval`` and
``finetune``'s evaluations compute it (seeds from 100000, the same chunk noise):

- ``none``: the base alone;
- ``noise STD``: white Gaussian noise of standard deviation STD added to every action (what a residual's
  exploration does to the base; ``action_scale`` x exp(``init_log_std``) is 0.037 at the defaults);
- ``steer SCALE GAIN``: a hand-written residual ``SCALE x clip(GAIN x tip_to_hole_xy / max_step, -1, 1)`` on
  x/y: how far a correction of this size could take the base.

    python tools/bench/residual_probes.py runs/peg_base_n02/checkpoints/latest --episodes 60 \\
        --out tools/bench/results/residual_probes_peg_insert.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def run(policy, corrector, seeds: list[int]) -> float:
    """Success rate over ``seeds`` exactly as ``robolearn eval`` computes it (same seeds, same noise rule)."""
    import sim
    from robolearn.evaluation import evaluate

    return float(evaluate(policy, lambda: sim.make("peg_insert"), seeds, noise_seed=seeds[0],
                          corrector=corrector)["success_rate"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a peg_insert base checkpoint")
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--noise", type=float, nargs="*", default=[0.037, 0.11])
    p.add_argument("--steer", type=str, nargs="*", default=["0.1:1", "0.1:5", "0.3:5"], help="SCALE:GAIN pairs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from robolearn.cli.runtime import load_checkpoint

    policy = load_checkpoint(args.checkpoint)
    seeds = list(range(100_000, 100_000 + args.episodes))
    rows = [{"probe": "none", "success": run(policy, None, seeds)}]
    for std in args.noise:
        rng = np.random.default_rng(0)

        def noisy(obs, base, ids, std=std, rng=rng):
            return base + std * rng.standard_normal(base.shape).astype(np.float32)

        rows.append({"probe": f"noise {std}", "success": run(policy, noisy, seeds)})
    for pair in args.steer:
        scale, gain = (float(x) for x in pair.split(":"))

        def steer(obs, base, ids, scale=scale, gain=gain):
            r = np.zeros_like(base)
            r[:, :2] = np.clip(gain * np.asarray(obs["tip_to_hole"])[:, :2] / 0.005, -1.0, 1.0)
            return base + scale * r

        rows.append({"probe": f"steer scale {scale} gain {gain}", "success": run(policy, steer, seeds)})
    for r in rows:
        print(f"{r['probe']:<28} success {r['success']:.3f}")
    doc = {"bench": "residual_probes", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(args.checkpoint),
           "episodes": args.episodes, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({"bench": "residual_probes", "out": str(args.out)}))


if __name__ == "__main__":
    main()
