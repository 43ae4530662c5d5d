"""Does an off-policy residual run's critic know which way to correct? (peg_insert, finetune.learner=td3)

On states from the run's own replay buffer, compares two directions in the x/y plane with the direction a
hand-written correction takes (towards the hole: ``clip(5 x tip_to_hole_xy / 0.005)``, the one that lifts the base
from 0.48 to 0.85 in ``residual_probes.py``):

- the critic's gradient with respect to the residual at zero, d Q1(s, b, r) / dr at r = 0 (where a TD3 actor that
  starts at zero is pushed first);
- the trained actor's residual.

Mean cosine near 0: no directional knowledge; near 1: the critic (actor) points where the hand-written correction
does. Writes JSON.

    python tools/bench/residual_critic_direction.py runs/td3/D/checkpoints/latest --out tools/bench/results/x.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="checkpoints of learner=td3 runs on peg_insert")
    p.add_argument("--states", type=int, default=4000, help="replay states to sample (default 4000)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from robolearn.policies import load_policy
    from robolearn.rl.steer import QEnsemble

    rows = []
    for ck in args.checkpoints:
        policy = load_policy(ck)
        state = torch.load(ck / "rl_state.pt", weights_only=True)
        if state.get("learner") != "td3":
            raise SystemExit(f"{ck}: not a checkpoint of a finetune.learner=td3 run")
        with np.load(ck / "replay.npz") as z:
            size = int(z["_meta"][0])
            idx = np.random.default_rng(0).choice(size, min(args.states, size), replace=False)
            obs, base = torch.from_numpy(z["obs"][idx]), torch.from_numpy(z["base"][idx])
        start = 0
        where = None
        for k in policy.feature_keys:
            width = int(np.prod(policy.base.obs_shapes[k]))
            if k == "tip_to_hole":
                where = (start, start + width)
            start += width
        if where is None:
            raise SystemExit(f"{ck}: the policy reads no 'tip_to_hole' (not a peg_insert policy?)")
        rel = policy.normalizer.unnormalize("tip_to_hole", obs[:, where[0]:where[1]])[:, :2]
        want = torch.clamp(5 * rel / 0.005, -1, 1)
        far = rel.norm(dim=1) > 0.002
        # the first net's linear layers (LayerNorm weights are 1-D), less its one-output head
        hidden = [int(w.shape[0]) for name, w in state["q"].items() if name.startswith("nets.0.") and w.dim() == 2][:-1]
        q = QEnsemble(policy.obs_dim + policy.action_dim, policy.action_dim, hidden, out_gain=0.01)
        q.load_state_dict(state["q"])
        x = torch.cat([policy.standardize(obs), base], 1)
        r = torch.zeros(len(idx), policy.action_dim, requires_grad=True)
        q(x, r)[0].sum().backward()
        cos_q = torch.nn.functional.cosine_similarity(r.grad[:, :2], want, dim=1)
        with torch.no_grad():
            act = policy.residual_mean(policy.actor_input(policy.standardize(obs), base))[:, :2]
        cos_a = torch.nn.functional.cosine_similarity(act, want, dim=1)
        row = {"checkpoint": str(ck), "states": int(len(idx)), "states_off_by_2mm": int(far.sum()),
               "critic_grad_cos": round(float(cos_q.mean()), 4), "critic_grad_cos_off_by_2mm": round(float(cos_q[far].mean()), 4),
               "actor_cos": round(float(cos_a.mean()), 4), "actor_cos_off_by_2mm": round(float(cos_a[far].mean()), 4),
               "actor_residual_xy_abs": round(float(act.abs().mean()), 4)}
        rows.append(row)
        print(json.dumps(row))
    doc = {"bench": "residual_critic_direction", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
