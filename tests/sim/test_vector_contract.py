"""``sim.vector.VectorEnv`` against gymnasium's own ``SyncVectorEnv``: same env, same actions, same everything.

``ContractEnv`` lives at module top level so that spawned workers can import it.
"""
from __future__ import annotations

import functools
import os

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

os.environ.setdefault("MUJOCO_GL", "egl")

from sim.vector import VectorEnv, make_vector_env  # noqa: E402

OURS_ONLY = {"episode_return", "_episode_return", "episode_length", "_episode_length"}
N_ENVS = 5


class ContractEnv(gym.Env):
    """Small deterministic env: seeded episode length and start; ends terminated (``a[0] > 0`` once ``t >= length``)
    or truncated one step later. Reset and step infos have different keys, and the step info nests a dict."""

    metadata = {"render_modes": [], "render_fps": 5}

    def __init__(self, max_len: int = 4):
        self.max_len = max_len
        self.observation_space = gym.spaces.Dict(
            {"t": gym.spaces.Box(0, 100, (1,), np.float32), "x": gym.spaces.Box(-100, 100, (2,), np.float32)}
        )
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.steps = 0  # counts every step across episodes
        self.resets = 0
        self.t, self.length, self.x = 0, 0, np.zeros(2, np.float32)

    def _obs(self):
        return {"t": np.array([self.t], np.float32), "x": self.x.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.length = int(self.np_random.integers(2, self.max_len + 1))
        self.x = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        if options and "shift" in options:
            self.x += np.float32(options["shift"])
        self.resets += 1
        return self._obs(), {"success": False, "resets": self.resets, "start": self.x.copy()}

    def step(self, action):
        a = np.asarray(action, np.float32)
        self.t += 1
        self.steps += 1
        self.x = self.x + np.float32(0.5) * a
        terminated = self.t >= self.length and bool(a[0] > 0)
        truncated = not terminated and self.t > self.length
        info = {"success": terminated, "count": self.steps, "extra": {"t": self.t}}
        return self._obs(), float(self.x.sum()), terminated, truncated, info


class NoOptionsEnv(ContractEnv):
    """An env whose ``reset`` takes no ``options``."""

    def reset(self, *, seed=None):  # type: ignore[override]
        return super().reset(seed=seed)


def assert_same(ours, ref, path="") -> None:
    """Equal keys, dtypes and values, recursively (object arrays element by element)."""
    if isinstance(ref, dict):
        assert isinstance(ours, dict), path
        assert set(ours) == set(ref), (path, sorted(ours), sorted(ref))
        for k in ref:
            assert_same(ours[k], ref[k], f"{path}/{k}")
    elif isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray), (path, type(ours))
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (path, ours.dtype, ref.dtype, ours.shape, ref.shape)
        if ref.dtype == object:
            for j, (a, b) in enumerate(zip(ours, ref)):
                assert_same(a, b, f"{path}[{j}]")
        else:
            assert np.array_equal(ours, ref), (path, ours, ref)
    else:
        assert type(ours) is type(ref) and ours == ref, (path, ours, ref)


def ours_vs_gym_infos(ours: dict, ref: dict, path: str) -> None:
    assert_same({k: v for k, v in ours.items() if k not in OURS_ONLY}, ref, path)


def make_pair(mode, num_workers, seed=7, env_cls=ContractEnv):
    ref = SyncVectorEnv([functools.partial(env_cls, max_len=4)] * N_ENVS, autoreset_mode=mode)
    ours = make_vector_env(env_cls, num_envs=N_ENVS, num_workers=num_workers, seed=seed, autoreset_mode=mode,
                           max_len=4)
    return ours, ref


def scripted_actions(steps: int) -> np.ndarray:
    return np.random.default_rng(123).uniform(-1, 1, (steps, N_ENVS, 2)).astype(np.float32)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_matches_gymnasium_sync_vector_env_step_by_step(mode, num_workers):
    ours, ref = make_pair(mode, num_workers)
    try:
        assert isinstance(ours, gym.vector.VectorEnv)
        assert ours.metadata == ref.metadata and ours.metadata["autoreset_mode"] is mode
        assert ours.num_envs == ref.num_envs
        assert ours.single_observation_space == ref.single_observation_space
        assert ours.single_action_space == ref.single_action_space
        assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space

        obs, infos = ours.reset()  # first reset without a seed: the construction seed, env i gets 7 + i
        robs, rinfos = ref.reset(seed=7)
        assert_same(obs, robs, "reset obs")
        ours_vs_gym_infos(infos, rinfos, "reset infos")

        returns, lengths = np.zeros(N_ENVS), np.zeros(N_ENVS, np.int64)
        ends = {"term": 0, "trunc": 0, "success_in_final": 0}
        for t, actions in enumerate(scripted_actions(30)):
            obs, rew, term, trunc, infos = ours.step(actions)
            robs, rrew, rterm, rtrunc, rinfos = ref.step(actions)
            assert_same(obs, robs, f"step {t} obs")
            assert_same(rew, rrew, f"step {t} rew")
            assert_same(term, rterm, f"step {t} term")
            assert_same(trunc, rtrunc, f"step {t} trunc")
            ours_vs_gym_infos(infos, rinfos, f"step {t} infos")

            returns += rew
            lengths += 1
            done = term | trunc
            if done.any():  # our episode totals, masked where an episode ended
                np.testing.assert_array_equal(infos["_episode_return"], done)
                np.testing.assert_array_equal(infos["_episode_length"], done)
                np.testing.assert_allclose(infos["episode_return"][done], returns[done])
                np.testing.assert_array_equal(infos["episode_length"][done], lengths[done])
                assert not infos["episode_return"][~done].any() and not infos["episode_length"][~done].any()
                returns[done], lengths[done] = 0.0, 0
            else:
                assert not (OURS_ONLY & set(infos)) and "final_obs" not in infos
            ends["term"] += int(term.sum())
            ends["trunc"] += int(trunc.sum())

            if mode == AutoresetMode.SAME_STEP:
                if done.any():
                    np.testing.assert_array_equal(infos["_final_obs"], done)
                    np.testing.assert_array_equal(infos["final_info"]["_success"], done)
                    ends["success_in_final"] += int(infos["final_info"]["success"][done].sum())
                    # top level of a finished env: the reset's info (no "count"), obs row: the new episode's first
                    assert not infos["_count"][done].any() and infos["_resets"][done].all()
                    assert (obs["t"][done] == 0).all()
                if t == 12:  # a partial reset with seeds in the middle of episodes
                    mask = np.zeros(N_ENVS, bool)
                    mask[[1, 3]] = True
                    seeds = [900 + i for i in range(N_ENVS)]
                    obs, infos = ours.reset(seed=seeds, options={"reset_mask": mask})
                    robs, rinfos = ref.reset(seed=seeds, options={"reset_mask": mask.copy()})
                    assert_same(obs, robs, "partial reset obs")
                    ours_vs_gym_infos(infos, rinfos, "partial reset infos")
                    returns[mask], lengths[mask] = 0.0, 0
            else:
                assert "final_obs" not in infos and "final_info" not in infos
                if done.any():  # the finished rows are the last observations; the caller resets them
                    assert (obs["t"][done] > 0).all()
                    seeds = [1000 + 10 * t + i for i in range(N_ENVS)] if t % 2 else None
                    obs, infos = ours.reset(seed=seeds, options={"reset_mask": done.copy()})
                    robs, rinfos = ref.reset(seed=seeds, options={"reset_mask": done.copy()})
                    assert_same(obs, robs, f"step {t} reset obs")
                    ours_vs_gym_infos(infos, rinfos, f"step {t} reset infos")
                    np.testing.assert_array_equal(infos["_resets"], done)
        # the script exercised both kinds of episode end (and successes in final_info)
        assert ends["term"] > 0 and ends["trunc"] > 0
        if mode == AutoresetMode.SAME_STEP:
            assert ends["success_in_final"] > 0
        assert ours.call("steps") == list(ref.call("steps")) and ours.get_attr("resets") == ref.get_attr("resets")
    finally:
        ours.close()
        ref.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reset_mask_partial_reset_with_seeds_and_options(num_workers):
    ours, ref = make_pair(AutoresetMode.SAME_STEP, num_workers, seed=3)
    try:
        obs0, _ = ours.reset()
        ref.reset(seed=3)
        before = ours.call("resets")
        mask = np.array([True, False, False, True, False])
        seeds = [50, None, 99, 51, 98]  # seeds of unmasked envs are ignored
        opts = {"reset_mask": mask, "shift": 10.0}
        obs, infos = ours.reset(seed=seeds, options=opts)
        assert opts == {"reset_mask": mask, "shift": 10.0}  # ours leaves the caller's options alone
        robs, rinfos = ref.reset(seed=seeds, options={"reset_mask": mask.copy(), "shift": 10.0})
        assert_same(obs, robs, "obs")
        ours_vs_gym_infos(infos, rinfos, "infos")
        for k in obs0:  # unmasked rows unchanged
            np.testing.assert_array_equal(obs[k][~mask], obs0[k][~mask])
        assert (obs["x"][mask] > 8).all()  # "shift" reached the reset envs' reset(options=...)
        np.testing.assert_array_equal(infos["_success"], mask)
        assert [a - b for a, b in zip(ours.call("resets"), before)] == mask.astype(int).tolist()
        single = ContractEnv(max_len=4)
        ref_obs, _ = single.reset(seed=51, options={"shift": 10.0})
        np.testing.assert_array_equal(obs["x"][3], ref_obs["x"])

        # same checks and error types as gymnasium
        bad = [
            ([True, False, False, True, False], TypeError),
            (np.ones(N_ENVS + 1, bool), ValueError),
            (np.ones(N_ENVS, np.int64), TypeError),
            (np.zeros(N_ENVS, bool), ValueError),
        ]
        for m, err in bad:
            with pytest.raises(err, match="reset_mask"):
                ref.reset(options={"reset_mask": m})
            with pytest.raises(err, match="reset_mask"):
                ours.reset(options={"reset_mask": m})
        with pytest.raises(ValueError, match="length"):
            ours.reset(seed=[1, 2])
        # a full reset with an int seed: env i gets seed + i
        obs, infos = ours.reset(seed=40)
        robs, rinfos = ref.reset(seed=40)
        assert_same(obs, robs, "full reset obs")
        ours_vs_gym_infos(infos, rinfos, "full reset infos")
    finally:
        ours.close()
        ref.close()


def test_env_reset_without_options_parameter():
    venv = make_vector_env(NoOptionsEnv, num_envs=2, num_workers=1, seed=0)
    try:
        obs, infos = venv.reset()  # no options: env.reset is called without them
        obs, infos = venv.reset(options={"reset_mask": np.array([False, True])})  # nor here
        assert infos["_resets"].tolist() == [False, True]
        with pytest.raises(RuntimeError, match=r"worker 0 raised:(.|\n)*TypeError(.|\n)*options"):
            venv.reset(options={"shift": 1.0})
        obs, *_ = venv.step(np.zeros((2, 2)))  # the worker keeps serving
        assert obs["t"][:, 0].tolist() == [1, 1]
    finally:
        venv.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, "NextStep"])
def test_next_step_autoreset_is_refused(mode):
    with pytest.raises(ValueError, match=r"not supported(.|\n)*SAME_STEP(.|\n)*DISABLED(.|\n)*every action"):
        make_vector_env(ContractEnv, num_envs=2, num_workers=0, autoreset_mode=mode)
    with pytest.raises(ValueError, match="unknown autoreset_mode"):
        VectorEnv(ContractEnv, num_envs=2, num_workers=0, autoreset_mode="Sometimes")


def test_string_modes_and_default():
    for value, mode in [("SameStep", AutoresetMode.SAME_STEP), ("Disabled", AutoresetMode.DISABLED)]:
        venv = make_vector_env(ContractEnv, num_envs=2, num_workers=0, autoreset_mode=value)
        assert venv.autoreset_mode is mode and venv.metadata["autoreset_mode"] is mode
        assert venv.metadata["render_fps"] == 5
        venv.close()
    venv = make_vector_env(ContractEnv, num_envs=2, num_workers=0)
    assert venv.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    venv.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_disabled_step_without_reset_names_the_env(num_workers):
    venv = make_vector_env(ContractEnv, num_envs=3, num_workers=num_workers, seed=0, autoreset_mode="Disabled",
                           max_len=2)
    try:
        venv.reset()
        act = np.zeros((3, 2), np.float32)
        act[:, 0] = [-1.0, 1.0, -1.0]  # env 1 terminates at t == length; the others truncate a step later
        done = np.zeros(3, bool)
        while not done[1]:
            _, _, term, trunc, _ = venv.step(act)
            done = term | trunc
        assert done.tolist() == [False, True, False]  # max_len=2: every episode has length 2
        steps = venv.call("steps")
        with pytest.raises(RuntimeError, match=r"\[1\](.|\n)*DISABLED(.|\n)*reset_mask"):
            venv.step(act)
        assert venv.call("steps") == steps  # nothing was stepped
        venv.reset(options={"reset_mask": done.copy()})
        venv.step(act)
        assert venv.call("steps") == [s + 1 for s in steps]
    finally:
        venv.close()
