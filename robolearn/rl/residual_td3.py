"""Residual RL with an off-policy learner (``finetune.learner=td3``): the same residual policy as ResiP's PPO, trained
by TD3 from a replay buffer, top to bottom in one file.

Why a second learner. On peg_insert residual PPO did not move (README, "Fine-tuning with residual RL"): exploration
small enough not to wreck a 0.5 mm insertion leaves one update's on-policy samples with too little signal, and each
sample is used for one update only. An off-policy learner reuses every step many times, and a critic on
(state, base action, residual) can credit a small correction directly. This is the structure of Ankile et al.'s
later "Residual Off-Policy RL for Finetuning Behavior Cloning Policies" (a deterministic residual over a frozen
chunk policy, twin critics, n-step returns, sparse rewards); the numbers here are ours.

What is trained: a :class:`~robolearn.rl.residual_policy.ResidualPolicy` with ``squash=True`` -- the residual is
``tanh`` of the actor MLP's output (zero last layer: it starts exactly at the base), times ``action_scale``, added in
normalized action space. While training, Gaussian noise of std ``expl_std`` is added to it (clipped to [-1, 1]);
evaluation and deployment run its mean, as with PPO. So the checkpoint is the same policy kind: ``robolearn eval``,
``run``, ``serve``, ``teleop policy=`` and ``collect policy=`` take it unchanged.

The per-step MDP is PPO's: the state is (newest observation, the base's action for this step) -- the base's chunk
queue is part of the environment -- and the action is the residual. One :class:`ChunkExecutor` drives all
environments as deployment does (batched base inference when queues run out) and calls :class:`ExploringCorrector`
at every step. Each environment's recent steps wait in a short list until their n-step transition is complete:

    (s_t, b_t, r_t,  R = sum_{j<k} gamma^j r_(t+j),  s_(t+k), b_(t+k),  gamma^k or 0 at a terminal)

The next base action ``b_(t+k)`` is needed for the bootstrap ``Q(s', b', pi(s', b'))``; it is known at the next
step's corrector call, which is where transitions are completed. Episode ends: a *terminated* episode (success)
completes its waiting steps with discount 0; a *time-limit* end is a failure with value 0 when
``bootstrap_truncated=false``; with ``bootstrap_truncated=true`` its last (up to n) steps are dropped instead -- no
base action was ever planned for the final observation, so there is nothing to bootstrap them with.

Updates (TD3, Fujimoto et al.): ``utd`` gradient steps per environment step, once ``learning_starts`` environment
steps were collected (with the zero residual plus exploration noise: the base as trained). Twin LayerNorm critics
Q(s, b, r) with Polyak targets; the target uses the target actor's residual plus clipped smoothing noise and the
min of the twin targets; the actor (and the targets) move every ``policy_delay`` critic steps, maximizing
Q1 - ``actor_penalty`` x mean(residual^2) -- after ``critic_warmup`` critic-only steps.
The replay buffer stores the base-normalized observation; the running standardization is applied when sampling,
so it never goes stale.

Demonstrations (``demos=STORE``, ``demo_ratio``): a second buffer, built once from an episode store of successful
demonstrations replayed through the base (:meth:`ResidualTD3.load_demos`); each minibatch draws ``demo_ratio`` of
its rows from it (RLPD's symmetric sampling, as ResFiT uses demonstrations during online training).

Run folder and resume: as PPO's (:mod:`robolearn.rl.loop`); the checkpoint also holds ``replay.npz`` (the online
buffer; the demonstration buffer is rebuilt from its store), so a resumed run continues with its data. Waiting steps of episodes in flight are lost, as with the other methods.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from robolearn.policies.executor import ChunkExecutor, NonFiniteChunkError
from robolearn.rl.loop import OffPolicyRun, final_info, soft_update
from robolearn.rl.residual import AR1Noise
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import ResidualSettings
from robolearn.rl.steer import REPLAY, QEnsemble, Replay


class ExploringCorrector:
    """The executor's per-step hook while training: the residual's mean plus Gaussian exploration noise (clipped to
    the residual's [-1, 1]; with ``noise_corr`` > 0 each environment's noise is an AR(1) process of the same std,
    fresh at each episode start: a sustained push of a few steps' worth of motion instead of jitter); remembers what it saw and drew in :attr:`last` (``env_ids``, base-normalized
    observation ``obs`` (n, obs_dim), normalized base action ``base``, residual ``res``). Folds the observations into
    the policy's running statistics (``obs_norm=running``), as PPO's rollouts do."""

    def __init__(self, policy: ResidualPolicy, expl_std: float, generator: torch.Generator, num_envs: int,
                 noise_corr: float = 0.0) -> None:
        self.policy, self.expl_std = policy, float(expl_std)
        self.noise = AR1Noise(generator, num_envs, policy.action_dim, noise_corr)
        self.last: dict[str, Any] | None = None

    def restart(self, env_ids: int | Sequence[int]) -> None:
        """These environments begin new episodes: their next exploration noise is a fresh draw."""
        self.noise.restart(env_ids)

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, np.ndarray], base_actions: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        p = self.policy
        raw = p.base_features(obs)
        if p.obs_norm == "running":
            p.update_obs_stats(raw)
        base_n = p.normalizer.normalize(p.action_key, torch.as_tensor(np.asarray(base_actions),
                                                                      device=p.device).float()).float()
        mean = p.residual_mean(p.actor_input(p.standardize(raw), base_n))
        noise = self.noise.draw(mean.shape, env_ids).to(mean.device)
        res = (mean + self.expl_std * noise).clamp(-1.0, 1.0)
        self.last = {"env_ids": np.asarray(env_ids), "obs": raw.cpu().numpy(), "base": base_n.cpu().numpy(),
                     "res": res.cpu().numpy()}
        return p.apply_residual(base_actions, res)


class ResidualTD3(OffPolicyRun):
    """TD3 for ``policy``'s residual (a squashed :class:`ResidualPolicy`) in ``envs`` (a gymnasium-contract vector
    env in same-step autoreset mode). Arguments: :class:`~robolearn.rl.loop.FinetuneRun`'s; the loop: :class:`~robolearn.rl.loop.OffPolicyRun`."""

    method = "residual TD3"
    plot_title = "residual fine-tuning (off-policy, TD3)"
    train_label = "training episodes (residual + exploration noise)"
    eval_label = "evaluation (residual mean, held-out seeds)"

    def __init__(self, policy: ResidualPolicy, envs: Any, settings: ResidualSettings, **run: Any) -> None:
        super().__init__(policy, envs, settings, **run)
        if not getattr(policy, "squash", False):
            raise ValueError("learner=td3 trains a tanh-bounded residual: build the ResidualPolicy with squash=True "
                             "(ResidualSettings(learner='td3').policy_config() does)")
        obs_dim, a_dim = policy.obs_dim, policy.action_dim
        torch.manual_seed(self.seed)  # the critics' initialisation
        # Heads start near 0: with rewards >= 0 a random initial Q of +-0.5 is a bias that bootstrapping (gamma^n
        # per backup, through Polyak targets) takes tens of thousands of steps to wash out; the actor would follow it.
        self.q = QEnsemble(obs_dim + a_dim, a_dim, list(settings.critic_hidden), out_gain=0.01).to(self.device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.actor_target = copy.deepcopy(policy.actor.mean).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(policy.actor.mean.parameters(), lr=settings.actor_lr)
        self.q_opt = torch.optim.Adam(self.q.parameters(), lr=settings.q_lr)
        self.replay = Replay(settings.buffer_size, {"obs": obs_dim, "base": a_dim, "res": a_dim, "reward": 1,
                                                    "discount": 1, "next_obs": obs_dim, "next_base": a_dim})
        self.rng = np.random.default_rng(self.seed + 1)  # minibatches
        self.noise_gen = torch.Generator().manual_seed(self.seed)  # exploration
        self.smooth_gen = torch.Generator().manual_seed(self.seed + 2)  # target smoothing
        self.corrector = ExploringCorrector(policy, settings.expl_std, self.noise_gen, self.num_envs,
                                            settings.noise_corr)
        self.executor = ChunkExecutor(policy.base, self.num_envs, seed=self.seed, corrector=self.corrector)
        self.transitions = 0
        self.grad_steps = 0
        self._owed = 0.0
        self.demo: Replay | None = None
        self.demo_stats: dict[str, Any] = {}
        if settings.demos:
            self.demo = self.load_demos(settings.demos)
        self._waiting: list[list[dict[str, Any]]] = [[] for _ in range(self.num_envs)]
        self._ep_return = np.zeros(self.num_envs)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)

    # ------------------------------------------------------------------ 1. acting and n-step transitions
    def start_episodes(self) -> None:
        obs, _ = self.envs.reset(seed=self.seed + 100_003 * (1 + self.env_steps // max(1, self.num_envs)))
        self.executor.reset(obs, episodes=range(self.next_episode, self.next_episode + self.num_envs))
        self.next_episode += self.num_envs
        self._waiting = [[] for _ in range(self.num_envs)]
        self._ep_return[:], self._ep_length[:] = 0.0, 0
        self.corrector.restart(list(range(self.num_envs)))

    def _complete(self, steps: Sequence[dict[str, Any]], next_obs: np.ndarray | None, next_base: np.ndarray | None
                  ) -> list[dict[str, Any]]:
        """Transitions for each of ``steps`` (consecutive, rewards known) to the state after the last one:
        ``next_obs``/``next_base`` (None: a terminal, discount 0)."""
        g = self.s.gamma
        rows, ret, disc = [], 0.0, 1.0
        for st in reversed(steps):  # the last step first: its return is its reward, its discount gamma
            ret = float(st["reward"]) + g * ret
            disc *= g
            rows.append({"obs": st["obs"], "base": st["base"], "res": st["res"], "reward": ret,
                         "discount": 0.0 if next_obs is None else disc,
                         "next_obs": np.zeros_like(st["obs"]) if next_obs is None else next_obs,
                         "next_base": np.zeros_like(st["base"]) if next_base is None else next_base})
        return rows[::-1]  # in time order

    def _store(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.replay.add(**{k: np.stack([np.asarray(r[k], np.float32).reshape(-1) for r in rows])
                           for k in self.replay.data})
        self.transitions += len(rows)

    def step(self) -> dict[str, list[Any]]:
        """One step of every environment; completes the n-step transitions this step's state closes."""
        s, n = self.s, self.num_envs
        actions = self.executor.act()
        if self.executor.refused:
            raise NonFiniteChunkError(f"the base policy returned a non-finite action chunk (NaN/inf) for environment(s) "
                                      f"{self.executor.refused}: its weights or the observations' scale are broken")
        last = self.corrector.last
        assert last is not None and len(last["env_ids"]) == n
        rows: list[dict[str, Any]] = []
        for j in range(n):  # this step's state closes the oldest waiting step's n-step transition
            wait = self._waiting[j]
            if len(wait) >= s.n_step:
                rows.append(self._close_oldest(wait, last["obs"][j], last["base"][j]))
            wait.append({"obs": last["obs"][j], "base": last["base"][j], "res": last["res"][j], "reward": 0.0})
        obs, reward, terminated, truncated, infos = self.envs.step(
            actions.reshape((n, *self.envs.single_action_space.shape)))
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        reward = np.asarray(reward, dtype=np.float64)
        self.env_steps += n
        self._ep_return += reward
        self._ep_length += 1
        finished: dict[str, list[Any]] = {"returns": [], "lengths": [], "successes": []}
        for i in range(n):
            self._waiting[i][-1]["reward"] = float(reward[i])
            row = {k: v[i] for k, v in obs.items()}
            if not (terminated[i] or truncated[i]):
                self.executor.observe_env(i, row)
                continue
            if terminated[i] or not s.bootstrap_truncated:  # success, or a time limit valued as a failure
                rows += self._complete(self._waiting[i], None, None)
            # else: a time limit to bootstrap, but the final observation has no base action: drop these steps
            self._waiting[i] = []
            finished["returns"].append(float(self._ep_return[i]))
            finished["lengths"].append(int(self._ep_length[i]))
            finished["successes"].append(bool(final_info(infos, "success", i) or False))
            self._ep_return[i], self._ep_length[i] = 0.0, 0
            self.executor.reset_env(i, row, episode=self.next_episode)
            self.corrector.restart(i)
            self.next_episode += 1
        self._store(rows)
        if self.env_steps > s.learning_starts and (self.replay.size or self.demo is not None):
            self._owed += s.utd * n  # (nothing to learn from before the first transition is complete)
        return finished

    def _close_oldest(self, wait: list[dict[str, Any]], next_obs: np.ndarray, next_base: np.ndarray
                      ) -> dict[str, Any]:
        """The oldest waiting step's transition over the ``n_step`` steps waiting, to (next_obs, next_base);
        removes it from ``wait``."""
        row = self._complete(wait[:self.s.n_step], next_obs, next_base)[0]
        wait.pop(0)
        return row

    # ------------------------------------------------------------------ demonstrations
    @torch.no_grad()
    def load_demos(self, path: str) -> Replay:
        """A second replay buffer from an episode store of successful demonstrations: every episode is replayed
        through the base exactly as deployment runs it (one executor over all episodes, its observations fed in
        place of an environment's), so each step has the base action the residual would have corrected; the
        step's residual is ``(demo action - base action) / action_scale`` in normalized action space, clipped to
        [-1, 1]; rewards are the store's and must be sparse (0 or 1: the task's success reward); an episode ends
        at its first rewarded step (the task terminates on success; scripted collection records a few steps past
        it), and episodes that never succeed are left out. n-step transitions as online."""
        from robolearn.data.store import EpisodeStore

        p, s = self.policy, self.s
        base = p.base
        keys = list(dict.fromkeys([*base.obs_keys, *p.feature_keys]))
        try:
            store = EpisodeStore.open(path)
        except Exception as e:  # noqa: BLE001 -- any unreadable store: say which
            raise ValueError(f"finetune.demos: cannot open {path}: {e}") from None
        try:
            missing = [k for k in (*keys, p.action_key, "reward") if k not in store.keys]
            if missing:
                raise ValueError(f"finetune.demos: {path} has no {missing} (it holds {sorted(store.keys)}): "
                                 f"demonstrations of the base's task with rewards are needed")
            stored = [store.get_episode(i, [*keys, p.action_key, "reward"]) for i in range(store.n_episodes)]
        finally:
            store.close()
        rewards = np.concatenate([np.asarray(ep["reward"], np.float64).reshape(-1) for ep in stored]) if stored \
            else np.zeros(0)
        if not np.isin(rewards, (0.0, 1.0)).all():
            raise ValueError(f"finetune.demos: {path} has rewards other than 0 and 1 (from {rewards.min():g} to "
                             f"{rewards.max():g}): demonstrations need the task's sparse success reward (collect "
                             f"them with env.reward_type=sparse)")
        episodes, ends = [], []
        for ep in stored:  # the first rewarded step ends the episode (terminate on success); failures left out
            hit = np.flatnonzero(np.asarray(ep["reward"]) > 0)
            if len(hit):
                episodes.append(ep)
                ends.append(int(hit[0]) + 1)
        n_ep = len(episodes)
        if n_ep == 0:
            raise ValueError(f"finetune.demos: {path} holds no successful episode ({len(stored)} in all)")
        ex = ChunkExecutor(base, n_ep, seed=self.seed + 7)
        ex.reset({k: np.stack([ep[k][0] for ep in episodes]) for k in base.obs_keys})
        base_actions = [np.zeros((e, p.action_dim), np.float32) for e in ends]
        for t in range(max(ends)):
            active = np.array([t < e for e in ends])
            acts = ex.act(active)
            for i in np.flatnonzero(active):
                base_actions[i][t] = acts[i]
                if t + 1 < ends[i]:
                    ex.observe_env(int(i), {k: episodes[i][k][t + 1] for k in base.obs_keys})
        norm, scale = p.normalizer, self.s.action_scale
        rows: list[dict[str, Any]] = []
        clipped, total = 0, 0
        for ep, e, b in zip(episodes, ends, base_actions):
            obs = p.base_features({k: ep[k][:e] for k in p.feature_keys}).cpu().numpy()
            bn = norm.normalize(p.action_key, torch.as_tensor(b, device=p.device)).float()
            an = norm.normalize(p.action_key, torch.as_tensor(np.asarray(ep[p.action_key][:e], np.float32),
                                                              device=p.device)).float()
            raw_res = (an - bn) / scale
            clipped += int((raw_res.abs() > 1.0).any(dim=1).sum())
            total += e
            res, bn = raw_res.clamp(-1.0, 1.0).cpu().numpy(), bn.cpu().numpy()
            wait: list[dict[str, Any]] = []
            for t in range(e):
                if len(wait) >= s.n_step:
                    rows.append(self._close_oldest(wait, obs[t], bn[t]))
                wait.append({"obs": obs[t], "base": bn[t], "res": res[t], "reward": float(ep["reward"][t])})
            rows += self._complete(wait, None, None)
        buf = Replay(len(rows), {k: v.shape[1] for k, v in self.replay.data.items()})
        buf.add(**{k: np.stack([np.asarray(r[k], np.float32).reshape(-1) for r in rows]) for k in buf.data})
        self.demo_stats = {"demo_episodes": n_ep, "demo_transitions": len(rows),
                           "demo_clipped_share": round(clipped / max(total, 1), 4),
                           "demo_episodes_left_out": len(stored) - n_ep}
        print(f"finetune: {len(rows):,} demonstration transitions from {n_ep} episodes of {path} "
              f"({100 * self.demo_stats['demo_clipped_share']:.0f}% of steps' residuals clipped to the action_scale "
              f"bound)", file=sys.stderr, flush=True)
        return buf

    def _sample(self) -> dict[str, torch.Tensor]:
        """A minibatch: ``demo_ratio`` of it from the demonstrations when there are any, the rest online."""
        s = self.s
        if self.demo is None or s.demo_ratio == 0.0:
            return self.replay.sample(s.batch_size, self.rng, self.device)
        n_demo = int(round(s.batch_size * s.demo_ratio))
        parts = [self.demo.sample(n_demo, self.rng, self.device)]
        if s.batch_size - n_demo > 0 and self.replay.size > 0:
            parts.append(self.replay.sample(s.batch_size - n_demo, self.rng, self.device))
        return {k: torch.cat([b[k] for b in parts]) for k in parts[0]}

    # ------------------------------------------------------------------ 2. learning
    def update(self) -> dict[str, float]:
        """One critic step on a replay minibatch; every ``policy_delay`` steps an actor step and the targets."""
        s, p = self.s, self.policy
        b = self._sample()
        x = torch.cat([p.standardize(b["obs"]), b["base"]], dim=1)
        nx = torch.cat([p.standardize(b["next_obs"]), b["next_base"]], dim=1)
        with torch.no_grad():
            smooth = (s.target_noise * torch.randn(b["res"].shape, generator=self.smooth_gen)).clamp(
                -s.target_noise_clip, s.target_noise_clip).to(self.device)
            a2 = (torch.tanh(self.actor_target(nx)) + smooth).clamp(-1.0, 1.0)
            target = b["reward"][:, 0] + b["discount"][:, 0] * self.q_target(nx, a2).min(0).values
        q = self.q(x, b["res"])
        q_loss = ((q - target) ** 2).mean(1).sum()
        self.q_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        self.q_opt.step()
        self.grad_steps += 1
        out = {"q_loss": float(q_loss.detach()), "q": float(q.detach().mean()), "target": float(target.mean())}
        if self.grad_steps % s.policy_delay == 0:
            res = torch.tanh(p.actor.mean(x))
            actor_loss = -self.q(x, res)[0].mean() + s.actor_penalty * (res ** 2).mean()
            if self.grad_steps <= s.critic_warmup:  # the critics only, for now; the targets still track them
                actor_loss = actor_loss.detach()
                soft_update(self.q, self.q_target, self.s.tau)
                out.update(actor_loss=float(actor_loss), residual_abs=float(res.detach().abs().mean()))
                return self._checked(out)
            self.actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            self.actor_opt.step()
            soft_update(self.q, self.q_target, self.s.tau)
            soft_update(p.actor.mean, self.actor_target, self.s.tau)
            out.update(actor_loss=float(actor_loss.detach()), residual_abs=float(res.detach().abs().mean()))
        return self._checked(out)

    def _checked(self, out: dict[str, float]) -> dict[str, float]:
        for key, what in (("q_loss", "critic"), ("actor_loss", "actor")):
            if key in out and not np.isfinite(out[key]):
                raise FloatingPointError(f"the TD3 {what} loss became {out[key]} at gradient step {self.grad_steps}: "
                                         f"lower finetune.q_lr / finetune.actor_lr, or check the rewards' scale")
        return out

    # ------------------------------------------------------------------ 3. the loop: OffPolicyRun's
    def fit(self, resume: bool = False, log_every: int | None = None) -> dict[str, Any]:
        self._first_record = not resume
        return super().fit(resume, log_every)

    def finish_record(self, rec: dict[str, Any]) -> None:
        if "residual_abs" in rec:
            rec["residual_abs"] = round(rec["residual_abs"] * self.s.action_scale, 6)  # in normalized action units
        if self._first_record:  # what the demonstration buffer holds, once (also printed when it is built)
            rec.update(self.demo_stats)
            self._first_record = False

    def counters(self) -> dict[str, int]:
        return {"transitions": self.transitions, "grad_steps": self.grad_steps}

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"train_success": record.get("train_success_rate"), "q": record.get("q")}

    # ------------------------------------------------------------------ resumable state
    def rl_state(self) -> dict[str, Any]:
        """Critics, targets, optimizers, counters and RNG streams (the buffer: :meth:`write_state`)."""
        return {"learner": "td3", "q": self.q.state_dict(), "q_target": self.q_target.state_dict(),
                "actor_target": self.actor_target.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "q_opt": self.q_opt.state_dict(), "transitions": self.transitions, "grad_steps": self.grad_steps,
                "owed": self._owed, "rng": json.dumps(self.rng.bit_generator.state),
                "noise_rng": self.noise_gen.get_state(), "smooth_rng": self.smooth_gen.get_state()}

    def write_state(self, tmp: Path, state: Mapping[str, Any]) -> None:
        """``rl_state.pt`` and the replay buffer in ``replay.npz``."""
        super().write_state(tmp, state)
        with open(tmp / REPLAY, "wb") as f:
            np.savez(f, **self.replay.state())

    def restore(self, state: Mapping[str, Any], folder: Path) -> None:
        if state.get("learner") != "td3":
            raise ValueError(f"{folder / 'rl_state.pt'} is not a learner=td3 run's state (a PPO run's? resume it "
                             f"with finetune.learner=ppo)")
        replay_path = folder / REPLAY
        if not replay_path.is_file():
            raise FileNotFoundError(f"cannot resume: {replay_path} is missing")
        self.q.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.q_opt.load_state_dict(state["q_opt"])
        self.transitions, self.grad_steps = int(state["transitions"]), int(state["grad_steps"])
        self._owed = float(state["owed"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.noise_gen.set_state(state["noise_rng"].cpu())
        self.smooth_gen.set_state(state["smooth_rng"].cpu())
        with np.load(replay_path) as z:
            self.replay.load({k: z[k] for k in z.files}, replay_path)
