"""Does the steering critic stay on the reward's scale when trained on a fixed replay buffer?

Loads a steering checkpoint's replay buffer (``replay.npz``) and observation statistics, builds a fresh
:class:`~robolearn.rl.steer.SteeringSAC` (variant ``sac``) around the same base, and runs ``--updates`` gradient
steps on that fixed data, twice: with the actor learning, and with the actor frozen (pure policy evaluation of a
random actor). It records the critic's mean Q on the minibatches every ``--every`` updates. With a 0/1 success
reward Q belongs in [0, 1]; a Q that climbs far past 1 with the actor learning, and not without it, means the
actor exploits the critic's extrapolation in noise space. No environment is stepped (one is built for the
trainer's geometry only).

Example (what the README quotes)::

    python tools/bench/steer_critic_probe.py runs/peg_steer_na_utd05/checkpoints/step_0000100000 \\
        --out tools/bench/results/steer_critic_probe_peg_insert.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def probe(ckpt: Path, updates: int, every: int, freeze: bool, seed: int, settings: dict) -> list[dict]:
    from robolearn.policies import load_policy
    from robolearn.rl.settings import SteerSettings
    from robolearn.rl.steer import REPLAY, SteeringSAC
    from robolearn.rl.steer_policy import SteeredPolicy
    from sim.vector import make_vector_env

    saved = load_policy(ckpt)
    s = SteerSettings(variant="sac", **settings)
    torch.manual_seed(seed)
    policy = SteeredPolicy(saved.base, **s.policy_config())
    for name in ("obs_mean", "obs_var", "obs_count"):
        getattr(policy, name).copy_(getattr(saved, name))
    run_cfg = (yaml.safe_load((ckpt / "config.yaml").read_text()).get("run") or {})
    envs = make_vector_env(run_cfg["task"], num_envs=1, num_workers=0, autoreset_mode="SameStep",
                           **(run_cfg.get("env_config") or {}))
    try:
        sac = SteeringSAC(policy, envs, s, total_env_steps=1, run_dir=Path("/tmp") / "steer_critic_probe",
                          seed=seed, progress=False)
        with np.load(ckpt / REPLAY) as z:
            sac.replay.load({k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("replay.")}, ckpt / REPLAY)
        if freeze:
            policy.actor.requires_grad_(False)
            sac.actor_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        out = []
        for i in range(1, updates + 1):
            stats = sac.update()
            if i % every == 0:
                out.append({"update": i, **{k: round(float(v), 4) for k, v in stats.items()}})
                print(("frozen actor " if freeze else "learning actor ") + json.dumps(out[-1]), flush=True)
        return out
    finally:
        envs.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a steering checkpoint folder (holding replay.npz)")
    p.add_argument("--updates", type=int, default=4000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    settings = {"bootstrap_truncated": False}  # every episode end of the buffer is a terminal (as it was stored)
    with np.load(args.checkpoint / "replay.npz") as z:
        reward, done = z["replay.reward"][:, 0], z["replay.done"][:, 0]
    doc = {"bench": "steer_critic_probe", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "checkpoint": str(args.checkpoint), "transitions": int(len(reward)),
           "reward_mean": round(float(reward.mean()), 5), "terminal_fraction": round(float(done.mean()), 5),
           "settings": settings,
           "learning_actor": probe(args.checkpoint, args.updates, args.every, False, args.seed, settings),
           "frozen_actor": probe(args.checkpoint, args.updates, args.every, True, args.seed, settings)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({"bench": "steer_critic_probe", "out": str(args.out),
                      "q_last_learning": doc["learning_actor"][-1]["q"], "q_last_frozen": doc["frozen_actor"][-1]["q"]}))


if __name__ == "__main__":
    main()
