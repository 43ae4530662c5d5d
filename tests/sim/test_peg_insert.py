"""Peg insertion: the env contract, the hole geometry, jamming, and the scripted expert (real MuJoCo)."""
from __future__ import annotations

import numpy as np
import pytest

import sim
from sim.tasks.peg_insert import HOLE_DEPTH, HOLE_TOP, PegInsertEnv, make_env, yaw_error


def _rollout(env: PegInsertEnv, seed: int, n: int) -> list[dict[str, np.ndarray]]:
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(5)
    out = [obs]
    for _ in range(n):
        obs, *_ = env.step(rng.uniform(-1, 1, size=4).astype(np.float32))
        out.append(obs)
    return out


def test_reset_step_observations_match_space() -> None:
    env = sim.make("peg_insert")
    obs, info = env.reset(seed=0)
    assert set(obs) == {"ee_pos", "ee_yaw", "peg_tip_pos", "peg_quat", "hole_pos", "hole_yaw", "tip_to_hole"}
    assert info["success"] is False and env.observation_space.contains(obs)
    for _ in range(5):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and reward in (0.0, 1.0)
        assert isinstance(info["success"], bool)
    np.testing.assert_allclose(obs["tip_to_hole"], obs["hole_pos"] - obs["peg_tip_pos"], atol=1e-6)
    assert env.unwrapped.fps == 10.0 and env.unwrapped.max_episode_steps == 150


def test_same_seed_same_trajectory_and_different_seed_differs() -> None:
    a = _rollout(make_env(), seed=3, n=30)
    b = _rollout(make_env(), seed=3, n=30)
    c = _rollout(make_env(), seed=4, n=1)
    for oa, ob in zip(a, b):
        for key in oa:
            np.testing.assert_array_equal(oa[key], ob[key])
    assert not np.array_equal(a[0]["hole_pos"], c[0]["hole_pos"])


@pytest.mark.parametrize("clearance", [0.0005, 0.001, 0.004])
def test_clearance_sets_the_opening(clearance: float) -> None:
    env = make_env(clearance=clearance)
    m = env.model
    inner = m.geom("wall_px").pos[0] - m.geom("wall_px").size[0]  # inner face of the +x wall
    assert 2 * inner == pytest.approx(0.02 + clearance, abs=1e-9)
    inner_y = m.geom("wall_py").pos[1] - m.geom("wall_py").size[1]
    assert 2 * inner_y == pytest.approx(0.02 + clearance, abs=1e-9)


def _descend(env: PegInsertEnv, seed: int, offset: float) -> bool:
    """Hover, align with the hole shifted by ``offset`` along the hole's x axis, then push straight down."""
    obs, _ = env.reset(seed=seed)
    c, s = np.cos(obs["hole_yaw"][0]), np.sin(obs["hole_yaw"][0])
    step = env.config.max_step
    for k in range(60):
        d = obs["tip_to_hole"].astype(float) + offset * np.array([c, s, 0.0])
        dz = d[2] + 0.012 if k < 40 else d[2] - HOLE_DEPTH
        ye = yaw_error(float(obs["hole_yaw"][0]), float(obs["ee_yaw"][0]))
        obs, _, terminated, _, info = env.step(np.clip([d[0] / step, d[1] / step, dz / step, ye / 0.1], -1, 1))
        if terminated:
            break
    return bool(info["success"])


def test_aligned_peg_goes_in_and_misaligned_peg_jams() -> None:
    env = make_env()
    assert _descend(env, seed=0, offset=0.0)
    assert not _descend(env, seed=0, offset=0.002)  # 2 mm off: 1.5 mm more than the per-side clearance
    assert env.tip_pos[2] > HOLE_TOP - 0.01  # stuck at the rim, not deep in a wall


def test_dense_reward_grows_towards_success() -> None:
    env = make_env(reward_type="dense")
    obs, _ = env.reset(seed=1)
    expert = sim.make_expert("peg_insert")
    expert.reset(env)
    rewards = []
    for _ in range(150):
        obs, reward, terminated, _, info = env.step(expert.act(obs))
        rewards.append(reward)
        assert 0.0 <= reward <= 1.0
        if terminated:
            break
    assert info["success"] and rewards[-1] == 1.0 and rewards[0] < 0.5


def test_time_limit_truncates() -> None:
    env = make_env(max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(np.zeros(4, np.float32))[3] for _ in range(3)]
    assert flags == [False, False, True]


def test_bad_overrides_are_named() -> None:
    with pytest.raises(ValueError, match=r"unknown override 'clearence' for task peg_insert.*valid: .*clearance"):
        make_env(clearence=0.001)
    with pytest.raises(TypeError, match="clearance"):
        make_env(clearance="1mm")
    with pytest.raises(ValueError, match="clearance"):
        make_env(clearance=-0.001)


def test_env_config_recreates_env() -> None:
    env = make_env(clearance=0.002, reward_type="dense")
    again = sim.make("peg_insert", **env.env_config())
    assert again.env_config() == env.env_config() and again.hole_half == pytest.approx(0.011)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_solves_fixed_seeds(seed: int) -> None:
    env = make_env()
    expert = sim.make_expert("peg_insert", seed=seed)
    obs, _ = env.reset(seed=seed)
    expert.reset(env)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    assert info["success"]
    assert obs["peg_tip_pos"][2] <= HOLE_TOP - 0.8 * HOLE_DEPTH + 1e-6


def test_biased_expert_misjudges_the_hole_jams_corrects_and_gets_in() -> None:
    env = make_env()
    seed = 7
    runs = {}
    for bias in (0.0, 3.0):
        expert = sim.make_expert("peg_insert", seed=seed, bias=bias)
        obs, _ = env.reset(seed=seed)
        expert.reset(env)
        aim0 = expert._aim.copy()
        backoffs, actions = 0, []
        for _ in range(env.max_episode_steps):
            a = expert.act(obs)
            backoffs += expert._backoff == 3  # a jam was just detected
            actions.append(a)
            obs, _, terminated, truncated, info = env.step(a)
            if terminated or truncated:
                break
        runs[bias] = (aim0, expert._aim.copy(), backoffs, len(actions), info["success"])
    clean, biased = runs[0.0], runs[3.0]
    assert clean[2] == 0 and not clean[0].any() and clean[4]
    assert np.hypot(*biased[0]) > 0.0005  # this seed's misjudgment is wider than the clearance: it jams...
    assert biased[2] >= 1 and np.allclose(biased[1], biased[0] * 0.5 ** biased[2])  # ...halving it each time
    assert biased[4] and biased[3] > clean[3]  # and still gets in, later
    # bias 0 draws nothing: the noisy expert's random stream (its actions) is what it was before bias existed
    a, b = sim.make_expert("peg_insert", seed=1, noise=0.5), sim.make_expert("peg_insert", seed=1, noise=0.5, bias=0.0)
    obs, _ = env.reset(seed=1)
    a.reset(env), b.reset(env)
    assert all(np.array_equal(a.act(obs), b.act(obs)) for _ in range(20))
    with pytest.raises(ValueError, match="bias"):
        sim.make_expert("peg_insert", bias=-1.0)
    with pytest.raises(TypeError, match="valid: noise, seed, bias"):
        sim.make_expert("peg_insert", offset=1.0)


def test_render_and_image_observation() -> None:
    env = make_env(obs_mode="image", render_size=64)
    try:
        obs, _ = env.reset(seed=0)
    except Exception as exc:  # pragma: no cover - only where no OpenGL (EGL) is available
        pytest.skip(f"offscreen rendering unavailable: {exc}")
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and frame.std() > 5
    env.close()
