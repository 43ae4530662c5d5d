"""The evaluation room: repeatable per-episode results whatever the batching, gymnasium's own vector envs, videos
of exactly the evaluated episodes, the one mp4 writer, and the runner replaying an evaluation offline."""
from __future__ import annotations

import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

import sim  # noqa: E402
from robolearn.accel import prepare_for_inference  # noqa: E402
from robolearn.evaluation import evaluate, record_episode, record_video, write_video  # noqa: E402
from robolearn.policies import load_policy  # noqa: E402
from robolearn.runtime import Runner  # noqa: E402
from sim.vector import make_vector_env  # noqa: E402

CKPT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "v1_push_t_diffusion_unet"
SEEDS = [100000 + j for j in range(5)]
SHORT = {"max_episode_steps": 40}  # push_t, short episodes: the point is identity, not success


@pytest.fixture(scope="module")
def policy():
    return prepare_for_inference(load_policy(CKPT))


def _key(result: dict) -> list[tuple]:
    return [(r["episode"], r["seed"], r["return"], r["max_reward"], r["length"], r["success"],
             r["actions"].tobytes()) for r in result["per_episode"]]


def test_results_do_not_depend_on_batching_workers_or_the_vector_env(policy) -> None:
    make = lambda: sim.make("push_t", **SHORT)  # noqa: E731
    runs = {}
    with make_vector_env("push_t", num_envs=1, num_workers=0, autoreset_mode="Disabled", **SHORT) as venv:
        runs["ours 1 env"] = evaluate(policy, venv, SEEDS, keep_steps=True)
    with make_vector_env("push_t", num_envs=3, num_workers=2, **SHORT) as venv:  # same-step autoreset
        runs["ours 3 envs, 2 workers"] = evaluate(policy, venv, SEEDS, keep_steps=True)
    for mode in (gym.vector.AutoresetMode.SAME_STEP, gym.vector.AutoresetMode.DISABLED):
        venv = gym.vector.SyncVectorEnv([make] * 2, autoreset_mode=mode)
        runs[f"gymnasium {mode.value}"] = evaluate(policy, venv, SEEDS, keep_steps=True)
        venv.close()
    runs["one env factory"] = evaluate(policy, make, SEEDS, keep_steps=True)
    first = _key(runs["ours 1 env"])
    assert [r[0] for r in first] == list(range(5)) and all(r[4] == 40 for r in first)
    for name, result in runs.items():
        assert _key(result) == first, name
    assert len({r[-1] for r in first}) == 5  # different seeds, different episodes


def test_next_step_autoreset_is_refused(policy) -> None:
    venv = gym.vector.SyncVectorEnv([lambda: sim.make("push_t", **SHORT)], autoreset_mode="NextStep")
    with pytest.raises(ValueError, match="same-step or disabled autoreset"):
        evaluate(policy, venv, SEEDS[:1])
    venv.close()


def test_a_video_shows_exactly_the_evaluated_episode(policy, tmp_path: Path) -> None:
    import imageio.v3 as iio

    result = evaluate(policy, lambda: sim.make("push_t", **SHORT), SEEDS[:3], keep_steps=True)
    env = sim.make("push_t", render_size=64, **SHORT)
    try:
        video = record_video(policy, env, SEEDS[2], str(tmp_path / "ep2.mp4"), episode=2, noise_seed=SEEDS[0])
    finally:
        env.close()
    ep = result["per_episode"][2]
    assert (video["steps"], video["return"], video["success"]) == (ep["length"], ep["return"], ep["success"])
    assert iio.imread(video["path"]).shape == (41, 64, 64, 3)


def test_the_offline_runner_replays_the_evaluation(policy) -> None:
    """realtime=false latency_s=0: the runner's episodes (seed + i, noise of (seed, i, c)) are evaluate's."""
    result = evaluate(policy, lambda: sim.make("push_t", **SHORT), SEEDS[:2])
    report = Runner(policy, lambda: sim.make("push_t", **SHORT), mode="sync", realtime=False, latency_s=0.0,
                    status=False).run(episodes=2, seed=SEEDS[0])
    got = [(e["seed"], round(e["return"], 4), e["steps"], e["success"]) for e in report["per_episode"]]
    assert got == [(r["seed"], r["return"], r["length"], r["success"]) for r in result["per_episode"]]


def test_write_video_pads_and_reads_back(tmp_path: Path) -> None:
    import imageio.v3 as iio

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8) for _ in range(12)]
    path = write_video(frames, tmp_path / "sub" / "noise.mp4", fps=10)
    back = iio.imread(path)
    assert back.shape == (12, 64, 80, 3)  # padded up to multiples of 16
    with pytest.raises(ValueError, match="no frames"):
        write_video([], tmp_path / "empty.mp4")


def test_record_episode_with_a_scripted_expert(tmp_path: Path) -> None:
    import imageio.v3 as iio

    env = sim.make("lift", render_size=64)
    try:
        result = record_episode(env, sim.make_expert("lift"), tmp_path / "lift.mp4", seed=0)
        assert result["success"] and result["frames"] == result["steps"] + 1
        back = iio.imread(result["path"])
        assert back.shape == (result["steps"] + 1, 64, 64, 3)
        assert np.abs(back[0].astype(int) - back[-1].astype(int)).mean() > 1  # the scene changed
    finally:
        env.close()
