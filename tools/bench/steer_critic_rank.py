"""Does a steering run's action critic tell good noise from bad? A probe of the critic alone, no actor.

At every decision the base is run on ``K`` noise draws (the evaluation's own N(0, I) draw and ``K - 1`` more), the
critic scores each executable chunk, and the chunk it ranks ``best`` (or ``worst``) is executed; ``first`` runs the
evaluation's own draw (the base as trained). If the critic ranks chunks well, ``best`` beats ``first`` and
``worst`` falls below it; the spread between them is how much the critic knows about which noise helps which state,
whatever an actor then does with that knowledge. ``wbest`` ranks the same draws by the distilled noise critic
Q(s, w) of a ``na`` run instead (no base call needed to score them).

The critic is the run's own (``rl_state.pt`` of a steering checkpoint of ``variant=na``), or with ``--fit`` a
fresh one fitted offline on that checkpoint's replay buffer: ``--fit td`` by TD at the decision the run took next
(``td_target=behavior``), ``--fit mc`` on each chunk's discounted return to its episode's end (``td_target=mc``;
chunks are chained by their next decision's noise), either with ``--offset`` subtracted from every step's reward
(``finetune.reward_offset``). Success through :func:`robolearn.evaluation.evaluate` on the held-out seeds from
100000, as ``robolearn eval`` computes it.

    python tools/bench/steer_critic_rank.py runs/rl/steer_na/checkpoints/latest --fit mc --offset 1 \\
        --out tools/bench/results/steer_critic_rank_peg_insert.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robolearn.policies.wrapper import PolicyWrapper

MODES = ("first", "best", "worst", "wbest")


def load_replay(ckpt: Path) -> dict[str, torch.Tensor]:
    with np.load(ckpt / "replay.npz") as z:
        return {k.split(".", 1)[1]: torch.from_numpy(z[k]) for k in z.files
                if k.startswith("replay.") and not k.endswith("_meta")}


def chained_returns(r: dict[str, torch.Tensor], rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's discounted return to its episode's end, following ``next_w`` to the row that decided next (rows
    are in collection order, so a successor comes later); and which rows have a complete chain."""
    n = len(rewards)
    row_of = {r["w"][i].numpy().tobytes(): i for i in range(n)}
    succ = np.full(n, -1)
    for i in np.flatnonzero(r["has_next"][:, 0].numpy() > 0):
        succ[i] = row_of.get(r["next_w"][i].numpy().tobytes(), -2)  # -2: its successor never entered the buffer
    g = np.zeros(n)
    disc, rew = r["discount"][:, 0].numpy(), rewards.numpy()
    complete = np.zeros(n, bool)
    for i in range(n - 1, -1, -1):
        if succ[i] >= 0:
            g[i], complete[i] = rew[i] + disc[i] * g[succ[i]], complete[succ[i]]
        else:
            g[i], complete[i] = rew[i], succ[i] == -1 and r["done"][i, 0] > 0
    return torch.from_numpy(g).float(), torch.from_numpy(complete)


def fit_critic(policy: Any, ckpt: Path, how: str, offset: float, steps: int, hidden: list[int], gamma: float,
               seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """A fresh action critic fitted on ``ckpt``'s replay buffer (see the module docstring)."""
    from robolearn.rl.steer import QEnsemble

    torch.manual_seed(seed)
    r = load_replay(ckpt)
    rewards = r["reward"][:, 0] - offset * (1.0 - r["discount"][:, 0]) / (1.0 - gamma)
    obs, nxt = policy.standardize(r["obs"]), policy.standardize(r["next_obs"])
    rows = np.arange(len(rewards))
    info: dict[str, Any] = {"transitions": len(rows)}
    if how == "mc":
        ret, complete = chained_returns(r, rewards)
        rows = np.flatnonzero(complete.numpy())
        info["complete_chains"] = int(len(rows))
    q = QEnsemble(policy.obs_dim, r["act"].shape[1], hidden)
    target_q = copy.deepcopy(q).requires_grad_(False)
    opt = torch.optim.Adam(q.parameters(), lr=3e-4)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        b = torch.from_numpy(rng.choice(rows, 256))
        with torch.no_grad():
            if how == "mc":
                target = ret[b]
            else:
                boot = target_q(nxt[b], r["next_act"][b]).min(0).values * r["has_next"][b, 0]
                target = rewards[b] + r["discount"][b, 0] * (1.0 - r["done"][b, 0]) * boot
        loss = ((q(obs[b], r["act"][b]) - target) ** 2).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p, tp in zip(q.parameters(), target_q.parameters()):
                tp.lerp_(p, 0.005)
    info["final_loss"] = round(float(loss.detach()), 4)
    return q.eval(), info


class CriticRanked(PolicyWrapper):
    """The base run on the best/worst of ``k`` noise draws per decision as the critic ranks their chunks."""

    def __init__(self, steered: Any, q_a: Any, q_w: Any, k: int, mode: str) -> None:
        super().__init__(steered.base)
        self.steered, self.q_a, self.q_w, self.k, self.mode = steered, q_a, q_w, int(k), mode
        self.gen = torch.Generator().manual_seed(0)

    def predict_action(self, obs_history, noise=None, **kwargs):  # noqa: ANN001 -- the chunk-policy protocol
        assert noise is not None, "evaluate always passes the chunk noise"
        if self.mode == "first":
            return self.base.predict_action(obs_history, noise, **kwargs)
        sp, k, n = self.steered, self.k, noise.shape[0]
        draws = torch.cat([noise[None], torch.randn((k - 1, *noise.shape), generator=self.gen)])
        w = draws.reshape(k * n, *noise.shape[1:])
        hist = {key: torch.as_tensor(v).repeat(k, *([1] * (torch.as_tensor(v).dim() - 1)))
                for key, v in obs_history.items()}
        with torch.no_grad():
            chunks = self.base.predict_action(hist, w, **kwargs)
            feats = sp.obs_features(sp.newest_frame(obs_history)).repeat(k, 1)  # rows as ``hist`` stacks them
            if self.mode == "wbest":
                flat = w.reshape(k * n, -1).clamp(-sp.max_noise, sp.max_noise) / sp.max_noise
                score = self.q_w(feats, flat).min(0).values
            else:
                score = self.q_a(feats, sp.critic_action(chunks)).min(0).values
        score = score.reshape(k, n)
        pick = score.argmin(0) if self.mode == "worst" else score.argmax(0)
        return chunks.reshape(k, n, *chunks.shape[1:])[pick, torch.arange(n)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a steering checkpoint of variant=na (holds rl_state.pt, replay.npz)")
    p.add_argument("--task", default="peg_insert")
    p.add_argument("--episodes", type=int, default=100, help="held-out initial states (seeds from 100000)")
    p.add_argument("--k", type=int, default=8, help="noise draws ranked per decision")
    p.add_argument("--modes", nargs="+", default=["best", "worst"], choices=MODES)
    p.add_argument("--fit", choices=["td", "mc"], default=None, help="fit a fresh critic on the replay buffer")
    p.add_argument("--offset", type=float, default=0.0, help="--fit: subtracted from every step's reward")
    p.add_argument("--fit-steps", type=int, default=30_000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import yaml

    from robolearn.cli.runtime import load_checkpoint
    from robolearn.rl.steer import QEnsemble
    from steer_headroom import successes

    t0 = time.time()
    steered = load_checkpoint(args.checkpoint)
    state = torch.load(args.checkpoint / "rl_state.pt", map_location="cpu", weights_only=False)
    if "q_a" not in state:
        raise SystemExit(f"{args.checkpoint / 'rl_state.pt'} holds no action critic: probe a variant=na run")
    run_cfg = yaml.safe_load((args.checkpoint.parents[1] / "config.yaml").read_text())["finetune"]
    hidden = [int(h) for h in run_cfg["critic_hidden"]]
    if args.fit == "mc" and run_cfg.get("td_target") == "mc":
        raise SystemExit(f"{args.checkpoint}: a td_target=mc run's buffer holds no next-decision links to chain "
                         f"(its rows already carry their returns): probe the run's own critic instead")
    if args.fit and args.offset and float(run_cfg.get("reward_offset") or 0.0):
        raise SystemExit(f"{args.checkpoint}: its rewards already carry reward_offset="
                         f"{run_cfg['reward_offset']}; --offset would subtract it twice")
    act_dim = int(steered.n_action_steps) * int(steered.action_dim)
    fit_info: dict[str, Any] = {}
    if args.fit:
        q_a, fit_info = fit_critic(steered, args.checkpoint, args.fit, args.offset, args.fit_steps, hidden,
                                   float(run_cfg["gamma"]))
        print(f"fitted a {args.fit} critic (offset {args.offset}) in {time.time() - t0:.0f} s: {fit_info}", flush=True)
    else:
        q_a = QEnsemble(steered.obs_dim, act_dim, hidden)
        q_a.load_state_dict(state["q_a"])
    q_w = QEnsemble(steered.obs_dim, steered.noise_dim, hidden)
    q_w.load_state_dict(state["q_w"])
    seeds = list(range(100_000, 100_000 + args.episodes))
    results = {}
    for mode in args.modes:
        s = successes(CriticRanked(steered, q_a.eval(), q_w.eval(), args.k, mode), args.task, seeds,
                      noise_seed=seeds[0])
        results[mode] = round(float(s.mean()), 4)
        print(f"{mode} of {args.k}: success {s.mean():.3f} ({time.time() - t0:.0f} s)", flush=True)
    doc = {"bench": "steer_critic_rank", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "checkpoint": str(args.checkpoint), "task": args.task, "episodes": args.episodes, "k": args.k,
           "critic": f"fitted offline: {args.fit}, reward offset {args.offset}, {args.fit_steps} steps"
           if args.fit else "the run's own", "fit": fit_info, "success": results,
           "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(json.dumps({k: doc[k] for k in ("bench", "critic", "success")}))


if __name__ == "__main__":
    main()
