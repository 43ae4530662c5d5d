"""How rugged is a base's success in its initial noise? Opposite small shifts of the noise, same scenes; no learning.

Latent-noise steering learns which noise ``w`` to give the base. Its critic can only learn that if nearby noises
lead to similar outcomes. For each base checkpoint this runs the base on the same held-out seeds (initial states
from 100000, the same chunk noise rule as ``robolearn eval``) with every chunk's noise shifted by ``+eps d`` and by
``-eps d`` (``d ~ N(0, I)`` of one chunk's noise shape, the same for every chunk of every episode of one direction),
for ``--directions`` directions and each ``--eps``, and reports per size

- ``flip_rate``: the share of (direction, seed) pairs whose success differs between ``+eps d`` and ``-eps d``;
- ``success``: the shifted runs' mean success (against ``success_unshifted``, the base as evaluated).

A base whose outcomes flip at shifts far smaller than the noise's own spread (1 per number) gives a critic over
``w`` little to generalize from: neighbouring noises disagree. The same measurement for the residual's parameters
is ``residual_ars_flip.py``.

    python tools/bench/steer_flip.py runs/rl/peg_base/checkpoints/latest runs/rl/peg_dunet/checkpoints/latest \\
        --episodes 50 --out tools/bench/results/steer_flip_peg_insert.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steer_headroom import ScaledNoise, successes  # noqa: E402 -- the same wrapper and evaluation


def probe(path: str, task: str, seeds: list[int], eps_list: list[float], directions: int, seed: int) -> dict:
    from robolearn.cli.runtime import load_checkpoint

    base = load_checkpoint(path)
    shape = tuple(base.noise_shape(1))[1:]
    gen = torch.Generator().manual_seed(seed)
    dirs = [torch.randn(shape, generator=gen) for _ in range(directions)]
    t0 = time.time()
    plain = successes(base, task, seeds, noise_seed=seeds[0])
    rows = []
    for eps in eps_list:
        flips, succ = [], []
        for d in dirs:
            plus = successes(ScaledNoise(base, shift=eps * d), task, seeds, noise_seed=seeds[0])
            minus = successes(ScaledNoise(base, shift=-eps * d), task, seeds, noise_seed=seeds[0])
            flips.append(plus != minus)
            succ += [plus.mean(), minus.mean()]
        rows.append({"eps": eps, "flip_rate": round(float(np.mean(flips)), 4),
                     "success": round(float(np.mean(succ)), 4)})
        print(f"{path}: eps {eps:g}: flip rate {rows[-1]['flip_rate']:.3f}, success {rows[-1]['success']:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    return {"checkpoint": path, "policy_type": base.policy_type, "noise_shape": list(shape),
            "sampler": dataclasses.asdict(base.cfg.sampler),
            "success_unshifted": round(float(plain.mean()), 4), "rows": rows, "wall_s": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="base chunk policies, deterministic given their noise")
    p.add_argument("--task", default="peg_insert")
    p.add_argument("--episodes", type=int, default=50, help="held-out initial states (seeds from 100000)")
    p.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.1, 0.3])
    p.add_argument("--directions", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(100_000, 100_000 + args.episodes))
    t0 = time.time()
    bases = [probe(c, args.task, seeds, args.eps, args.directions, args.seed) for c in args.checkpoints]
    doc = {"bench": "steer_flip (tools/bench/steer_flip.py)", "task": args.task, "episodes": args.episodes,
           "directions": args.directions, "bases": bases,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"{'base':<50} {'unshifted':>9} " + " ".join(f"{'eps ' + format(e, 'g'):>16}" for e in args.eps))
    for b in bases:
        cells = " ".join(f"{r['flip_rate']:>7.3f} ({r['success']:.2f})" for r in b["rows"])
        print(f"{b['checkpoint']:<50} {b['success_unshifted']:>9.3f} {cells}")


if __name__ == "__main__":
    main()
