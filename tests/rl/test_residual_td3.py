"""Off-policy residual RL (finetune.learner=td3): the tanh-bounded residual, its n-step transitions and TD3 itself,
on real torch steps and the tiny ReachEnv task of tests/rl/toys.py (a base that misses the goal by a constant)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.policies import load_policy
from robolearn.rl.residual import ResidualPPO
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.residual_td3 import ResidualTD3
from robolearn.rl.settings import ResidualSettings
from sim.vector import make_vector_env
from toys import EPISODE, OFFSET, ReachEnv, reach_evaluator, toy_base



def td3_settings(**kw) -> ResidualSettings:
    defaults = dict(learner="td3", gamma=0.9, action_scale=0.3, obs_norm="base", learning_starts=256, utd=0.25,
                    batch_size=64, actor_lr=1e-3, q_lr=1e-3, buffer_size=10_000, critic_warmup=100)
    return ResidualSettings(**{**defaults, **kw})


def collect(tmp_path: Path, steps: int, *, terminate: bool, bootstrap: bool, n_step: int = 3) -> ResidualTD3:
    """One ReachEnv environment, ``steps`` steps of the zero residual without exploration noise (every step's
    reward is the base's constant -|OFFSET|^2), no learning."""
    s = td3_settings(n_step=n_step, expl_std=0.0, bootstrap_truncated=bootstrap, learning_starts=10**9)
    policy = ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(ReachEnv, num_envs=1, num_workers=0, terminate=terminate)
    td3 = ResidualTD3(policy, envs, s, total_env_steps=steps, run_dir=tmp_path / "run", progress=False)
    td3.start_episodes()
    try:
        for _ in range(steps):
            td3.step()
    finally:
        envs.close()
    return td3


@pytest.mark.parametrize("terminate,bootstrap,stored", [(True, True, EPISODE), (False, False, EPISODE),
                                                        (False, True, EPISODE - 3)])
def test_n_step_transitions_sum_rewards_discount_and_end_as_the_episode_ends(tmp_path, terminate, bootstrap, stored):
    td3 = collect(tmp_path, EPISODE, terminate=terminate, bootstrap=bootstrap)
    r, g = -float(np.sum(OFFSET ** 2)), 0.9
    rep = {k: v[:td3.replay.size] for k, v in td3.replay.data.items()}
    # a success (terminated) or a time limit valued as a failure completes every step; a time limit to bootstrap
    # drops the last n (no base action was planned for the final observation)
    assert td3.replay.size == stored and td3.transitions == stored
    full = EPISODE - 3  # the steps whose three-step window fits inside the episode
    np.testing.assert_allclose(rep["reward"][:full, 0], r * (1 + g + g * g), rtol=1e-5)
    np.testing.assert_allclose(rep["discount"][:full, 0], g ** 3, rtol=1e-5)
    # the next state is three steps on: the base's normalized action there, and (constant goal) the same observation
    inside = td3.replay.size - 3  # rows whose successor's row is stored too
    np.testing.assert_allclose(rep["next_base"][:inside], rep["base"][3:3 + inside], rtol=1e-6)
    np.testing.assert_allclose(rep["next_obs"][:full], rep["obs"][:full], rtol=1e-6)
    if stored == EPISODE:  # the tail: partial sums, then nothing to bootstrap
        np.testing.assert_allclose(rep["reward"][full:, 0], [r * (1 + g + g * g), r * (1 + g), r], rtol=1e-5)
        np.testing.assert_allclose(rep["discount"][full:, 0], 0.0)
    assert np.all(rep["res"] == 0.0)  # zero residual, no noise: what the environment ran was the base


def test_one_step_returns_are_plain_transitions(tmp_path):
    td3 = collect(tmp_path, 6, terminate=True, bootstrap=True, n_step=1)
    rep = {k: v[:td3.replay.size] for k, v in td3.replay.data.items()}
    assert td3.replay.size == 5  # the sixth step waits for the seventh's state
    np.testing.assert_allclose(rep["reward"][:, 0], -float(np.sum(OFFSET ** 2)), rtol=1e-5)
    np.testing.assert_allclose(rep["discount"][:, 0], 0.9, rtol=1e-6)


def toy_run(tmp_path: Path, total: int, *, policy=None, resume_from: Path | None = None, **kw):
    s = td3_settings(**kw)
    policy = policy if policy is not None else ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(ReachEnv, num_envs=8, num_workers=0)
    held_out = reach_evaluator()
    td3 = ResidualTD3(policy, envs, s, total_env_steps=total, run_dir=tmp_path / "run", evaluate=held_out,
                      eval_every=2048, ckpt_every=2048, progress=False, run_config={"task": "reach"})
    if resume_from is not None:
        td3.load_state(resume_from)
    try:
        return td3, td3.fit(resume=resume_from is not None), held_out
    finally:
        envs.close()


def test_td3_learns_the_correction_resumes_with_its_buffer_and_its_checkpoint_is_the_policy(tmp_path):
    first, out, _ = toy_run(tmp_path, 2048)
    size, grad_steps = first.replay.size, first.grad_steps
    ckpt = Path(out["checkpoint"])
    assert (ckpt / "replay.npz").is_file()
    second, out2, held_out = toy_run(tmp_path, 4096, policy=load_policy(ckpt), resume_from=ckpt)
    assert out2["env_steps"] == 4096 and second.replay.size > size
    assert out2["grad_steps"] == pytest.approx(0.25 * (4096 - 256), abs=8) and out2["grad_steps"] > grad_steps
    assert out2["success_rate_before"] == out["success_rate_before"]
    step = next(iter(second.q_opt.state_dict()["state"].values()))["step"]
    assert float(step) == out2["grad_steps"]  # the critic's Adam continued, not restarted
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    base_return = -EPISODE * float(np.sum(OFFSET ** 2))
    assert evals[0] == pytest.approx(base_return, abs=1e-4)  # tanh(0) = 0: the untrained residual is the base
    assert evals[-1] > evals[0] + 0.5 * abs(evals[0]), evals  # at least half of the gap to the optimum closed
    loaded = load_policy(out2["checkpoint"])
    assert isinstance(loaded, ResidualPolicy) and loaded.squash
    assert held_out(loaded, 0)["mean_return"] == pytest.approx(evals[-1], abs=1e-6)
    # the correction is bounded by action_scale, whatever the actor's raw output
    with torch.no_grad():
        loaded.actor.mean[-1].bias.fill_(50.0)
    goal = np.zeros((1, 2), np.float32)
    moved = loaded.correct_actions({"goal": goal}, goal + OFFSET) - (goal + OFFSET)
    np.testing.assert_allclose(moved, 0.3 * 2.0, rtol=1e-4)  # +action_scale in [-1, 1] units = 0.6 raw ([-2, 2])
    # a PPO trainer refuses the bounded residual, and TD3 a PPO run's unbounded one, naming the learner
    envs = make_vector_env(ReachEnv, num_envs=2, num_workers=0)
    try:
        with pytest.raises(ValueError, match="learner=td3"):
            ResidualPPO(load_policy(ckpt), envs, ResidualSettings(), total_env_steps=1, run_dir=tmp_path / "x")
        with pytest.raises(ValueError, match="squash=True"):
            ResidualTD3(ResidualPolicy(toy_base(tmp_path)), envs, td3_settings(), total_env_steps=1,
                        run_dir=tmp_path / "y")
    finally:
        envs.close()


def test_td3_settings_refuse_nonsense_naming_the_key():
    from robolearn.policies import ConfigError

    for bad, key in ((dict(learner="sac"), "finetune.learner"), (dict(n_step=0), "finetune.n_step"),
                     (dict(utd=0.0), "finetune.utd"), (dict(expl_std=-0.1), "finetune.expl_std"),
                     (dict(tau=2.0), "finetune.tau"), (dict(demos="x.zarr"), "finetune.demos")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ResidualSettings(**bad).check()
    assert ResidualSettings(learner="td3").policy_config()["squash"] is True
    assert ResidualSettings().policy_config()["squash"] is False


def test_td3_exploration_is_clipped_correlated_noise_around_the_mean(tmp_path):
    from robolearn.rl.residual_td3 import ExploringCorrector

    policy = ResidualPolicy(toy_base(tmp_path), obs_norm="base", squash=True)
    goal = np.zeros((2, 2), np.float32)

    def draws(corr: float) -> np.ndarray:
        c = ExploringCorrector(policy, 0.3, torch.Generator().manual_seed(0), 2, corr)
        out = []
        for t in range(1200):
            if t == 600:
                c.restart(1)
            c({"goal": goal}, goal + OFFSET, np.arange(2))
            out.append(c.last["res"].copy())
        return np.stack(out)  # (steps, envs, action_dim): the zero mean plus noise

    white, red = draws(0.0), draws(0.9)
    lag1 = lambda x: np.mean([np.corrcoef(x[:-1, i, j], x[1:, i, j])[0, 1] for i in range(2) for j in range(2)])
    assert abs(lag1(white)) < 0.06 and lag1(red) == pytest.approx(0.9, abs=0.04)
    assert np.allclose(red.std(axis=0), 0.3, atol=0.06) and np.abs(red).max() <= 1.0
    np.testing.assert_allclose(red[600, 1], white[600, 1], rtol=1e-5)  # a restarted environment draws afresh


def demo_store(path: Path, episodes: int = 3, *, with_reward: bool = True, failures: int = 0,
               dense: bool = False) -> Path:
    """ReachEnv demonstrations that act perfectly (action = goal): the base misses them by OFFSET. ``failures``
    more episodes never rewarded; ``dense``: a shaped reward instead of the 0/1 success."""
    from robolearn.data.schema import KeySpec
    from robolearn.data.store import EpisodeStore

    schema = {"goal": KeySpec((2,), "float32", "obs"), "action": KeySpec((2,), "float32", "action")}
    if with_reward:
        schema["reward"] = KeySpec((), "float32", "reward")
    store = EpisodeStore.create(path, schema, fps=10, task="reach")
    rng = np.random.default_rng(0)
    for n in range(episodes + failures):
        goal = np.repeat(rng.uniform(-1, 1, (1, 2)).astype(np.float32), EPISODE, axis=0)
        ep = {"goal": goal, "action": goal.copy()}
        if with_reward:
            ep["reward"] = np.zeros(EPISODE, np.float32)
            if n < episodes:
                ep["reward"][10:] = 1.0  # "success" at step 10 (scripted collection keeps a few steps past it)
            if dense:
                ep["reward"] += 0.01 * np.arange(EPISODE, dtype=np.float32)
        store.append_episode(ep)
    store.close()
    return path


def test_demonstrations_become_residual_transitions_through_the_base(tmp_path):
    s = td3_settings(demos=str(demo_store(tmp_path / "demos.zarr", failures=1)), n_step=3)
    policy = ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(ReachEnv, num_envs=2, num_workers=0)
    try:
        td3 = ResidualTD3(policy, envs, s, total_env_steps=1, run_dir=tmp_path / "run", progress=False)
        demo = {k: v[:td3.demo.size] for k, v in td3.demo.data.items()}
        assert td3.demo.size == 3 * 11  # each episode ends at its first rewarded step (index 10)
        # the residual that turns the base's goal + OFFSET into the demo's goal: -OFFSET in normalized units
        # (action range [-2, 2]) over action_scale 0.3
        np.testing.assert_allclose(demo["res"], np.tile(-OFFSET / 2.0 / 0.3, (33, 1)), rtol=1e-5)
        np.testing.assert_allclose(demo["reward"][10::11, 0], 1.0)  # the last step of each: the success
        np.testing.assert_allclose(demo["discount"][10::11, 0], 0.0)
        np.testing.assert_allclose(demo["reward"][8, 0], 0.9 ** 2, rtol=1e-6)  # two steps before it: discounted success
        assert demo["reward"][7, 0] == 0.0  # three steps before: outside its n = 3 window (bootstrapped instead)
        assert td3.demo_stats["demo_clipped_share"] == 0.0
        assert td3.demo_stats["demo_episodes"] == 3 and td3.demo_stats["demo_episodes_left_out"] == 1  # the failure
        batch = td3._sample()  # half of every minibatch from the demonstrations (the online buffer is empty)
        assert batch["res"].shape[0] == s.batch_size // 2
        with pytest.raises(ValueError, match=r"finetune.demos: .*demos_noreward.zarr has no \['reward'\]"):
            ResidualTD3(policy, envs, td3_settings(demos=str(demo_store(tmp_path / "demos_noreward.zarr",
                                                                          with_reward=False))),
                        total_env_steps=1, run_dir=tmp_path / "run2", progress=False)
        with pytest.raises(ValueError, match="rewards other than 0 and 1 .*env.reward_type=sparse"):
            ResidualTD3(policy, envs, td3_settings(demos=str(demo_store(tmp_path / "dense.zarr", dense=True))),
                        total_env_steps=1, run_dir=tmp_path / "run3", progress=False)
    finally:
        envs.close()
