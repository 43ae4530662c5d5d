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

from robolearn.policies import load_policy, save_policy
from robolearn.policies.config import ConfigError
from robolearn.rl.residual_ars import ResidualARS
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import ResidualSettings
from sim.vector import make_vector_env
from toys import EPISODE, OFFSET, OffsetBase, ReachEnv, reach_evaluator

RESETS: list[int] = []  # seeds RecordingReach was reset with (in this process: num_workers=0)


class RecordingReach(ReachEnv):
    def reset(self, *, seed=None, options=None):
        RESETS.append(seed)
        return super().reset(seed=seed, options=options)


def toy_base(tmp_path: Path) -> OffsetBase:
    save_policy(OffsetBase(), tmp_path / "base")
    return load_policy(tmp_path / "base")


def ars_settings(**kw) -> ResidualSettings:
    defaults = dict(learner="ars", action_scale=0.3, obs_norm="running", ars_directions=8, ars_top=4, ars_states=4,
                    ars_noise=0.1, ars_lr=0.05)
    return ResidualSettings(**{**defaults, **kw})


def toy_run(tmp_path: Path, total: int, *, env=ReachEnv, policy=None, resume_from: Path | None = None,
            evaluate=None, **kw):
    s = ars_settings(**kw)
    policy = policy if policy is not None else ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(env, num_envs=8, num_workers=0, autoreset_mode="Disabled")
    ars = ResidualARS(policy, envs, s, total_env_steps=total, run_dir=tmp_path / "run", evaluate=evaluate,
                      eval_every=4096, ckpt_every=2048, progress=False, run_config={"task": "reach"})
    if resume_from is not None:
        ars.load_state(resume_from)
    try:
        return ars, ars.fit(resume=resume_from is not None)
    finally:
        envs.close()


def test_every_direction_and_sign_runs_on_the_same_scenes(tmp_path):
    RESETS.clear()
    ars, out = toy_run(tmp_path, 1, env=RecordingReach, ars_directions=3, ars_top=2, ars_states=2)
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
    # the run's directions continued after the resume (not the first run's again)
    assert not torch.equal(first.dir_gen.get_state(), second.dir_gen.get_state())


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
