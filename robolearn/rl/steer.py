"""Latent-noise steering (DSRL) of a chunk policy: SAC over the base's initial noise, top to bottom in one file.

The noise-space environment. A decision is taken whenever an environment's action queue runs out (every
``n_action_steps`` steps, and at the start of each episode): the actor picks ``w`` (the base's initial noise,
flattened, bounded by ``max_noise``) for the newest observation; the frozen base maps ``w`` deterministically to a
chunk; its executable part runs open-loop through the :class:`~robolearn.policies.executor.ChunkExecutor` -- the
same executor deployment uses, so queues, history and batching are deployment's. One transition of the
noise-space MDP is that whole chunk: ``(s, w, a, R, gamma^k, done, s')`` with ``a`` the executed chunk (normalized,
flattened), ``R`` the chunk's rewards discounted per step, ``k`` the steps it ran (fewer when the episode ended
inside it), ``done`` only for a terminated episode (a time limit is bootstrapped from ``s'`` = its last
observation, unless ``bootstrap_truncated=False``).

Environments decide asynchronously (episodes end at different steps), so at each step only those whose queue ran
out call the actor and the base, in one batch: what the executor does anyway. Where the actor's exploration
comes from: the executor's per-chunk noise (:func:`~robolearn.policies.executor.chunk_noise`, standard normal,
seeded by run, episode and chunk) is the reparameterization noise of the actor's sample, so a run is reproducible
from its seed. For the first ``learning_starts`` transitions ``w`` is that noise itself (clipped to the bound):
the base as it was trained, filling the buffer before learning starts.

Variants (``SteerSettings.variant``; ``na`` is the default, with Monte Carlo targets at -1 per step -- the recipe
that steered in the README's measurements):

- ``sac``: SAC directly on the noise-space MDP: two LayerNorm critics Q(s, w) with Polyak-averaged targets, a
  tanh-Gaussian actor, automatic temperature (target entropy 0 by default, ``None``: ``-0.5 x dim(w)``). The
  critics' targets hold rewards only by default (``backup_entropy=False``): with 64 noise dimensions the entropy
  bonus would otherwise outweigh a sparse success reward of 1 by an order of magnitude (first peg_insert try:
  Q ~ 31).
- ``na`` (noise aliasing): an action critic Q_A(s, a) learned by TD on the executed chunks, with the bootstrap
  Q_W_target(s', w'), w' ~ actor(s'); a noise critic Q_W(s, w) distilled from it by regressing onto
  min Q_A(s, base(s, w)) -- for the acted (w, a) pairs and for ``alias_samples`` extra chunks per decision from
  w ~ N(0, I) (computed with the acting chunk, in the same batch: the base is never called during updates); the
  actor maximizes Q_W. Many noises map to similar chunks; Q_A sees that, Q_W learns it from Q_A.

Updates: ``utd`` gradient steps per collected transition, run as transitions arrive (after ``learning_starts``).
Evaluation (``evaluate(policy, env_steps)``): the steered policy as deployed (``act``: its deterministic
``max_noise * tanh(mean)``, or a draw on the evaluation's chunk noise), on held-out seeds; before training the *base* itself is evaluated (its own noise rule): that is
``success_rate_before``.

Run folder (the loop both methods share, :mod:`robolearn.rl.loop`): ``metrics.jsonl``, ``tb/``, ``plots/success.png``,
``checkpoints/step_<env steps>/`` (a ``steered`` policy checkpoint holding ``rl_state.pt`` -- critics, targets,
optimizers, temperature, counters, RNG -- and ``replay.npz``, the replay buffer), ``checkpoints/latest``.
Resume continues the counters, networks, optimizers and the replay buffer; episodes in flight are lost (a
resumed run starts fresh episodes).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from robolearn.policies.executor import ChunkExecutor, NonFiniteChunkError
from robolearn.rl.loop import OffPolicyRun, final_info, final_obs, soft_update
from robolearn.rl.settings import SteerSettings
from robolearn.rl.steer_policy import QEnsemble, SteeredPolicy

REPLAY = "replay.npz"


class Replay:
    """A ring buffer of numpy arrays (``fields``: name -> per-row width); sampled uniformly."""

    def __init__(self, capacity: int, fields: Mapping[str, int]) -> None:
        self.capacity = int(capacity)
        self.data = {k: np.zeros((self.capacity, w), np.float32) for k, w in fields.items()}
        self.size = 0
        self.next = 0

    def add(self, **rows: np.ndarray) -> None:
        """Append ``n`` rows (``field=(n, width)`` or ``(n,)`` arrays), overwriting the oldest when full."""
        n = len(next(iter(rows.values())))
        idx = (self.next + np.arange(n)) % self.capacity
        for k, v in rows.items():
            self.data[k][idx] = np.asarray(v, np.float32).reshape(n, -1)
        self.next = int((self.next + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, size=batch)
        return {k: torch.from_numpy(v[idx]).to(device) for k, v in self.data.items()}

    def state(self) -> dict[str, np.ndarray]:
        out = {k: v[:self.size] for k, v in self.data.items()}
        out["_meta"] = np.array([self.size, self.next, self.capacity], np.int64)
        return out

    def load(self, arrays: Mapping[str, np.ndarray], path: Path) -> None:
        meta = arrays["_meta"]
        size, nxt, cap = (int(x) for x in meta)
        if cap != self.capacity:
            raise ValueError(f"{path}: replay buffer of capacity {cap}, but finetune.buffer_size is {self.capacity}")
        for k in self.data:
            if k not in arrays:
                raise KeyError(f"{path} has no array {k!r} (a replay buffer of another variant?)")
            if arrays[k].shape != (size, self.data[k].shape[1]):
                raise ValueError(f"{path}: array {k!r} has shape {arrays[k].shape}, expected "
                                 f"{(size, self.data[k].shape[1])}")
            self.data[k][:size] = arrays[k]
        self.size, self.next = size, nxt


class TrainingView:
    """What the executor drives while training: the steered policy with a *sampling* actor. Each
    ``predict_action`` call (one per batch of environments whose queue ran out) records what the transition
    needs in :attr:`last`: the rows' base-normalized features, the chosen ``w`` and the normalized executable
    chunk; for ``na`` also :attr:`aliases` (features, random ``w``, its executable chunk)."""

    def __init__(self, policy: SteeredPolicy, trainer: "SteeringSAC") -> None:
        self.policy, self.trainer = policy, trainer
        self.last: dict[str, np.ndarray] | None = None
        self.aliases: dict[str, np.ndarray] | None = None

    def exec_norm(self, chunk: torch.Tensor) -> np.ndarray:
        return self.policy.critic_action(chunk).cpu().numpy()

    @torch.no_grad()
    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        p, t = self.policy, self.trainer
        assert noise is not None, "the executor always passes the chunk noise"
        raw = p.base_features(p.newest_frame(obs_history))
        if p.obs_norm == "running":
            p.update_obs_stats(raw)
        eps = noise.reshape(noise.shape[0], -1).to(p.device, torch.float32)
        if t.transitions < t.s.learning_starts:
            w = eps.clamp(-p.max_noise, p.max_noise)  # the base as trained (its noise is N(0, I))
        else:
            w, _ = p.actor.sample(p.standardize(raw), eps)
        n = w.shape[0]
        k = t.s.alias_samples if t.s.variant == "na" else 0
        if k:  # random-noise chunks for the noise critic, in the same batch as the acting chunk
            w_alias = torch.randn((n * k, p.noise_dim), generator=t.alias_gen).to(p.device)
            w_all = torch.cat([w, w_alias])
            hist = {key: torch.as_tensor(v).repeat(1 + k, *([1] * (torch.as_tensor(v).dim() - 1)))
                    for key, v in obs_history.items()}
            chunks = p.steer(hist, w_all)
            chunk = chunks[:n]
            self.aliases = {"obs": raw.repeat(k, 1).cpu().numpy(), "w": w_alias.cpu().numpy(),
                            "act": self.exec_norm(chunks[n:])}
        else:
            chunk = p.steer(obs_history, w)
        self.last = {"obs": raw.cpu().numpy(), "w": w.cpu().numpy(), "act": self.exec_norm(chunk)}
        return chunk

    def __getattr__(self, name: str) -> Any:  # the geometry the executor reads (horizon, n_obs_steps, ...)
        if name in ("policy", "trainer", "predict_action_warm", "correct_actions") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.policy, name)


class SteeringSAC(OffPolicyRun):
    """DSRL for ``policy`` (a :class:`SteeredPolicy`) in ``envs`` (a gymnasium-contract vector env in same-step
    autoreset mode). Arguments: :class:`~robolearn.rl.loop.FinetuneRun`'s."""

    method = "steering"
    train_label = "training episodes (sampled noise)"
    eval_label = "evaluation (the actor's noise as deployed, held-out seeds)"

    def __init__(self, policy: SteeredPolicy, envs: Any, settings: SteerSettings, **run: Any) -> None:
        super().__init__(policy, envs, settings, **run)
        obs_dim, w_dim = policy.obs_dim, policy.noise_dim
        act_dim = int(policy.n_action_steps) * int(policy.action_dim)
        hidden = list(settings.critic_hidden)
        torch.manual_seed(self.seed)  # the critics' initialisation
        self.q_w = QEnsemble(obs_dim, w_dim, hidden).to(self.device)  # Q(s, w): SAC's critic, NA's noise critic
        self.q_w_target = copy.deepcopy(self.q_w).requires_grad_(False)
        self.q_a: QEnsemble | None = None  # NA's action critic: the policy's own, so its checkpoint can rank with it
        if settings.variant == "na":
            if policy.q_a is None:  # a policy built without one (or saved before the policy held it): attach it
                policy.critic_hidden = hidden
                policy.q_a = QEnsemble(obs_dim, act_dim, hidden).to(self.device)
            elif list(policy.critic_hidden or []) != hidden:
                raise ValueError(f"the steered policy's action critic has widths {policy.critic_hidden}, the "
                                 f"settings' critic_hidden {hidden}: they must agree")
            self.q_a = policy.q_a
            self.q_a.load_state_dict(QEnsemble(obs_dim, act_dim, hidden).state_dict())  # from the run's seed
        self.q_a_target = copy.deepcopy(self.q_a).requires_grad_(False) if self.q_a is not None else None
        self.actor_opt = torch.optim.Adam(policy.actor.parameters(), lr=settings.lr)
        self.q_w_opt = torch.optim.Adam(self.q_w.parameters(), lr=settings.lr)
        self.q_a_opt = torch.optim.Adam(self.q_a.parameters(), lr=settings.lr) if self.q_a is not None else None
        self.log_alpha = torch.tensor(float(np.log(settings.init_temperature)), device=self.device,
                                      requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=settings.lr)
        self.target_entropy = float(settings.target_entropy) if settings.target_entropy is not None \
            else -0.5 * w_dim
        fields = {"obs": obs_dim, "w": w_dim, "act": act_dim, "reward": 1, "discount": 1, "done": 1,
                  "next_obs": obs_dim, "next_w": w_dim, "next_act": act_dim, "has_next": 1}
        if settings.td_target == "mc":
            fields["ret"] = 1  # the discounted return from this decision to the episode's end
        self.replay = Replay(settings.buffer_size, fields)
        self._no_next_w, self._no_next_act = np.zeros(w_dim, np.float32), np.zeros(act_dim, np.float32)
        self.alias = Replay(settings.buffer_size * max(1, settings.alias_samples),
                            {"obs": obs_dim, "w": w_dim, "act": act_dim}) if settings.variant == "na" else None
        self.rng = np.random.default_rng(self.seed + 1)  # minibatch sampling
        self.alias_gen = torch.Generator().manual_seed(self.seed + 2)
        self.view = TrainingView(policy, self)
        self.executor = ChunkExecutor(self.view, self.num_envs, seed=self.seed, device=self.device)
        self.transitions = 0
        self.grad_steps = 0
        self._owed = 0.0  # gradient steps due but not yet taken
        n = self.num_envs
        self._pending: list[dict[str, Any] | None] = [None] * n
        self._waiting: list[dict[str, Any] | None] = [None] * n  # td_target=behavior: a chunk awaiting the next one
        self._episode: list[list[dict[str, Any]]] = [[] for _ in range(n)]  # td_target=mc: the episode's chunks so far
        self._ep_return = np.zeros(n)
        self._ep_length = np.zeros(n, dtype=np.int64)

    # ------------------------------------------------------------------ 1. acting
    def start_episodes(self) -> None:
        obs, _ = self.envs.reset(seed=self.seed + 100_003 * (1 + self.env_steps // max(1, self.num_envs)))
        self.executor.reset(obs, episodes=range(self.next_episode, self.next_episode + self.num_envs))
        self.next_episode += self.num_envs
        self._pending = [None] * self.num_envs
        self._waiting = [None] * self.num_envs
        self._episode = [[] for _ in range(self.num_envs)]
        self._ep_return[:], self._ep_length[:] = 0.0, 0

    def _store(self, rows: list[dict[str, Any]]) -> None:
        """Add finished transitions to the replay buffer (and owe their gradient steps)."""
        self.replay.add(**{k: np.stack([np.asarray(r[k], np.float32).reshape(-1) for r in rows])
                           for k in self.replay.data})
        self.transitions += len(rows)
        if self.transitions > self.s.learning_starts:
            self._owed += self.s.utd * len(rows)

    def _finish(self, ids: list[int], next_obs: Mapping[str, np.ndarray], done: np.ndarray, ran_out: bool) -> None:
        """Close the pending transitions of environments ``ids`` (their chunk ran out or their episode ended).
        With ``td_target="behavior"`` a chunk that ran out waits for the next decision (its ``w`` and chunk are the
        bootstrap's) before it enters the buffer."""
        if not ids:
            return
        with torch.no_grad():
            nxt = self.policy.base_features(next_obs).cpu().numpy()
        rows = []
        for j, i in enumerate(ids):
            pend = self._pending[i]
            assert pend is not None
            rows.append({**pend, "done": float(done[j]), "next_obs": nxt[j], "has_next": 0.0,
                         "next_w": self._no_next_w, "next_act": self._no_next_act})
            self._pending[i] = None
        if ran_out and self.s.td_target == "behavior":
            for i, row in zip(ids, rows):
                self._waiting[i] = row
            return
        if self.s.td_target == "mc":
            self._store_returns(ids, rows, nxt, done, ran_out)
            return
        self._store(rows)

    def _store_returns(self, ids: list[int], rows: list[dict[str, Any]], nxt: np.ndarray, done: np.ndarray,
                       ran_out: bool) -> None:
        """``td_target="mc"``: a chunk waits in its environment's episode until the episode ends; then every chunk
        of it enters the buffer with the discounted return from its decision on (a time-limit end that is not
        ``done`` adds :meth:`_actor_value` of the last observation)."""
        for i, row in zip(ids, rows):
            self._episode[i].append(row)
        if ran_out:
            return
        tails = np.zeros(len(ids))
        if not bool(np.all(done)):
            feats = self.policy.standardize(torch.as_tensor(nxt, device=self.device))
            tails = self._actor_value(feats)[0].cpu().numpy()
        finished = []
        for j, i in enumerate(ids):
            g = 0.0 if done[j] else float(tails[j])
            for row in reversed(self._episode[i]):
                g = float(row["reward"]) + float(row["discount"]) * g
                row["ret"] = g
            finished += self._episode[i]
            self._episode[i] = []
        self._store(finished)

    def step(self) -> dict[str, Any]:
        """One step of every environment (deciding for those whose chunk ran out); returns finished episodes."""
        s, n = self.s, self.num_envs
        need = [i for i in range(n) if not self.executor.queues[i]]
        actions = self.executor.act()
        if self.executor.refused:
            raise NonFiniteChunkError(f"the base policy returned a non-finite action chunk (NaN/inf) for environment(s) "
                                      f"{self.executor.refused}: its weights or the observations' scale are broken")
        if need:
            last = self.view.last
            assert last is not None and len(last["w"]) == len(need)
            done_waiting = []
            for j, i in enumerate(need):
                if self._waiting[i] is not None:  # the previous chunk's bootstrap: this decision
                    done_waiting.append({**self._waiting[i], "next_w": last["w"][j], "next_act": last["act"][j],
                                         "has_next": 1.0})
                    self._waiting[i] = None
                self._pending[i] = {"obs": last["obs"][j], "w": last["w"][j], "act": last["act"][j],
                                    "reward": 0.0, "discount": 1.0}
            if done_waiting:
                self._store(done_waiting)
            if self.alias is not None and self.view.aliases is not None:
                self.alias.add(**self.view.aliases)
        obs, reward, terminated, truncated, infos = self.envs.step(
            actions.reshape((n, *self.envs.single_action_space.shape)))
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        reward = np.asarray(reward, dtype=np.float64)
        self.env_steps += n
        self._ep_return += reward
        self._ep_length += 1
        ended, ran_out = [], []
        finished: dict[str, list[Any]] = {"returns": [], "lengths": [], "successes": []}
        for i in range(n):
            pend = self._pending[i]
            assert pend is not None
            pend["reward"] += pend["discount"] * (float(reward[i]) - s.reward_offset)
            pend["discount"] *= s.gamma
            row = {k: v[i] for k, v in obs.items()}
            if terminated[i] or truncated[i]:
                if truncated[i] and not terminated[i] and not s.bootstrap_truncated:
                    # a time-limit end valued as a failure: with an offset, paying it forever after (a tail of
                    # 0 would be a success's value and reward the timeout)
                    pend["reward"] -= pend["discount"] * s.reward_offset / (1.0 - s.gamma)
                ended.append(i)
                finished["returns"].append(float(self._ep_return[i]))
                finished["lengths"].append(int(self._ep_length[i]))
                finished["successes"].append(bool(final_info(infos, "success", i) or False))
                self._ep_return[i], self._ep_length[i] = 0.0, 0
            else:
                self.executor.observe_env(i, row)
                if not self.executor.queues[i]:
                    ran_out.append(i)
        if ended:
            finals = [final_obs(infos, i) for i in ended]
            last_obs = {k: np.stack([f[k] for f in finals]) for k in self.policy.feature_keys}
            done = np.array([terminated[i] or not s.bootstrap_truncated for i in ended])
            self._finish(ended, last_obs, done, ran_out=False)
            for i in ended:
                self.executor.reset_env(i, {k: v[i] for k, v in obs.items()}, episode=self.next_episode)
                self.next_episode += 1
        if ran_out:
            self._finish(ran_out, {k: np.stack([obs[k][i] for i in ran_out]) for k in self.policy.feature_keys},
                         np.zeros(len(ran_out), bool), ran_out=True)
        return finished

    # ------------------------------------------------------------------ 2. learning
    @torch.no_grad()
    def _actor_value(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The target noise critic's value (min of the ensemble) at a draw of the actor's noise for standardized
        features ``feats``, and that draw's log-probability: how TD targets and Monte Carlo tails bootstrap."""
        w, logp = self.policy.actor.sample(feats)
        return self.q_w_target(feats, w * (1.0 / self.policy.max_noise)).min(0).values, logp

    def update(self) -> dict[str, float]:
        """One gradient step of the critic(s), actor and temperature on a replay minibatch."""
        s, p = self.s, self.policy
        b = self.replay.sample(s.batch_size, self.rng, self.device)
        obs, nxt = p.standardize(b["obs"]), p.standardize(b["next_obs"])
        w_scale = 1.0 / p.max_noise  # critics see w in [-1, 1]
        alpha = self.log_alpha.exp().detach()
        if s.td_target == "mc":  # the return the run got: no bootstrap inside an episode
            target = b["ret"][:, 0]
        else:
            with torch.no_grad():
                bootstrap, logp2 = self._actor_value(nxt)
                if s.variant == "sac" and s.backup_entropy:
                    bootstrap = bootstrap - alpha * logp2
                if s.td_target == "behavior":  # the data's next decision where there is one (no maximization)
                    if s.variant == "sac":
                        data = self.q_w_target(nxt, b["next_w"] * w_scale).min(0).values
                    else:
                        assert self.q_a_target is not None
                        data = self.q_a_target(nxt, b["next_act"]).min(0).values
                    has = b["has_next"][:, 0]
                    bootstrap = has * data + (1.0 - has) * bootstrap
                target = b["reward"][:, 0] + b["discount"][:, 0] * (1.0 - b["done"][:, 0]) * bootstrap
        out: dict[str, float] = {}
        if s.variant == "sac":
            q = self.q_w(obs, b["w"] * w_scale)
            q_loss = ((q - target) ** 2).mean(1).sum()
            self.q_w_opt.zero_grad(set_to_none=True)
            q_loss.backward()
            self.q_w_opt.step()
            out["q_loss"], out["q"] = float(q_loss.detach()), float(q.detach().mean())
        else:
            assert self.q_a is not None and self.q_a_opt is not None and self.alias is not None
            q = self.q_a(obs, b["act"])
            qa_loss = ((q - target) ** 2).mean(1).sum()
            self.q_a_opt.zero_grad(set_to_none=True)
            qa_loss.backward()
            self.q_a_opt.step()
            # distil: Q_W(s, w) <- min Q_A(s, chunk(s, w)) on random-noise chunks and on the acted ones
            a = self.alias.sample(s.batch_size, self.rng, self.device)
            d_obs = torch.cat([p.standardize(a["obs"]), obs])
            d_w = torch.cat([a["w"].clamp(-p.max_noise, p.max_noise), b["w"]]) * w_scale
            with torch.no_grad():
                d_target = self.q_a(d_obs, torch.cat([a["act"], b["act"]])).min(0).values
            qw = self.q_w(d_obs, d_w)
            qw_loss = ((qw - d_target) ** 2).mean(1).sum()
            self.q_w_opt.zero_grad(set_to_none=True)
            qw_loss.backward()
            self.q_w_opt.step()
            out["q_loss"], out["q"], out["distill_loss"] = float(qa_loss.detach()), float(q.detach().mean()), float(qw_loss.detach())
        w_pi, logp = p.actor.sample(obs)
        q_pi = self.q_w(obs, w_pi * w_scale).min(0).values
        actor_loss = (alpha * logp - q_pi).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        soft_update(self.q_w, self.q_w_target, self.s.tau)
        if self.q_a is not None and self.q_a_target is not None:
            soft_update(self.q_a, self.q_a_target, self.s.tau)
        self.grad_steps += 1
        loss = out["q_loss"] + float(actor_loss.detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"the steering losses became non-finite at gradient step {self.grad_steps} "
                                     f"(critic {out['q_loss']}, actor {float(actor_loss)}): lower finetune.lr, or "
                                     f"check the rewards' scale")
        out.update(actor_loss=float(actor_loss.detach()), alpha=float(alpha), entropy=float(-logp.detach().mean()))
        return out

    # ------------------------------------------------------------------ 3. the loop: OffPolicyRun's
    @property
    def plot_title(self) -> str:  # type: ignore[override]
        return f"latent-noise steering ({self.s.variant})"

    def baseline_policy(self) -> Any:
        return self.policy.base  # the base as deployed: its own noise rule

    def counters(self) -> dict[str, int]:
        return {"transitions": self.transitions, "grad_steps": self.grad_steps}

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"train_success": record.get("train_success_rate"), "q": record.get("q")}

    # ------------------------------------------------------------------ resumable state
    def rl_state(self) -> dict[str, Any]:
        """Critics, targets, optimizers, temperature, counters and RNG streams (the buffer: :meth:`write_state`)."""
        state: dict[str, Any] = {
            "q_w": self.q_w.state_dict(), "q_w_target": self.q_w_target.state_dict(),
            "actor_opt": self.actor_opt.state_dict(), "q_w_opt": self.q_w_opt.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(), "alpha_opt": self.alpha_opt.state_dict(),
            "transitions": self.transitions, "grad_steps": self.grad_steps, "owed": self._owed,
            "variant": self.s.variant, "rng": json.dumps(self.rng.bit_generator.state),
            "alias_rng": self.alias_gen.get_state()}
        if self.q_a is not None and self.q_a_target is not None and self.q_a_opt is not None:
            state.update(q_a=self.q_a.state_dict(), q_a_target=self.q_a_target.state_dict(),
                         q_a_opt=self.q_a_opt.state_dict())
        return state

    def write_state(self, tmp: Path, state: Mapping[str, Any]) -> None:
        """``rl_state.pt`` and the replay buffer(s) in ``replay.npz``."""
        super().write_state(tmp, state)
        arrays = {f"replay.{k}": v for k, v in self.replay.state().items()}
        if self.alias is not None:
            arrays.update({f"alias.{k}": v for k, v in self.alias.state().items()})
        with open(tmp / REPLAY, "wb") as f:
            np.savez(f, **arrays)

    def restore(self, state: Mapping[str, Any], folder: Path) -> None:
        replay_path = folder / REPLAY
        if not replay_path.is_file():
            raise FileNotFoundError(f"cannot resume: {replay_path} is missing (not a checkpoint of a steering run?)")
        if state.get("variant") != self.s.variant:
            raise ValueError(f"{folder / 'rl_state.pt'} is a {state.get('variant')!r} run, not {self.s.variant!r}")
        self.q_w.load_state_dict(state["q_w"])
        self.q_w_target.load_state_dict(state["q_w_target"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.q_w_opt.load_state_dict(state["q_w_opt"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        if self.q_a is not None and self.q_a_target is not None and self.q_a_opt is not None:
            self.q_a.load_state_dict(state["q_a"])
            self.q_a_target.load_state_dict(state["q_a_target"])
            self.q_a_opt.load_state_dict(state["q_a_opt"])
        self.transitions, self.grad_steps = int(state["transitions"]), int(state["grad_steps"])
        self._owed = float(state["owed"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.alias_gen.set_state(state["alias_rng"].cpu())
        with np.load(replay_path) as z:
            arrays = {k: z[k] for k in z.files}
        self.replay.load({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("replay.")}, replay_path)
        if self.alias is not None:
            self.alias.load({k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("alias.")},
                            replay_path)
