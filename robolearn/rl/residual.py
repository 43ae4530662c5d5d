"""Residual RL fine-tuning of a chunk policy (ResiP) with PPO, top to bottom in one file.

What is trained: a :class:`~robolearn.rl.residual_policy.ResidualPolicy` -- the frozen base chunk policy plus a
Gaussian MLP that corrects every executed action in normalized action space -- with PPO (a separate critic, GAE,
advantage normalization, ratio clipping, value clipping, a KL early stop) on the task's own reward, in many
environments at once. Hyperparameters: :class:`~robolearn.rl.settings.ResidualSettings` (ResiP's published
values).

How a rollout runs: exactly as deployment runs the base. One :class:`~robolearn.policies.executor.ChunkExecutor`
drives all environments: it keeps each one's observation history and action queue, re-plans every
``n_action_steps`` with ONE batched ``predict_action`` call for all environments whose queue ran out, and calls its
per-step ``corrector`` hook between "the base action is known" and "the environment steps". During training that
hook is a :class:`RolloutCorrector`: it samples the residual, returns the corrected actions, and keeps what PPO needs
of the step (normalized observation, normalized base action, the sampled residual, its log-probability, the
critic's value). The loop then steps the environments and writes that step into the :class:`Rollout` buffer with
the reward and the episode ends. So the buffer holds per-step transitions of the residual's own MDP, whose state
includes the base action: the base is part of the environment as far as PPO is concerned.

Episode ends (gymnasium same-step autoreset): a *terminated* episode's next value is 0; a *truncated* one (time
limit) is bootstrapped with the critic's value of its last observation (``infos["final_obs"]``), added to the
last reward -- the time limit is not the task's failure (``bootstrap_truncated=False``: it is, value 0). The critic sees the normalized observation only (not the
base action), so that last observation, for which no base action was ever planned, can be valued.

Evaluation (a callback, ``evaluate(policy, env_steps) -> dict`` with ``success_rate``): the residual policy itself,
deterministic (the residual's mean, through its ``correct_actions``), on held-out seeds; before the first update
(the base's own success rate: the residual starts at exactly zero), every ``eval_every`` environment steps, and at
the end.

Run folder::

    metrics.jsonl, tb/, plots/success.png       per update and per evaluation, x axis = environment steps
    checkpoints/step_<env steps>/               a ResidualPolicy checkpoint (actor weights; config names the base)
        rl_state.pt                             critic, both optimizers, counters, RNG states: what resume needs
    checkpoints/latest -> step_...

Resume (``fit(resume=True)`` after :meth:`ResidualPPO.load_state` of the newest checkpoint): the actor (from the
checkpoint), critic, both optimizers, the environment-step and update counters, the episode counter of the chunk
noise rule and the RNG streams (residual sampling, minibatch order) continue. Not restored: the environments'
states and the executor's queues (episodes in flight when the run stopped are lost; the resumed run starts fresh
episodes, seeded from the update count so they differ from the first run's), and the rollout that was being
collected (checkpoints are taken between updates). So a resumed run is a faithful continuation, not a bit-exact
replay of an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from robolearn.policies.executor import ChunkExecutor, NonFiniteChunkError
from robolearn.rl.loop import FinetuneRun, final_info, final_obs
from robolearn.rl.residual_policy import ResidualPolicy, mlp
from robolearn.rl.settings import ResidualSettings



# ---------------------------------------------------------------------------------------------- the critic
class Critic(nn.Module):
    """V(normalized observation): the residual's value estimate (see the module docstring for why no action)."""

    def __init__(self, obs_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1, out_gain=1.0)

    def forward(self, obs_features: torch.Tensor) -> torch.Tensor:
        return self.net(obs_features).squeeze(-1)


# ---------------------------------------------------------------------------------------------- one step
@dataclass
class Step:
    """What the corrector saw and drew for the listed environments in one executor step."""

    env_ids: np.ndarray
    obs: torch.Tensor  # (n, obs_dim) normalized observation
    base: torch.Tensor  # (n, action_dim) normalized base action
    residual: torch.Tensor  # (n, action_dim) the sampled residual (before action_scale)
    logp: torch.Tensor  # (n,) its log-probability under the actor that drew it
    value: torch.Tensor  # (n,) the critic's value of the observation


class AR1Noise:
    """Each environment's exploration noise, standard normal at every step. With ``corr`` = c > 0 it is an AR(1)
    process, ``e_t = c e_(t-1) + sqrt(1 - c^2) xi_t``: every step's noise is still N(0, 1), but successive steps
    push the same way (the idea of gSDE and of coloured-noise exploration); :meth:`restart` makes an
    environment's next draw fresh (a new episode). Draws come from ``generator`` (on its device), so they are
    reproducible and its state can be saved."""

    def __init__(self, generator: torch.Generator, num_envs: int, dim: int, corr: float = 0.0) -> None:
        self.generator, self.corr = generator, float(corr)
        device = generator.device
        self._state = torch.zeros(num_envs, dim, device=device)  # each environment's last draw
        self._fresh = torch.ones(num_envs, dtype=torch.bool, device=device)  # its next draw starts afresh

    def restart(self, env_ids: int | Sequence[int]) -> None:
        self._fresh[env_ids] = True

    def draw(self, shape: torch.Size, env_ids: np.ndarray) -> torch.Tensor:
        """Noise of ``shape`` (len(env_ids), dim) for these environments, in that order."""
        xi = torch.randn(shape, generator=self.generator, device=self.generator.device)
        if self.corr == 0.0:
            return xi
        ids = torch.as_tensor(np.asarray(env_ids), dtype=torch.long, device=xi.device)
        c = self.corr
        e = torch.where(self._fresh[ids, None], xi, c * self._state[ids] + math.sqrt(1.0 - c * c) * xi)
        self._state[ids], self._fresh[ids] = e, False
        return e


class RolloutCorrector:
    """The executor's per-step hook while training: sample the residual from the current actor, remember the step
    (:attr:`last`), return the corrected raw actions. Sampling uses its own generator, so it is reproducible and
    its state is saved with a checkpoint.

    ``noise_corr`` > 0 makes each environment's exploration noise an AR(1) process, ``e_t = c e_(t-1) +
    sqrt(1 - c^2) xi_t``: every step's noise is still N(0, 1) (the log-probability PPO uses is the per-step
    Gaussian's), but successive steps push the same way, so the residual explores offsets of a few steps' worth of
    motion instead of jitter (the idea of gSDE and of coloured-noise exploration). :meth:`restart` starts an
    environment's noise afresh at a new episode."""

    def __init__(self, policy: ResidualPolicy, critic: Critic, generator: torch.Generator, num_envs: int,
                 noise_corr: float = 0.0) -> None:
        self.policy, self.critic = policy, critic
        self.noise = AR1Noise(generator, num_envs, policy.action_dim, noise_corr)
        self.last: Step | None = None

    def restart(self, env_ids: int | Sequence[int]) -> None:
        """These environments begin new episodes: their next noise is a fresh draw."""
        self.noise.restart(env_ids)

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, np.ndarray], base_actions: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        p = self.policy
        obs_f, base_n = p.features(obs, base_actions, update_stats=True)
        dist = p.actor(p.actor_input(obs_f, base_n))
        noise = self.noise.draw(dist.mean.shape, env_ids)
        residual = dist.mean + dist.stddev * noise.to(dist.mean.device)
        self.last = Step(np.asarray(env_ids), obs_f, base_n, residual, dist.log_prob(residual).sum(-1),
                         self.critic(obs_f))
        return p.apply_residual(base_actions, residual)


# ---------------------------------------------------------------------------------------------- the buffer
class Rollout:
    """``rollout_steps`` x ``num_envs`` transitions. ``done[t, i]``: environment ``i``'s episode ended with the
    action of step ``t`` (its step ``t+1`` belongs to a new episode); ``reward`` already includes the bootstrap of
    a truncated episode."""

    def __init__(self, steps: int, num_envs: int, obs_dim: int, action_dim: int, device: torch.device) -> None:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        self.obs, self.base = z(steps, num_envs, obs_dim), z(steps, num_envs, action_dim)
        self.residual = z(steps, num_envs, action_dim)
        self.logp, self.value, self.reward, self.done = (z(steps, num_envs) for _ in range(4))

    def store(self, t: int, step: Step, reward: torch.Tensor, done: torch.Tensor) -> None:
        ids = torch.as_tensor(step.env_ids, device=self.obs.device)
        self.obs[t, ids], self.base[t, ids], self.residual[t, ids] = step.obs, step.base, step.residual
        self.logp[t, ids], self.value[t, ids] = step.logp, step.value
        self.reward[t], self.done[t] = reward, done


def gae(rollout: Rollout, last_value: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the rollout; returns ``(advantages, returns)``, each ``(T, N)``.
    ``last_value``: the critic's value of each environment's observation after the last step."""
    adv = torch.zeros_like(rollout.reward)
    running = torch.zeros_like(last_value)
    for t in reversed(range(rollout.reward.shape[0])):
        next_value = last_value if t == rollout.reward.shape[0] - 1 else rollout.value[t + 1]
        alive = 1.0 - rollout.done[t]  # the value after an episode's last step belongs to the next episode
        delta = rollout.reward[t] + gamma * next_value * alive - rollout.value[t]
        running = delta + gamma * lam * alive * running
        adv[t] = running
    return adv, adv + rollout.value


# ---------------------------------------------------------------------------------------------- PPO
class ResidualPPO(FinetuneRun):
    """PPO for ``policy``'s residual in ``envs`` (a gymnasium-contract vector env in same-step autoreset mode).

    Arguments: :class:`~robolearn.rl.loop.FinetuneRun`'s. ``total_env_steps`` is rounded up to whole updates;
    ``seed`` seeds the critic's initialisation, residual sampling, minibatch order, the environments' first resets
    and the chunk noise of the base. ``evaluate(policy, env_steps)``: see the module docstring.
    """

    method = "residual PPO"
    plot_title = "residual fine-tuning"
    train_label = "training episodes (sampled residual)"
    eval_label = "evaluation (residual mean, held-out seeds)"

    def __init__(self, policy: ResidualPolicy, envs: Any, settings: ResidualSettings, **run: Any) -> None:
        super().__init__(policy, envs, settings, **run)
        if getattr(policy, "squash", False):
            raise ValueError("this residual is tanh-bounded (squash=True, trained by learner=td3); PPO trains an "
                             "unbounded Gaussian residual: resume it with finetune.learner=td3")
        torch.manual_seed(self.seed)  # the critic's initialisation
        self.critic = Critic(policy.obs_dim, list(settings.critic_hidden)).to(self.device)
        self.actor_opt = torch.optim.Adam(policy.actor.parameters(), lr=settings.actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=settings.critic_lr, eps=1e-5)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.shuffle_gen = torch.Generator().manual_seed(self.seed + 1)
        self.corrector = RolloutCorrector(policy, self.critic, self.sample_gen, self.num_envs, settings.noise_corr)
        # The base runs as deployed: batched inference for every environment whose queue ran out.
        self.executor = ChunkExecutor(policy.base, self.num_envs, seed=self.seed, corrector=self.corrector)
        self.updates = 0
        self._ep_return = np.zeros(self.num_envs)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)

    # ------------------------------------------------------------------ 1. collect a rollout
    def start_episodes(self) -> None:
        """Reset every environment (seeded from the update count, so a resumed run does not replay the first
        run's scenes) and the executor."""
        obs, _ = self.envs.reset(seed=self.seed + 100_003 * self.updates)
        self.executor.reset(obs, episodes=range(self.next_episode, self.next_episode + self.num_envs))
        self.next_episode += self.num_envs
        self._ep_return[:], self._ep_length[:] = 0.0, 0
        self.corrector.restart(list(range(self.num_envs)))

    @torch.no_grad()
    def collect(self) -> tuple[Rollout, torch.Tensor, dict[str, Any]]:
        """Run ``rollout_steps`` steps in every environment; returns the buffer, the critic's value of each
        environment's newest observation (to bootstrap the rollout's end), and episode statistics."""
        s, n = self.s, self.num_envs
        buf = Rollout(s.rollout_steps, n, self.policy.obs_dim, self.policy.action_dim, self.device)
        returns, lengths, successes = [], [], []
        for t in range(s.rollout_steps):
            actions = self.executor.act()  # base chunk (re-planned when due) + sampled residual, per env
            if self.executor.refused:
                raise NonFiniteChunkError(f"the base policy returned a non-finite action chunk (NaN/inf) for environment(s) "
                                   f"{self.executor.refused}: its weights or the observations' scale are broken")
            step = self.corrector.last
            assert step is not None and len(step.env_ids) == n
            obs, reward, terminated, truncated, infos = self.envs.step(
                actions.reshape((n, *self.envs.single_action_space.shape)))
            terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
            done = terminated | truncated
            reward = np.asarray(reward, dtype=np.float64)
            self._ep_return += reward
            self._ep_length += 1
            bootstrap = np.zeros(n)
            cut = np.flatnonzero(truncated & ~terminated)  # time limit: the episode could have gone on
            if len(cut) and s.bootstrap_truncated:
                finals = [final_obs(infos, int(i)) for i in cut]
                batch = {k: np.stack([f[k] for f in finals]) for k in self.policy.feature_keys}
                bootstrap[cut] = s.gamma * self.critic(self.policy.obs_features(batch)).cpu().numpy()
            buf.store(t, step, torch.as_tensor(reward + bootstrap, dtype=torch.float32, device=self.device),
                      torch.as_tensor(done, dtype=torch.float32, device=self.device))
            for i in range(n):
                row = {k: v[i] for k, v in obs.items()}
                if not done[i]:
                    self.executor.observe_env(i, row)
                    continue
                returns.append(float(self._ep_return[i]))
                lengths.append(int(self._ep_length[i]))
                successes.append(bool(final_info(infos, "success", i) or False))
                self._ep_return[i], self._ep_length[i] = 0.0, 0
                self.executor.reset_env(i, row, episode=self.next_episode)  # obs row: the next episode's first
                self.corrector.restart(i)
                self.next_episode += 1
        last_value = self.critic(self.policy.obs_features(self.executor.newest()))
        stats = {"episodes": len(returns),
                 "train_success_rate": round(float(np.mean(successes)), 4) if successes else None,
                 "train_return": round(float(np.mean(returns)), 4) if returns else None,
                 "train_length": round(float(np.mean(lengths)), 2) if lengths else None}
        return buf, last_value, stats

    # ------------------------------------------------------------------ 2. update actor and critic
    def update(self, buf: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> dict[str, Any]:
        """PPO epochs over shuffled minibatches of the rollout; stops before the first minibatch step whose
        policy has moved more than ``target_kl`` (approximate KL) from the one that collected the data."""
        s, p = self.s, self.policy
        obs, base, res = buf.obs.flatten(0, 1), buf.base.flatten(0, 1), buf.residual.flatten(0, 1)
        old_logp, old_value = buf.logp.flatten(), buf.value.flatten()
        adv, ret = advantages.flatten(), returns.flatten()
        size = obs.shape[0]
        mb = max(1, math.ceil(size / s.minibatches))
        pg_losses, v_losses, entropies, kls, clipfracs = [], [], [], [], []
        steps, stopped = 0, False
        for _ in range(s.update_epochs):
            order = torch.randperm(size, generator=self.shuffle_gen).to(self.device)
            for start in range(0, size, mb):
                idx = order[start:start + mb]
                dist = p.actor(p.actor_input(obs[idx], base[idx]))
                logp = dist.log_prob(res[idx]).sum(-1)
                entropy = dist.entropy().sum(-1).mean()
                log_ratio = logp - old_logp[idx]
                ratio = log_ratio.exp()
                with torch.no_grad():
                    approx_kl = float(((ratio - 1.0) - log_ratio).mean())  # the k3 estimator (Schulman)
                    clipfracs.append(float(((ratio - 1.0).abs() > s.clip_coef).float().mean()))
                kls.append(approx_kl)
                if s.target_kl is not None and approx_kl > s.target_kl:
                    stopped = True
                    break
                a = adv[idx]
                if s.norm_adv:
                    a = (a - a.mean()) / (a.std(unbiased=False) + 1e-8)
                pg_loss = torch.max(-a * ratio, -a * ratio.clamp(1.0 - s.clip_coef, 1.0 + s.clip_coef)).mean()
                value = self.critic(obs[idx])
                v_loss_plain = (value - ret[idx]) ** 2
                if s.value_clip is not None:  # the value may not move further than value_clip from the old one
                    clipped = old_value[idx] + (value - old_value[idx]).clamp(-s.value_clip, s.value_clip)
                    v_loss = 0.5 * torch.max(v_loss_plain, (clipped - ret[idx]) ** 2).mean()
                else:
                    v_loss = 0.5 * v_loss_plain.mean()
                loss = pg_loss - s.ent_coef * entropy + s.vf_coef * v_loss
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"the PPO loss became {float(loss)} in update {self.updates + 1} "
                                             f"(pg {float(pg_loss)}, value {float(v_loss)}): lower finetune.actor_lr "
                                             f"/ finetune.critic_lr, or check the rewards' scale")
                self.actor_opt.zero_grad(set_to_none=True)
                self.critic_opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(p.actor.parameters(), s.max_grad_norm)
                nn.utils.clip_grad_norm_(self.critic.parameters(), s.max_grad_norm)
                self.actor_opt.step()
                self.critic_opt.step()
                steps += 1
                pg_losses.append(float(pg_loss.detach()))
                v_losses.append(float(v_loss.detach()))
                entropies.append(float(entropy.detach()))
            if stopped:
                break
        var = float(ret.var())
        explained = 1.0 - float((ret - old_value).var()) / var if var > 0 else None

        def mean(xs: list[float]) -> float | None:
            return round(float(np.mean(xs)), 6) if xs else None

        return {"pg_loss": mean(pg_losses), "v_loss": mean(v_losses), "entropy": mean(entropies),
                "approx_kl": mean(kls), "clipfrac": mean(clipfracs), "kl_stop": stopped, "minibatch_steps": steps,
                "explained_variance": round(explained, 4) if explained is not None else None,
                "log_std": round(float(p.actor.log_std.detach().mean()), 4)}

    # ------------------------------------------------------------------ 3. one update (the loop: FinetuneRun.fit)
    def advance(self) -> dict[str, Any]:
        """Collect a rollout in every environment, then one PPO update on it; its metrics record."""
        t0 = time.perf_counter()
        buf, last_value, episodes = self.collect()
        t1 = time.perf_counter()
        advantages, returns = gae(buf, last_value, self.s.gamma, self.s.gae_lambda)
        if self.s.actor_gae_lambda is not None and self.s.actor_gae_lambda != self.s.gae_lambda:
            # the actor's advantages at their own lambda; the critic still regresses on gae_lambda's returns
            advantages, _ = gae(buf, last_value, self.s.gamma, self.s.actor_gae_lambda)
        stats = self.update(buf, advantages, returns)
        t2 = time.perf_counter()
        self.env_steps += self.s.rollout_steps * self.num_envs
        self.updates += 1
        return {"env_steps": self.env_steps, "update": self.updates, **episodes, **stats,
                "residual_abs": round(float(buf.residual.abs().mean()) * self.s.action_scale, 6),
                "rollout_s": round(t1 - t0, 3), "update_s": round(t2 - t1, 3),
                "env_steps_s": round(self.s.rollout_steps * self.num_envs / max(t2 - t0, 1e-9), 1)}

    def counters(self) -> dict[str, int]:
        return {"updates": self.updates}

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"train_success": record.get("train_success_rate"), "kl": record.get("approx_kl")}

    # ------------------------------------------------------------------ resumable state
    def rl_state(self) -> dict[str, Any]:
        """Critic, both optimizers, the update counter and the RNG streams (residual sampling, minibatch order)."""
        return {"critic": self.critic.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "updates": self.updates,
                "sample_rng": self.sample_gen.get_state(), "shuffle_rng": self.shuffle_gen.get_state()}

    def restore(self, state: Mapping[str, Any], folder: Path) -> None:
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.updates = int(state["updates"])
        self.sample_gen.set_state(state["sample_rng"].cpu())
        self.shuffle_gen.set_state(state["shuffle_rng"].cpu())
