"""Residual RL by random search over a linear residual (``finetune.learner=ars``): no critic, no per-step noise.

Why a third learner. On peg_insert, PPO's and TD3's residuals did not learn within 2M steps (README, "Fine-tuning
with residual RL"): per-step exploration noise small enough not to wreck a 1 mm insertion carries too little signal
per sample, and the critics found no direction -- yet a hand-written residual that is *linear in the observation*
(steer x/y towards the hole) lifts the base from 0.48 to 0.85. Augmented Random Search (Mania, Guy and Recht,
"Simple random search of static linear policies is competitive for reinforcement learning", NeurIPS 2018) searches
exactly that class: it perturbs the *parameters* of a linear policy, so each episode runs one consistent correction
from its first step to its last, and it compares the returns of opposite perturbations.

What is trained: a :class:`~robolearn.rl.residual_policy.ResidualPolicy` whose residual is ``tanh(W x + b)`` (no
hidden layer, ``squash=True``: a correction never exceeds ``action_scale``), ``x`` the residual's usual input
(observation standardized by the visited states' running mean/std, and the base action). ``W, b`` start at zero, so
the run starts from the base exactly.

One iteration (ARS V2-t, the paper's Algorithm 1 with state normalization and the top-``b`` directions):

1. draw ``ars_directions`` directions ``d_k ~ N(0, I)`` in parameter space;
2. run ``theta + nu d_k`` and ``theta - nu d_k`` (``nu = ars_noise``) for one episode on each of the same
   ``ars_states`` initial states -- every direction and both signs see the same scenes, with the same chunk noise of
   the base, and the same input standardization (frozen for the iteration, as in ARS V2; the perturbed runs'
   observations are folded into it afterwards): common random numbers, so a difference of returns is the
   perturbation's doing, not the scene's;
3. keep the ``ars_top`` directions with the best ``max(r+, r-)`` (mean returns over the states), and step
   ``theta += ars_lr / (ars_top * sigma) * sum_k (r+_k - r-_k) d_k``, ``sigma`` the std of those returns (no step
   when they are all equal: nothing was learned).

Environments run the iteration's episodes as a queue; one whose job queue is empty runs the current ``theta`` on
other scenes (its steps count: every environment step counts towards ``env_steps``) until the iteration ends. The
environments are stepped without autoreset (``autoreset_mode="Disabled"``), so each episode starts from its job's
seeded scene.

Each iteration's record: the perturbed episodes' success and mean returns (``return_plus``, ``return_minus``, of the
top directions ``return_top``), ``residual_abs`` (the perturbed corrections' mean size, ``action_scale x
|tanh(...)|``, in normalized action units), ``pair_flip_rate`` -- the share of (direction, scene) pairs whose outcome the sign
of the perturbation flipped, which is all a sparse reward gives the step to learn from (at a vanishing ``ars_noise`` it is 0:
the scenes, the base's noise and the standardization are shared exactly; tested) -- the step's and the parameters' norms, and
``filler_success_rate``, the current residual's success on the scenes environments ran while waiting (only the
episodes that ended before the iteration did: biased towards short, successful ones; a hint, not an evaluation).

Evaluation (``FinetuneRun``'s): the deployed policy, ``theta`` unperturbed and deterministic, on held-out seeds.
Resume: ``theta`` is the checkpoint's residual; the iteration counter and the direction stream continue (the
iteration in flight when a run stopped is lost: checkpoints are taken between iterations).
"""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from torch.nn.utils import parameters_to_vector, vector_to_parameters

from robolearn.evaluation.rollout import step_info
from robolearn.policies.executor import ChunkExecutor, NonFiniteChunkError
from robolearn.rl.loop import FinetuneRun
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import ResidualSettings

#: training scenes are seeded from here up (evaluations use 100000 + a few thousand by default)
TRAIN_SEEDS = 10_000_000
#: ... and the scenes environments without a job run while they wait, from here up
FILLER_SEEDS = 5_000_000
#: an episode longer than this stops the run (random search compares whole episodes: the task needs a time limit)
MAX_EPISODE_STEPS = 100_000


class PerturbedCorrector:
    """The executor's per-step hook while searching: environment ``i`` runs the linear residual
    ``tanh(W_i x + b_i)`` with its own parameters (row ``i`` of :attr:`theta`, flattened as ``[W, b]``).

    The input standardization stays frozen during an iteration (as in ARS V2: the + and - runs of a direction
    happen at different times, and moving statistics would make them differ by more than the perturbation); the
    observations of the environments in :attr:`record` (those running a perturbed job) are kept in :attr:`seen`
    and merged into the statistics after the iteration. :attr:`moved` sums ``action_scale * |residual|`` over
    them (the correction's mean size in normalized action units is ``moved / count``)."""

    def __init__(self, policy: ResidualPolicy, num_envs: int, n_params: int) -> None:
        self.policy = policy
        self.theta = torch.zeros(num_envs, n_params, device=policy.device)
        self.record = np.zeros(num_envs, dtype=bool)
        self.seen: list[torch.Tensor] = []
        self.moved, self.count = 0.0, 0

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, np.ndarray], base_actions: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        p = self.policy
        ids_np = np.asarray(env_ids)
        keep = self.record[ids_np]
        if keep.any():
            self.seen.append(p.base_features({k: np.asarray(v)[keep] for k, v in obs.items()}))
        obs_f, base_n = p.features(obs, base_actions)
        x = p.actor_input(obs_f, base_n)  # (n, D)
        ids = torch.as_tensor(ids_np, dtype=torch.long, device=x.device)
        A, D = p.action_dim, x.shape[1]
        rows = self.theta[ids]
        W, b = rows[:, :A * D].reshape(-1, A, D), rows[:, A * D:]
        residual = torch.tanh(torch.einsum("nad,nd->na", W, x) + b)
        if keep.any():
            self.moved += float(residual[torch.as_tensor(keep)].abs().sum()) * p.action_scale
            self.count += int(keep.sum()) * A
        return p.apply_residual(base_actions, residual)

    def merge_stats(self) -> None:
        """Fold the iteration's recorded observations into the running statistics; start a new record."""
        if self.seen and self.policy.obs_norm == "running":
            self.policy.update_obs_stats(torch.cat(self.seen))
        self.seen, self.moved, self.count = [], 0.0, 0


class ResidualARS(FinetuneRun):
    """Augmented Random Search for ``policy``'s linear residual in ``envs`` (a vector env without autoreset).

    Arguments: :class:`~robolearn.rl.loop.FinetuneRun`'s; ``total_env_steps`` is rounded up to whole iterations.
    ``seed`` seeds the directions, the training scenes and the base's chunk noise."""

    method = "residual ARS"
    autoreset_mode = "Disabled"
    plot_title = "residual fine-tuning (random search)"
    train_label = "training episodes (perturbed residuals)"
    eval_label = "evaluation (residual, held-out seeds)"

    def __init__(self, policy: ResidualPolicy, envs: Any, settings: ResidualSettings, **run: Any) -> None:
        super().__init__(policy, envs, settings, **run)
        net = policy.actor.mean
        if len(net) != 1 or not isinstance(net[0], torch.nn.Linear) or not getattr(policy, "squash", False):
            raise ValueError("learner=ars trains a linear tanh-bounded residual: build the ResidualPolicy with "
                             "hidden=[] and squash=True (ResidualSettings(learner='ars').policy_config() does)")
        self.linear = net[0]
        self.n_params = self.linear.weight.numel() + self.linear.bias.numel()
        self.dir_gen = torch.Generator().manual_seed(self.seed + 17)
        self.corrector = PerturbedCorrector(policy, self.num_envs, self.n_params)
        self.executor = ChunkExecutor(policy.base, self.num_envs, seed=self.seed, corrector=self.corrector)
        self.iterations = 0
        self._filler = 0  # scenes run by environments whose iteration had no job left

    # ------------------------------------------------------------------ parameters
    def theta(self) -> torch.Tensor:
        """The residual's parameters as one vector ``[W.flatten(), b]`` (the layout :class:`PerturbedCorrector`
        reads)."""
        return parameters_to_vector(self.linear.parameters()).detach().float().cpu()

    def set_theta(self, theta: torch.Tensor) -> None:
        with torch.no_grad():
            vector_to_parameters(theta.to(self.linear.weight), self.linear.parameters())

    # ------------------------------------------------------------------ one iteration
    def start_episodes(self) -> None:
        """Nothing to do: every iteration seeds its own scenes."""

    def _start(self, jobs: list[tuple[int, Any]]) -> None:
        """Reset each listed environment onto its job's scene: ``(env, (seed, episode, params))``."""
        mask = np.zeros(self.num_envs, dtype=np.bool_)
        seeds: list[int | None] = [None] * self.num_envs
        for i, (seed, _, _) in jobs:
            mask[i], seeds[i] = True, int(seed)
        obs, _ = self.envs.reset(seed=seeds, options={"reset_mask": mask})
        for i, (_, episode, params) in jobs:
            self.executor.reset_env(i, {k: v[i] for k, v in obs.items()}, episode=episode)
            self.corrector.theta[i] = params

    @torch.no_grad()
    def advance(self) -> dict[str, Any]:
        """One ARS iteration: every direction's two perturbations on the iteration's scenes, then the step."""
        s, n = self.s, self.num_envs
        t0 = time.perf_counter()
        N, m = int(s.ars_directions), int(s.ars_states)
        theta = self.theta()
        deltas = torch.randn(N, self.n_params, generator=self.dir_gen)
        first = TRAIN_SEEDS + 1_000_003 * self.seed + self.iterations * m
        episode0 = self.iterations * m  # the base's chunk noise: one episode number per scene, shared by all jobs
        queue: deque[tuple[int, int, int]] = deque((k, sign, j) for j in range(m) for k in range(N) for sign in (0, 1))
        returns = np.full((N, 2, m), np.nan)
        successes = np.zeros((N, 2, m), dtype=bool)
        job_of: list[tuple[int, int, int] | None] = [None] * n
        ep_return = np.zeros(n)
        filler_success: list[bool] = []

        def next_job(i: int) -> tuple[int, Any]:
            ep_length[i] = 0
            if queue:
                k, sign, j = queue.popleft()
                job_of[i] = (k, sign, j)
                self.corrector.record[i] = True
                params = theta + (1.0 if sign == 0 else -1.0) * float(s.ars_noise) * deltas[k]
                return i, (first + j, episode0 + j, params)
            job_of[i] = None
            self.corrector.record[i] = False
            self._filler += 1
            return i, (FILLER_SEEDS + 1_000_003 * self.seed + self._filler, FILLER_SEEDS + self._filler, theta)

        ep_length = np.zeros(n, dtype=np.int64)
        self._start([next_job(i) for i in range(n)])
        steps = 0
        while np.isnan(returns).any():
            actions = self.executor.act()
            if self.executor.refused:
                raise NonFiniteChunkError(f"the base policy returned a non-finite action chunk (NaN/inf) for "
                                          f"environment(s) {self.executor.refused}: its weights or the "
                                          f"observations' scale are broken")
            obs, reward, terminated, truncated, infos = self.envs.step(
                actions.reshape((n, *self.envs.single_action_space.shape)))
            steps += 1
            ep_length += 1
            if ep_length.max() > MAX_EPISODE_STEPS:
                i = int(ep_length.argmax())
                raise RuntimeError(f"environment {i}'s episode has run {MAX_EPISODE_STEPS:,} steps without ending: "
                                   f"learner=ars compares whole episodes, so the task needs a time limit "
                                   f"(env.max_episode_steps=...)")
            ep_return += np.asarray(reward, dtype=np.float64)
            done = np.asarray(terminated, bool) | np.asarray(truncated, bool)
            for i in range(n):
                if not done[i]:
                    self.executor.observe_env(i, {k: v[i] for k, v in obs.items()})
                    continue
                ok = bool(step_info(infos, "success", i, finished_here=False, default=False))  # no autoreset
                job = job_of[i]
                if job is None:
                    filler_success.append(ok)
                else:
                    k, sign, j = job
                    returns[k, sign, j], successes[k, sign, j] = ep_return[i], ok
                ep_return[i] = 0.0
            if done.any() and np.isnan(returns).any():  # the iteration goes on: new jobs (or fillers)
                self._start([next_job(int(i)) for i in np.flatnonzero(done)])
        self.env_steps += steps * n
        t1 = time.perf_counter()

        r = returns.mean(axis=2)  # (N, 2): mean return of theta + nu d_k and theta - nu d_k
        b = min(int(s.ars_top), N)
        top = np.argsort(-r.max(axis=1), kind="stable")[:b]
        sigma = float(r[top].std())
        diff = torch.as_tensor(r[top, 0] - r[top, 1], dtype=torch.float32)
        if sigma > 0:
            step = float(s.ars_lr) / (b * sigma) * (diff[:, None] * deltas[torch.as_tensor(top)]).sum(0)
        else:
            step = torch.zeros_like(theta)
        self.set_theta(theta + step)
        moved = self.corrector.moved / max(self.corrector.count, 1)
        self.corrector.merge_stats()  # the next iteration standardizes with this one's states folded in
        self.iterations += 1
        return {"env_steps": self.env_steps, "iteration": self.iterations, "episodes": int(returns.size),
                "train_success_rate": round(float(successes.mean()), 4),
                "train_return": round(float(returns.mean()), 4),
                "return_plus": round(float(r[:, 0].mean()), 4), "return_minus": round(float(r[:, 1].mean()), 4),
                "return_top": round(float(r[top].max(axis=1).mean()), 4),
                # scenes whose outcome the sign of a perturbation flipped (what the step learns from)
                "pair_flip_rate": round(float((successes[:, 0] != successes[:, 1]).mean()), 4),
                "filler_success_rate": round(float(np.mean(filler_success)), 4) if filler_success else None,
                "filler_episodes": len(filler_success), "return_sigma": round(sigma, 6),
                "residual_abs": round(moved, 6), "step_norm": round(float(step.norm()), 6), "theta_norm": round(float(self.theta().norm()), 6),
                "rollout_s": round(t1 - t0, 3), "env_steps_s": round(steps * n / max(t1 - t0, 1e-9), 1)}

    def counters(self) -> dict[str, int]:
        return {"iterations": self.iterations}

    def postfix(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {"train_success": record.get("train_success_rate"), "step": record.get("step_norm")}

    # ------------------------------------------------------------------ resumable state
    def rl_state(self) -> dict[str, Any]:
        return {"learner": "ars", "iterations": self.iterations, "filler": self._filler,
                "dir_rng": self.dir_gen.get_state()}

    def restore(self, state: Mapping[str, Any], folder: Path) -> None:
        if state.get("learner") != "ars":
            raise ValueError(f"{folder / 'rl_state.pt'} is not a learner=ars run's state (resume it with the "
                             f"learner it was started with)")
        self.iterations, self._filler = int(state["iterations"]), int(state["filler"])
        self.dir_gen.set_state(state["dir_rng"].cpu())
