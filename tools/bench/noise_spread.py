"""How far does a base policy's chunk move when only its initial noise changes? A probe, no learning.

Latent-noise steering can only choose among the chunks a frozen base makes for some noise, so the spread of those
chunks at one observation bounds what steering can do there. This rolls each base out on held-out seeds (through
:func:`robolearn.evaluation.evaluate`, as ``robolearn eval`` does) and, at every decision, runs the base again on
``--draws`` independent N(0, I) noises for the same observation history. Per checkpoint it reports, over all
decisions, the standard deviation across draws of the executed part of the chunk (raw action units, per action
dimension, averaged over the executed steps) -- the mean, and the median of each decision's largest dimension --
and the same at the noise bound's edge (``1.5 x eps`` clipped to 1.5, as far as a steering actor reaches).

    python tools/bench/noise_spread.py runs/rl/peg_base/checkpoints/latest runs/rl/peg_base_dunet/checkpoints/latest \\
        --task peg_insert --episodes 10 --out tools/bench/results/noise_spread_peg_insert.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robolearn.policies.wrapper import PolicyWrapper
from robolearn.rl.settings import SteerSettings

BOUND = SteerSettings.max_noise  # steering's default noise bound (DSRL's 1.5): the edge the probe also measures


class SpreadRecorder(PolicyWrapper):
    """Acts as the base does; at every call also samples ``draws`` more chunks per row and keeps their spread."""

    def __init__(self, base: Any, draws: int, seed: int, steps: int | None = None) -> None:
        super().__init__(base)
        self.draws = int(draws)
        self.steps = steps  # the base's sampler steps for every call (None: its own)
        self.gen = torch.Generator().manual_seed(seed)
        self.spread: list[np.ndarray] = []       # per decision: (action_dim,) std over draws, unit noise
        self.spread_edge: list[np.ndarray] = []  # the same at 1.5 x eps clipped to 1.5

    def predict_action(self, obs_history, noise=None, **kwargs):  # noqa: ANN001 -- the chunk-policy protocol
        out = self.base.predict_action(obs_history, noise, **{**kwargs, "steps": self.steps})
        rows, k = out.shape[0], self.draws
        eps = torch.randn((rows, 1, k, *out.shape[1:]), generator=self.gen)
        # per row: k unit draws, then the same k at the bound's edge -- one batched call for both
        both = torch.cat([eps, (BOUND * eps).clamp(-BOUND, BOUND)], dim=1).flatten(0, 2)
        rep = {key: torch.as_tensor(v).repeat_interleave(2 * k, dim=0) for key, v in obs_history.items()}
        part = self.base.executable(self.base.predict_action(rep, both, steps=self.steps))
        std = part.reshape(rows, 2, k, *part.shape[1:]).std(dim=2).mean(dim=2).cpu().numpy()  # (rows, 2, A)
        self.spread.extend(std[:, 0])
        self.spread_edge.extend(std[:, 1])
        return out


def summarize(rows: list[np.ndarray]) -> dict[str, Any]:
    a = np.stack(rows)  # (decisions, action_dim)
    return {"mean_std_per_dim": [round(float(x), 5) for x in a.mean(0)],
            "mean_std": round(float(a.mean()), 5),
            "median_max_dim_std": round(float(np.median(a.max(1))), 5)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="base chunk policy checkpoints (deterministic given noise)")
    p.add_argument("--task", default="peg_insert")
    p.add_argument("--episodes", type=int, default=10, help="held-out initial states (seeds from 100000)")
    p.add_argument("--draws", type=int, default=16, help="noise draws per decision")
    p.add_argument("--steps", type=int, default=None, help="run every base at this many sampler steps (default: its own)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.draws < 2:
        p.error(f"--draws must be at least 2 to have a spread, got {args.draws}")
    torch.set_num_threads(1)
    import sim
    from robolearn.cli.runtime import load_checkpoint
    from robolearn.evaluation import evaluate

    seeds = list(range(100_000, 100_000 + args.episodes))
    t0 = time.time()
    results = {}
    for ckpt in args.checkpoints:
        base = load_checkpoint(ckpt)
        rec = SpreadRecorder(base, args.draws, seed=0, steps=args.steps)
        out = evaluate(rec, lambda: sim.make(args.task), seeds, noise_seed=seeds[0])
        results[str(ckpt)] = {
            "policy": type(base).__name__, "sampler": "{}-{}".format(base.sampler_config["kind"], args.steps or base.sampler_config["steps"]),
            "decisions": len(rec.spread), "success_rate": round(float(out["success_rate"]), 4),
            "unit_noise": summarize(rec.spread), "edge_noise": summarize(rec.spread_edge),
        }
        r = results[str(ckpt)]
        print(f"{ckpt}: {r['policy']} {r['sampler']}, {r['decisions']} decisions, chunk std over noise "
              f"{r['unit_noise']['mean_std']:.4f} (at the bound {r['edge_noise']['mean_std']:.4f})", flush=True)
    doc = {"bench": "noise_spread (tools/bench/noise_spread.py)", "task": args.task, "episodes": args.episodes,
           "draws": args.draws, "checkpoints": results,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"{'GPU ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({"bench": "noise_spread", "out": str(args.out), "wall_s": doc["wall_s"]}))


if __name__ == "__main__":
    main()
