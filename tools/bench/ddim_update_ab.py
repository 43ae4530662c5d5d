"""DDIM chunk time with the precomputed DDIM update (``robolearn.policies.diffusion.DDIMUpdate``) against diffusers'
own ``DDIMScheduler.step`` in its place, same policy, same process, alternating call by call (batch 1).

For a diffusion checkpoint this times DDIM-``--steps`` chunks uncached and with a uniform block cache (transformer
checkpoints only: ``--updates`` evenly spaced update steps), each with both step functions, and checks that both
give the same chunk bit for bit.

    python tools/bench/ddim_update_ab.py --checkpoint runs/accel/lift_dt6/checkpoints/latest \\
        --out tools/bench/results/ddim_update_ab.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from robolearn.accel.cache import CacheError, CachedPolicy, branch_keys, uniform_schedule
    from robolearn.cli.accel import calibration_observations
    from robolearn.cli.runtime import load_checkpoint
    from robolearn.policies.diffusion import DDIMUpdate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--updates", type=int, default=5, help="uniform cache's update steps (transformers)")
    p.add_argument("--repeats", type=int, default=60, help="timed alternations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_checkpoint(args.checkpoint)
    policy.set_sampler("ddim", args.steps)
    obs = {k: v[:1] for k, v in calibration_observations(policy, args.checkpoint, 1, 1, seed=0)[0].items()}
    noise = torch.randn(policy.noise_shape(1), generator=torch.Generator().manual_seed(0))
    policy.predict_action(obs, noise)
    update, timesteps = policy._samplers[("ddim", args.steps)]
    if not isinstance(update, DDIMUpdate):
        raise SystemExit(f"{args.checkpoint}: its DDIM sampler does not use DDIMUpdate")
    variants = {"uncached": policy}
    try:
        keys = branch_keys(policy.backbone)
        variants[f"uniform k={args.updates}"] = CachedPolicy(
            policy, uniform_schedule(keys, f"ddim-{args.steps}", args.steps, args.updates))
    except CacheError as e:  # a U-Net: no block cache
        print(f"no cached row: {e}")
    steps_fn = {"DDIMUpdate": update, "diffusers step()": update.scheduler}
    rows = []
    for name, pol in variants.items():
        times: dict[str, list[float]] = {k: [] for k in steps_fn}
        chunks = {}
        for i in range(args.repeats + 3):
            for label, fn in steps_fn.items():
                policy._samplers[("ddim", args.steps)] = (fn, timesteps)
                t0 = time.perf_counter()
                out = pol.predict_action(obs, noise)
                dt = time.perf_counter() - t0
                if i >= 3:
                    times[label].append(dt * 1e3)
                chunks[label] = out
        same = torch.equal(chunks["DDIMUpdate"], chunks["diffusers step()"])
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"policy": name, "ms_ddim_update": round(med["DDIMUpdate"], 3),
                     "ms_diffusers_step": round(med["diffusers step()"], 3),
                     "saved_ms": round(med["diffusers step()"] - med["DDIMUpdate"], 3),
                     "ratio": round(med["DDIMUpdate"] / med["diffusers step()"], 4), "bitwise_equal": same})
        print(rows[-1], flush=True)
    policy._samplers[("ddim", args.steps)] = (update, timesteps)
    result = {"bench": "ddim_update_ab", "checkpoint": str(args.checkpoint), "steps": args.steps,
              "repeats": args.repeats, "threads": args.threads,
              "machine": f"{platform.machine()}, {platform.platform()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"out": str(args.out), **{r["policy"]: r["saved_ms"] for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
