"""Push-T in MuJoCo: the env contract, the coverage estimate, and the scripted expert (real MuJoCo, no mocks)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import sim
from sim.tasks.push_t import GOAL_POSE, CoverageGrid, PushTEnv, make_env


def _rollout(env: PushTEnv, seed: int, n: int) -> list[dict[str, np.ndarray]]:
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(123)
    out = [obs]
    for _ in range(n):
        obs, *_ = env.step(rng.uniform(-0.25, 0.25, size=2).astype(np.float32))
        out.append(obs)
    return out


@pytest.mark.parametrize("obs_mode,keys", [("state", {"agent_pos", "block_pose", "block_yaw_sincos"}),
                                           ("keypoints", {"agent_pos", "keypoints"})])
def test_reset_step_observations_match_space(obs_mode: str, keys: set[str]) -> None:
    env = sim.make("push_t", obs_mode=obs_mode)
    obs, info = env.reset(seed=0)
    assert set(obs) == keys and info["success"] is False
    assert env.observation_space.contains(obs)
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert isinstance(info["success"], bool) and 0.0 <= reward <= 1.0
    assert env.unwrapped.fps == 10.0 and env.unwrapped.max_episode_steps == 300
    assert env.unwrapped.task_name == "push_t"


def test_same_seed_same_trajectory_and_different_seed_differs() -> None:
    a = _rollout(make_env(), seed=7, n=30)
    b = _rollout(make_env(), seed=7, n=30)
    c = _rollout(make_env(), seed=8, n=30)
    for oa, ob in zip(a, b):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
    assert not np.array_equal(a[0]["block_pose"], c[0]["block_pose"])


def test_initial_block_is_away_from_goal() -> None:
    env = make_env()
    for seed in range(20):
        _, info = env.reset(seed=seed)
        assert info["coverage"] <= 0.2


def test_coverage_hand_worked_cases() -> None:
    cov = CoverageGrid()
    assert cov(GOAL_POSE) == 1.0
    assert cov(np.array([0.2, -0.2, 0.0])) == 0.0
    # Shift the block 1 cm along the goal's own x axis: the bar keeps 0.11 x 0.03 and the stem 0.02 x 0.09 of
    # overlap, and the shifted pieces do not reach into each other's rows: (0.0033 + 0.0018) / 0.0063.
    g = GOAL_POSE[2]
    shifted = GOAL_POSE + np.array([0.01 * math.cos(g), 0.01 * math.sin(g), 0.0])
    assert cov(shifted) == pytest.approx(0.0051 / 0.0063, abs=0.006)
    # Arbitrary near-goal poses: agree with a fine (0.5 mm) reference grid.
    ref = CoverageGrid(spacing=0.0005)
    rng = np.random.default_rng(0)
    for _ in range(20):
        pose = GOAL_POSE + np.array([*rng.normal(0, 0.01, 2), rng.normal(0, 0.1)])
        assert cov(pose) == pytest.approx(ref(pose), abs=0.01)


def test_reward_success_and_termination_on_goal() -> None:
    env = make_env()
    env.reset(seed=0)
    env.set_state(np.array([0.2, 0.2]), GOAL_POSE)
    _, reward, terminated, truncated, info = env.step(np.array([0.2, 0.2], np.float32))
    assert info["success"] is True and reward == 1.0 and terminated and not truncated

    sparse = make_env(reward_type="sparse")
    sparse.reset(seed=0)
    shifted = GOAL_POSE + np.array([0.03, 0.0, 0.0])
    sparse.set_state(np.array([0.2, 0.2]), shifted)
    _, reward, terminated, _, info = sparse.step(np.array([0.2, 0.2], np.float32))
    assert reward == 0.0 and not info["success"] and not terminated
    dense = make_env()
    dense.reset(seed=0)
    dense.set_state(np.array([0.2, 0.2]), shifted)
    _, reward, _, _, info = dense.step(np.array([0.2, 0.2], np.float32))
    assert reward == pytest.approx(info["coverage"] / 0.95) and 0.0 < reward < 1.0


def test_time_limit_truncates() -> None:
    env = make_env(max_episode_steps=4)
    env.reset(seed=1)
    flags = [env.step(env.action_space.sample())[3] for _ in range(4)]
    assert flags == [False, False, False, True]


def test_pusher_moves_block() -> None:
    env = make_env()
    env.reset(seed=0)
    env.set_state(np.array([0.0, -0.15]), np.array([0.0, 0.0, 0.0]))
    for k in range(15):  # straight up into the stem's bottom face
        obs, *_ = env.step(np.array([0.0, -0.15 + 0.01 * (k + 1)], np.float32))
    assert obs["block_pose"][1] > 0.03
    assert abs(obs["block_pose"][2]) < 0.05  # a centred push barely turns it


def test_bad_overrides_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown override 'obs_mod' for task push_t.*valid: .*obs_mode"):
        make_env(obs_mod="state")
    with pytest.raises(TypeError, match="max_episode_steps"):
        make_env(max_episode_steps="300")
    with pytest.raises(ValueError, match="obs_mode"):
        make_env(obs_mode="pixels")


def test_env_config_recreates_env() -> None:
    env = make_env(obs_mode="keypoints", max_episode_steps=50)
    cfg = env.env_config()
    again = sim.make("push_t", **cfg)
    assert again.env_config() == cfg and again.max_episode_steps == 50
    assert set(again.observation_space.spaces) == {"agent_pos", "keypoints"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_solves_fixed_seeds(seed: int) -> None:
    env = make_env()
    expert = sim.make_expert("push_t", seed=seed)
    obs, _ = env.reset(seed=seed)
    expert.reset(env)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    assert info["success"], f"coverage {info['coverage']:.3f}"


def test_render_and_image_observation() -> None:
    env = make_env(obs_mode="image", render_size=64)
    try:
        obs, _ = env.reset(seed=0)
    except Exception as exc:  # pragma: no cover - only where no OpenGL (EGL) is available
        pytest.skip(f"offscreen rendering unavailable: {exc}")
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
    assert env.observation_space.contains(obs)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    assert frame.std() > 5  # not a blank frame: table, goal, block and pusher differ in colour
    env.close()
