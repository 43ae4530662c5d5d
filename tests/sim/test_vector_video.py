"""Vectorized environments (in-process and subprocess) and the env benchmark (videos: tests/evaluation)."""
from __future__ import annotations

import os
import signal
import time

import gymnasium as gym
import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import sim  # noqa: E402
from sim.bench import bench_env  # noqa: E402
from sim.vector import make_vector_env  # noqa: E402


class CountEnv(gym.Env):
    """Obs is the step count; the episode ends after ``length`` steps (terminated) with reward = action sum."""

    def __init__(self, length: int = 3):
        self.length = length
        self.observation_space = gym.spaces.Dict({"t": gym.spaces.Box(0, 100, (1,), np.float32)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return {"t": np.array([self.t], np.float32)}, {"success": False}

    def step(self, action):
        self.t += 1
        done = self.t >= self.length
        return {"t": np.array([self.t], np.float32)}, float(np.sum(action)), done, False, {"success": done}


def test_in_process_vector_env_autoresets_on_the_same_step():
    venv = make_vector_env(CountEnv, num_envs=3, num_workers=0, length=2)
    try:
        obs, infos = venv.reset(seed=0)
        assert obs["t"].shape == (3, 1) and infos["success"].tolist() == [False] * 3
        assert venv.single_action_space.shape == (2,) and venv.action_space.shape == (3, 2)
        obs, rew, term, trunc, infos = venv.step(np.ones((3, 2)))
        assert obs["t"][:, 0].tolist() == [1, 1, 1] and rew.tolist() == [2.0] * 3 and not term.any()
        obs, rew, term, trunc, infos = venv.step(np.ones((3, 2)))
        assert term.all() and infos["_final_obs"].all() and infos["_final_info"].all()
        assert infos["final_info"]["success"].all()  # the finished step's info (gymnasium's layout)
        assert not infos["success"].any() and infos["_success"].all()  # top level: the reset's info
        assert obs["t"][:, 0].tolist() == [0, 0, 0]  # already the next episode's first observation
        assert [f["t"][0] for f in infos["final_obs"]] == [2, 2, 2]
        assert infos["episode_return"].tolist() == [4.0] * 3 and infos["episode_length"].tolist() == [2] * 3
        assert infos["_episode_return"].all() and infos["_episode_length"].all()
        obs, rew, term, trunc, infos = venv.step(np.zeros((3, 2)))
        assert obs["t"][:, 0].tolist() == [1, 1, 1] and "final_obs" not in infos and "episode_return" not in infos
        with pytest.raises(ValueError, match="rows"):
            venv.step(np.zeros((2, 2)))
    finally:
        venv.close()


def test_subprocess_vector_env_matches_single_env_and_reports_dead_worker():
    single = sim.make("lift", max_episode_steps=3)
    venv = make_vector_env("lift", num_envs=3, num_workers=2, seed=10, max_episode_steps=3)
    try:
        assert venv.single_observation_space == single.observation_space
        obs, infos = venv.reset()  # first reset uses the construction seed: env i gets 10 + i
        for i in range(3):
            ref, _ = single.reset(seed=10 + i)
            for k in ref:
                assert np.array_equal(obs[k][i], ref[k]), (i, k)
        actions = np.zeros((3, 7))
        for _ in range(2):
            _, _, term, trunc, infos = venv.step(actions)
            assert not trunc.any() and "final_obs" not in infos
        obs, _, term, trunc, infos = venv.step(actions)
        assert trunc.all() and infos["_final_obs"].all() and infos["episode_length"].tolist() == [3, 3, 3]
        assert set(infos["final_obs"][0]) == set(obs)
        assert infos["_final_info"].all() and infos["final_info"]["_success"].all()
        assert venv.call("fps") == [20, 20, 20]
        os.kill(venv._procs[1].pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(RuntimeError, match=r"worker 1 .* died"):
            venv.step(actions)
        assert time.time() - t0 < 10
        with pytest.raises(RuntimeError, match="closed"):
            venv.step(actions)
    finally:
        venv.close()
        single.close()


def test_worker_exception_comes_back_with_traceback():
    venv = make_vector_env("lift", num_envs=1, num_workers=1, seed=0)
    try:
        venv.reset()
        with pytest.raises(RuntimeError, match=r"raised:(.|\n)*AttributeError"):
            venv.call("no_such_attribute")
        obs, *_ = venv.step(np.zeros((1, 7)))  # the worker keeps serving after a reported error
        assert obs["robot0_eef_pos"].shape == (1, 3)
    finally:
        venv.close()


def test_bench_env_reports_both_speeds():
    stats = bench_env("lift", steps=100, seed=0)
    assert stats["task"] == "lift" and stats["steps"] == 100
    assert stats["steps_per_s"] > 0 and stats["raw_steps_per_s"] > 0 and "overhead_pct" in stats
