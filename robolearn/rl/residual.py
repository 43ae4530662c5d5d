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

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from robolearn.policies.executor import ChunkExecutor, NonFiniteChunkError
from robolearn.rl.residual_policy import ResidualPolicy, mlp
from robolearn.rl.settings import ResidualSettings

RL_STATE = "rl_state.pt"
Evaluate = Callable[[Any, int], Mapping[str, Any]]


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


class RolloutCorrector:
    """The executor's per-step hook while training: sample the residual from the current actor, remember the step
    (:attr:`last`), return the corrected raw actions. Sampling uses its own generator, so it is reproducible and
    its state is saved with a checkpoint."""

    def __init__(self, policy: ResidualPolicy, critic: Critic, generator: torch.Generator) -> None:
        self.policy, self.critic, self.generator = policy, critic, generator
        self.last: Step | None = None

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, np.ndarray], base_actions: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        p = self.policy
        obs_f, base_n = p.features(obs, base_actions, update_stats=True)
        dist = p.actor(p.actor_input(obs_f, base_n))
        noise = torch.randn(dist.mean.shape, generator=self.generator, device=self.generator.device)
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


def _final_obs(infos: Mapping[str, Any], i: int) -> dict[str, np.ndarray]:
    """Environment ``i``'s last observation of the episode that ended in this step (same-step autoreset): an
    object array of dicts (``sim.vector``, gymnasium's ``SyncVectorEnv``) or a dict of batched arrays."""
    final = infos["final_obs"]
    if isinstance(final, Mapping):
        return {k: np.asarray(v[i]) for k, v in final.items()}
    return {k: np.asarray(v) for k, v in final[i].items()}


def _final_info(infos: Mapping[str, Any], key: str, i: int) -> Any:
    src = infos.get("final_info", {})
    if key not in src or (f"_{key}" in src and not bool(np.asarray(src[f"_{key}"])[i])):
        return None
    return np.asarray(src[key])[i]


# ---------------------------------------------------------------------------------------------- PPO
class ResidualPPO:
    """PPO for ``policy``'s residual in ``envs`` (a gymnasium-contract vector env in same-step autoreset mode).

    ``total_env_steps``: stop once this many environment steps were taken (rounded up to whole updates).
    ``seed``: seeds the critic's initialisation, residual sampling, minibatch order, the environments' first
    resets and the chunk noise of the base. ``evaluate(policy, env_steps)``: see the module docstring.
    ``eval_every`` / ``ckpt_every``: in environment steps (0: only before/after, only at the end).
    ``run_config``: saved as each checkpoint's ``run`` section (task, env_config, settings: provenance).
    """

    def __init__(self, policy: ResidualPolicy, envs: Any, settings: ResidualSettings, *, total_env_steps: int,
                 run_dir: str | os.PathLike, seed: int = 0, evaluate: Evaluate | None = None, eval_every: int = 0,
                 ckpt_every: int = 0, keep_checkpoints: int = 2, run_config: Mapping[str, Any] | None = None,
                 progress: bool = True) -> None:
        settings.check()
        mode = (getattr(envs, "metadata", None) or {}).get("autoreset_mode")
        mode = getattr(mode, "value", mode)  # a gymnasium AutoresetMode or its string
        if mode not in (None, "SameStep"):
            raise ValueError(f"residual PPO needs a vector env in same-step autoreset mode, got {mode!r}")
        self.policy, self.envs, self.s = policy, envs, settings
        self.num_envs = int(envs.num_envs)
        self.total_env_steps, self.seed = int(total_env_steps), int(seed)
        self.evaluate_fn, self.eval_every, self.ckpt_every = evaluate, int(eval_every), int(ckpt_every)
        self.keep_checkpoints = max(1, int(keep_checkpoints))
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.run_config = dict(run_config or {})
        self.progress = progress
        self.device = torch.device(policy.device)

        torch.manual_seed(self.seed)  # the critic's initialisation
        self.critic = Critic(policy.obs_dim, list(settings.critic_hidden)).to(self.device)
        self.actor_opt = torch.optim.Adam(policy.actor.parameters(), lr=settings.actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=settings.critic_lr, eps=1e-5)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(self.seed)
        self.shuffle_gen = torch.Generator().manual_seed(self.seed + 1)
        self.corrector = RolloutCorrector(policy, self.critic, self.sample_gen)
        # The base runs as deployed: batched inference for every environment whose queue ran out.
        self.executor = ChunkExecutor(policy.base, self.num_envs, seed=self.seed, corrector=self.corrector)
        self.env_steps = 0
        self.updates = 0
        self.next_episode = 0  # the chunk-noise rule's episode number of the next episode to start
        self.success_before: float | None = None
        self.last_eval: dict[str, Any] | None = None
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
                finals = [_final_obs(infos, int(i)) for i in cut]
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
                successes.append(bool(_final_info(infos, "success", i) or False))
                self._ep_return[i], self._ep_length[i] = 0.0, 0
                self.executor.reset_env(i, row, episode=self.next_episode)  # obs row: the next episode's first
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

    # ------------------------------------------------------------------ 3. the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``total_env_steps``; returns ``{env_steps, updates, checkpoint, success_rate_before,
        success_rate_after, wall_s, env_steps_s}``. ``resume``: continue after :meth:`load_state`."""
        from tqdm import tqdm

        from robolearn.rl.log import RunLog, plot_success

        log = RunLog(self.run_dir, resume_at=self.env_steps if resume else None)
        self.policy.eval()  # the actor's mode matters to nothing here; the base stays in eval mode regardless
        t_start = time.perf_counter()
        train_s = 0.0  # collection + updates: what env_steps_s is measured over (evaluation excluded)
        started_at = self.env_steps
        bar = tqdm(total=self.total_env_steps, initial=self.env_steps, desc="finetune", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        ckpt: Path | None = None
        try:
            if not resume and self.evaluate_fn is not None:
                self._evaluate(log)  # the base's own success rate: the residual is exactly zero
                self.success_before = self.last_eval["success_rate"] if self.last_eval else None
            elif self.evaluate_fn is not None and self.env_steps >= self.total_env_steps:
                self._evaluate(log)  # resumed a finished run: nothing to train, but say where it stands
            self.start_episodes()
            while self.env_steps < self.total_env_steps:
                t0 = time.perf_counter()
                buf, last_value, episodes = self.collect()
                t1 = time.perf_counter()
                advantages, returns = gae(buf, last_value, self.s.gamma, self.s.gae_lambda)
                stats = self.update(buf, advantages, returns)
                t2 = time.perf_counter()
                train_s += t2 - t0
                before = self.env_steps
                self.env_steps += self.s.rollout_steps * self.num_envs
                self.updates += 1
                record = {"env_steps": self.env_steps, "update": self.updates, **episodes, **stats,
                          "residual_abs": round(float(buf.residual.abs().mean()) * self.s.action_scale, 6),
                          "rollout_s": round(t1 - t0, 3), "update_s": round(t2 - t1, 3),
                          "env_steps_s": round(self.s.rollout_steps * self.num_envs / max(t2 - t0, 1e-9), 1)}
                log.log(record)
                bar.update(self.env_steps - before)
                bar.set_postfix(train_success=episodes["train_success_rate"], kl=stats["approx_kl"],
                                eval=self.last_eval["success_rate"] if self.last_eval else None)
                last = self.env_steps >= self.total_env_steps
                if self.evaluate_fn is not None and self.eval_every and not last \
                        and self.env_steps // self.eval_every > before // self.eval_every:
                    self._evaluate(log)
                if self.evaluate_fn is not None and last:
                    self._evaluate(log)
                if last or (self.ckpt_every and self.env_steps // self.ckpt_every > before // self.ckpt_every):
                    ckpt = self.save()
        finally:
            bar.close()
            log.close()
        if ckpt is None:  # resumed a run that had already finished: its newest checkpoint is the result
            ckpt = (self.ckpt_root / "latest").resolve()
        plot = plot_success(log.records(), self.run_dir / "plots" / "success.png")
        steps_done = self.env_steps - started_at
        return {"env_steps": self.env_steps, "updates": self.updates, "checkpoint": str(ckpt),
                "success_rate_before": self.success_before,
                "success_rate_after": self.last_eval["success_rate"] if self.last_eval else None,
                "eval": self.last_eval, "wall_s": round(time.perf_counter() - t_start, 2),
                "env_steps_s": round(steps_done / train_s, 1) if train_s > 0 else None,
                "inference_s": round(self.executor.inference_s, 2), "plots": [plot] if plot else []}

    def _evaluate(self, log: Any) -> None:
        assert self.evaluate_fn is not None
        result = dict(self.evaluate_fn(self.policy, self.env_steps))
        self.last_eval = result
        log.log({"env_steps": self.env_steps, "eval_success_rate": result.get("success_rate"),
                 **{k if k.startswith("eval_") else f"eval_{k}": v for k, v in result.items()
                    if k not in ("step", "success_rate") and isinstance(v, (int, float)) and not isinstance(v, bool)}})

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """A residual-policy checkpoint (``step_<env steps>``) holding ``rl_state.pt`` too; ``latest`` switched
        to it atomically; only the newest ``keep_checkpoints`` kept."""
        from robolearn.policies.checkpoint import save_policy, writing_checkpoints
        from robolearn.training.trainer import prune_checkpoints, switch_latest

        state = {"critic": self.critic.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                 "critic_opt": self.critic_opt.state_dict(), "env_steps": self.env_steps, "updates": self.updates,
                 "next_episode": self.next_episode, "sample_rng": self.sample_gen.get_state(),
                 "shuffle_rng": self.shuffle_gen.get_state(),
                 "success_before": -1.0 if self.success_before is None else float(self.success_before)}
        folder = self.ckpt_root / f"step_{self.env_steps:010d}"
        extra = {"step": self.env_steps, "env_steps": self.env_steps, "updates": self.updates,
                 "success_rate": self.last_eval.get("success_rate") if self.last_eval else None}
        self.ckpt_root.mkdir(parents=True, exist_ok=True)
        with writing_checkpoints(self.ckpt_root):  # as the trainer: a live writer, nobody cleans meanwhile
            save_policy(self.policy, folder, config={**self.run_config, "settings": dataclasses.asdict(self.s)},
                        extra=extra, write_extra=lambda tmp: torch.save(state, tmp / RL_STATE))
            switch_latest(self.ckpt_root, folder.name)
            prune_checkpoints(self.ckpt_root, self.keep_checkpoints)
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        """Continue from a checkpoint this class saved. The actor's weights are the checkpoint's policy: load it
        with :func:`robolearn.policies.load_policy` (which checks its base) and build this object around it."""
        path = Path(folder) / RL_STATE
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} is missing (not a checkpoint of a fine-tuning run?)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.critic.load_state_dict(state["critic"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.env_steps, self.updates = int(state["env_steps"]), int(state["updates"])
        self.next_episode = int(state["next_episode"])
        self.sample_gen.set_state(state["sample_rng"].cpu())
        self.shuffle_gen.set_state(state["shuffle_rng"].cpu())
        before = float(state["success_before"])
        self.success_before = None if before < 0 else before


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, or (a kill between a save and the switch) the newest complete one."""
    link = Path(root) / "latest"
    if link.is_symlink() and link.resolve().is_dir():
        return link.resolve()
    from robolearn.training.trainer import complete_checkpoints

    done = complete_checkpoints(root)
    return done[-1] if done else None
