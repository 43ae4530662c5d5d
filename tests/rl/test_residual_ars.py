"""Random search over a linear residual (finetune.learner=ars): the scenes every direction shares, the search
itself on the tiny ReachEnv task of tests/rl/toys.py (a base that misses the goal by a constant), resume, and what
it refuses."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.policies import load_policy
from robolearn.policies.config import ConfigError
from robolearn.rl.residual_ars import ResidualARS
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import ResidualSettings
from sim.vector import make_vector_env
from toys import EPISODE, OFFSET, NoiseBase, ReachEnv, reach_evaluator, toy_base

RESETS: list[int] = []  # seeds RecordingReach was reset with (in this process: num_workers=0)


class RecordingReach(ReachEnv):
    def reset(self, *, seed=None, options=None):
        RESETS.append(seed)
        return super().reset(seed=seed, options=options)


class VariableReach(ReachEnv):
    """ReachEnv whose episode length depends on the scene (5-15 steps by seed), so environments fall out of step,
    and whose episode ends as a success when the action lands within 0.05 of the goal."""

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.episode_steps = 5 + seed % 11
        return super().reset(seed=seed, options=options)

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated or info["success"], truncated and not info["success"], info



def ars_settings(**kw) -> ResidualSettings:
    defaults = dict(learner="ars", action_scale=0.3, obs_norm="running", ars_directions=8, ars_top=4, ars_states=4,
                    ars_noise=0.1, ars_lr=0.05)
    return ResidualSettings(**{**defaults, **kw})


def toy_run(tmp_path: Path, total: int, *, env=ReachEnv, policy=None, resume_from: Path | None = None,
            evaluate=None, num_envs: int = 8, theta: torch.Tensor | None = None, **kw):
    s = ars_settings(**kw)
    policy = policy if policy is not None else ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(env, num_envs=num_envs, num_workers=0, autoreset_mode="Disabled")
    ars = ResidualARS(policy, envs, s, total_env_steps=total, run_dir=tmp_path / "run", evaluate=evaluate,
                      eval_every=4096, ckpt_every=2048, progress=False, run_config={"task": "reach"})
    if resume_from is not None:
        ars.load_state(resume_from)
    if theta is not None:
        ars.set_theta(theta)
    try:
        return ars, ars.fit(resume=resume_from is not None)
    finally:
        envs.close()


def test_every_direction_and_sign_runs_on_the_same_scenes(tmp_path):
    RESETS.clear()
    _, out = toy_run(tmp_path, 1, env=RecordingReach, ars_directions=3, ars_top=2, ars_states=2)
    assert out["iterations"] == 1
    # 3 directions x 2 signs on each of 2 scenes: 12 episodes of 16 steps on 8 environments -> two waves; the
    # 4 environments left without a job in the second wave run the current residual on scenes of their own
    counts = Counter(RESETS)
    shared = [seed for seed, c in counts.items() if c == 6]
    assert len(shared) == 2 and out["env_steps"] == 2 * EPISODE * 8
    assert sum(c for seed, c in counts.items() if seed not in shared) == 4
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    it = next(r for r in records if "iteration" in r)
    assert it["episodes"] == 12 and it["filler_episodes"] == 4


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if "iteration" in ln]


def test_opposite_vanishing_perturbations_end_alike_with_a_noisy_base_and_a_moving_standardization(tmp_path):
    # a base moved by its chunk noise, a residual far from zero, episodes of different lengths ending early on
    # success, 3 environments for 12 jobs: the + and - runs of a direction happen at different times, and they
    # must still see the same scene, the same noise and the same standardization
    theta = torch.randn(2 * 4 + 2, generator=torch.Generator().manual_seed(3))
    kw = dict(env=VariableReach, num_envs=3, theta=theta, ars_noise=1e-12, ars_directions=3, ars_top=2,
              ars_states=2)
    first = ResidualPolicy(toy_base(tmp_path / "one", NoiseBase), **ars_settings().policy_config())
    _, one = toy_run(tmp_path / "one", 1, policy=first, **kw)  # how many steps one iteration takes
    policy = ResidualPolicy(toy_base(tmp_path, NoiseBase), **ars_settings().policy_config())
    _, out = toy_run(tmp_path, one["env_steps"] + 1, policy=policy, **kw)
    assert out["iterations"] == 2  # the second iteration standardizes with the first one's states folded in
    for rec in records(tmp_path):
        assert rec["return_plus"] == rec["return_minus"] and rec["pair_flip_rate"] == 0.0
        assert rec["step_norm"] == 0.0 and rec["residual_abs"] > 0.05  # the residual acted
    assert float(policy.obs_count) > 0


def test_success_is_read_from_the_episodes_that_end(tmp_path):
    # the exact correction (W = 0, tanh(b) = -OFFSET / 2 / action_scale in [-1, 1] action units): every perturbed
    # episode succeeds; with the base alone none does
    exact = torch.zeros(2 * 4 + 2)
    exact[-2:] = torch.atanh(torch.as_tensor(-OFFSET / 2.0 / 0.3))
    toy_run(tmp_path / "a", 1, env=VariableReach, theta=exact, ars_noise=1e-9)
    toy_run(tmp_path / "b", 1, env=VariableReach, ars_noise=1e-9)
    assert records(tmp_path / "a")[0]["train_success_rate"] == 1.0
    assert records(tmp_path / "b")[0]["train_success_rate"] == 0.0


def test_random_search_learns_the_correction_resumes_and_its_checkpoint_is_the_policy(tmp_path):
    held_out = reach_evaluator()
    base_return = -EPISODE * float(np.sum(OFFSET ** 2))
    first, out = toy_run(tmp_path, 4096, evaluate=held_out)
    ckpt = Path(out["checkpoint"])
    second, out2 = toy_run(tmp_path, 8192, policy=load_policy(ckpt), resume_from=ckpt, evaluate=held_out)
    assert out2["iterations"] > out["iterations"] >= 1 and out2["env_steps"] >= 8192
    assert out2["success_rate_before"] == out["success_rate_before"]
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    assert evals[0] == pytest.approx(base_return, abs=1e-4)  # tanh(0 x + 0) = 0: the untrained residual is the base
    assert evals[-1] > evals[0] + 0.5 * abs(evals[0]), evals  # at least half of the gap to the optimum closed
    loaded = load_policy(out2["checkpoint"])
    assert isinstance(loaded, ResidualPolicy) and loaded.squash and loaded.hidden == []
    assert held_out(loaded, 0)["mean_return"] == pytest.approx(evals[-1], abs=1e-6)
    # resuming continued the run exactly: the same residual and statistics as one uninterrupted run
    straight, _ = toy_run(tmp_path / "straight", 8192)
    assert torch.equal(second.theta(), straight.theta()) and not torch.equal(first.theta(), straight.theta())
    assert torch.equal(second.policy.obs_mean, straight.policy.obs_mean)


def test_what_random_search_refuses(tmp_path):
    with pytest.raises(ConfigError, match="finetune.ars_top must be <= finetune.ars_directions"):
        ars_settings(ars_top=9).check()
    with pytest.raises(ConfigError, match="finetune.ars_noise must be > 0"):
        ars_settings(ars_noise=0.0).check()
    with pytest.raises(ConfigError, match="finetune.demos must be null with learner=ars"):
        ars_settings(demos="data/x.zarr").check()
    base = toy_base(tmp_path)
    same_step = make_vector_env(ReachEnv, num_envs=2, num_workers=0)
    disabled = make_vector_env(ReachEnv, num_envs=2, num_workers=0, autoreset_mode="Disabled")
    try:
        linear = ResidualPolicy(base, **ars_settings().policy_config())
        with pytest.raises(ValueError, match="autoreset mode 'Disabled'"):
            ResidualARS(linear, same_step, ars_settings(), total_env_steps=1, run_dir=tmp_path / "x")
        with pytest.raises(ValueError, match="linear tanh-bounded residual"):  # a PPO residual (hidden layers)
            ResidualARS(ResidualPolicy(base), disabled, ars_settings(), total_env_steps=1, run_dir=tmp_path / "y")
    finally:
        same_step.close()
        disabled.close()
