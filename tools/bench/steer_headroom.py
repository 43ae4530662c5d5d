"""How much could steering the initial noise change a base policy's success? A probe, no learning.

Latent-noise steering (DSRL) can only pick among the chunks the frozen base produces for some noise. This runs
the base on the same held-out seeds (the environments' initial states) under several noise rules and reports, per
rule, the success rate, and across the ``--noise-seeds`` draws of N(0, I) noise:

- ``per_seed_success``: each initial state's success frequency over the draws (how often *this* state succeeds);
- ``oracle_any``: the fraction of initial states where at least one draw succeeded -- what choosing one whole
  episode's noise per initial state with hindsight would reach (choosing it afresh at every decision, as steering
  does, can only do better with hindsight; a learned actor has no hindsight);
- ``always`` / ``never``: states that succeeded under every draw / under none (no noise choice among those drawn
  helps them);
- noise scales: ``w = scale x eps`` (``scale 0``: the base's mode-like deterministic chunk; ``1``: the base as
  trained; the steering bound 1.5 clips tanh to 1.5, so ``1.5 x eps`` clipped at 1.5 is the widest it reaches).

Through :func:`robolearn.evaluation.evaluate`, as ``robolearn eval`` and fine-tuning's evaluations compute success
(seeds from 100000, batch-invariant inference).

    python tools/bench/steer_headroom.py runs/rl/peg_base/checkpoints/latest --episodes 100 --noise-seeds 8 \\
        --out tools/bench/results/steer_headroom_peg_insert.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robolearn.policies.wrapper import PolicyWrapper
from robolearn.rl.settings import SteerSettings

BOUND = SteerSettings.max_noise  # steering's default noise bound (DSRL's 1.5)


class ScaledNoise(PolicyWrapper):
    """The base with its initial noise multiplied by ``scale``, then moved by ``shift`` (one chunk's noise shape,
    added to every chunk's; steer_flip.py) and clipped to ``clip``, where given."""

    def __init__(self, base: Any, scale: float = 1.0, clip: float | None = None,
                 shift: torch.Tensor | None = None) -> None:
        super().__init__(base)
        self.scale, self.clip, self.shift = float(scale), clip, shift

    def predict_action(self, obs_history, noise=None, **kwargs):  # noqa: ANN001 -- the chunk-policy protocol
        assert noise is not None, "evaluate always passes the chunk noise"
        w = noise * self.scale
        if self.shift is not None:
            w = w + self.shift.to(w)
        if self.clip is not None:
            w = w.clamp(-self.clip, self.clip)
        return self.base.predict_action(obs_history, w, **kwargs)


def successes(policy: Any, task: str, seeds: list[int], noise_seed: int) -> np.ndarray:
    import sim
    from robolearn.evaluation import evaluate

    out = evaluate(policy, lambda: sim.make(task), seeds, noise_seed=noise_seed)
    return np.array([bool(r["success"]) for r in out["per_episode"]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a base chunk policy checkpoint (deterministic given its noise)")
    p.add_argument("--task", default="peg_insert")
    p.add_argument("--episodes", type=int, default=100, help="held-out initial states (seeds from 100000)")
    p.add_argument("--noise-seeds", type=int, default=8, help="draws of the whole run's N(0, I) noise")
    p.add_argument("--scales", type=float, nargs="*", default=[0.0, 0.5, 1.5], help="extra noise scales, one draw each")
    p.add_argument("--draw-scale", type=float, default=1.0,
                   help="multiply every one of the --noise-seeds draws by this (e.g. 2 with --draw-clip 3: what a "
                        "steering bound of max_noise 3 could reach)")
    p.add_argument("--draw-clip", type=float, default=None, help="clip the scaled draws to +-this (default: no clip)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from robolearn.cli.runtime import load_checkpoint

    base = load_checkpoint(args.checkpoint)
    drawn = ScaledNoise(base, args.draw_scale, args.draw_clip)  # scale 1, no clip: the base as trained
    seeds = list(range(100_000, 100_000 + args.episodes))
    t0 = time.time()
    draws = []
    for k in range(args.noise_seeds):
        s = successes(drawn, args.task, seeds, noise_seed=seeds[0] + k)
        draws.append(s)
        print(f"noise draw {k}: success {s.mean():.3f}  ({time.time() - t0:.0f} s)", flush=True)
    m = np.stack(draws)  # (draws, seeds)
    per_seed = m.mean(0)
    scales = []
    for sc in args.scales:
        clip = BOUND if sc > 1.0 else None
        s = successes(ScaledNoise(base, sc, clip), args.task, seeds, noise_seed=seeds[0])
        scales.append({"scale": sc, "clip": clip, "success": round(float(s.mean()), 4)})
        print(f"noise x {sc}{f' clipped at {clip}' if clip else ''}: success {s.mean():.3f}", flush=True)
    hist = np.histogram(per_seed, bins=np.linspace(0, 1, 6))[0].tolist()
    doc = {
        "bench": "steer_headroom", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": str(args.checkpoint),
        "task": args.task, "episodes": args.episodes, "noise_seeds": args.noise_seeds,
        "draw_scale": args.draw_scale, "draw_clip": args.draw_clip,
        "success_per_draw": [round(float(d.mean()), 4) for d in draws],
        "success_mean": round(float(m.mean()), 4),
        "oracle_any": round(float((per_seed > 0).mean()), 4),
        "always": round(float((per_seed == 1).mean()), 4),
        "never": round(float((per_seed == 0).mean()), 4),
        "per_seed_success_histogram": {"bins": [0, 0.2, 0.4, 0.6, 0.8, 1.0], "counts": hist},
        "per_seed_success": [round(float(x), 3) for x in per_seed],
        "scales": scales, "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"mean {doc['success_mean']:.3f}  oracle (any of {args.noise_seeds} draws) {doc['oracle_any']:.3f}  "
          f"always {doc['always']:.3f}  never {doc['never']:.3f}")
    print(json.dumps({k: doc[k] for k in ("bench", "success_mean", "oracle_any", "always", "never", "scales")}))


if __name__ == "__main__":
    main()
