"""Latent-noise steering (DSRL): the steered policy kind, its noise-space environment and SAC / noise aliasing, on
real torch steps; the bases are the tiny push_t checkpoints of tests/fixtures (a DDIM diffusion and a flow policy)
and a fixed chunk policy whose chunk moves with its noise (tests/rl/toys.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.policies import ConfigError, load_policy, save_policy
from robolearn.rl.settings import PLAIN_SAC_STEER, SteerSettings
from robolearn.rl.steer import SteeringSAC
from robolearn.rl.steer_policy import SteeredPolicy, check_deterministic
from sim.vector import make_vector_env
from toys import EPISODE, NOISE_GAIN, NoiseBase, OFFSET, ReachEnv, fixture_base, reach_evaluator


def pin_noise(policy: SteeredPolicy, w0: torch.Tensor) -> None:
    """Make the actor's deterministic choice ``w0`` whatever the observation (head weights 0, bias atanh)."""
    head = policy.actor.net[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias[:policy.noise_dim] = torch.atanh(w0.flatten() / policy.max_noise)


@pytest.mark.parametrize("name", ["v1_push_t_diffusion_unet", "v1_push_t_flow_transformer"])
def test_a_pinned_noise_runs_the_bases_own_deterministic_chunk(tmp_path, name):
    base = fixture_base(tmp_path, name)
    policy = SteeredPolicy(base)
    w0 = torch.randn(policy.noise_dims, generator=torch.Generator().manual_seed(0)).clamp(-1.4, 1.4)
    pin_noise(policy, w0)
    obs = {k: torch.rand(3, base.n_obs_steps, *s, generator=torch.Generator().manual_seed(1))
           for k, s in base.obs_shapes.items()}
    want = base.predict_action(obs, w0.expand(3, *policy.noise_dims).contiguous())
    other = torch.randn(policy.noise_shape(3))
    torch.testing.assert_close(policy.predict_action(obs, other), want, rtol=0, atol=1e-5)  # its noise is ignored
    assert not torch.allclose(base.predict_action(obs, other), want, atol=1e-3)  # the noise matters to the base


def test_a_sampling_steered_policy_draws_on_the_callers_noise_and_keeps_that_choice_in_its_checkpoint(tmp_path):
    base = fixture_base(tmp_path, "v1_push_t_flow_transformer")
    policy = SteeredPolicy(base, act="sample")
    obs = {k: torch.rand(3, base.n_obs_steps, *s, generator=torch.Generator().manual_seed(1))
           for k, s in base.obs_shapes.items()}
    eps = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        w, _ = policy.actor.sample(policy.obs_features(policy.newest_frame(obs)), eps.reshape(3, -1))
    chunk = policy.predict_action(obs, eps)
    torch.testing.assert_close(chunk, base.predict_action(obs, w.reshape(eps.shape)), rtol=0, atol=1e-5)
    assert not torch.allclose(policy.predict_action(obs, -eps), chunk, atol=1e-3)  # the draw follows the noise
    mean = SteeredPolicy(base)  # the deterministic choice ignores it
    torch.testing.assert_close(mean.predict_action(obs, eps), mean.predict_action(obs, -eps))
    save_policy(policy, tmp_path / "steered")
    loaded = load_policy(tmp_path / "steered")
    assert loaded.act == "sample"
    torch.testing.assert_close(loaded.predict_action(obs, eps), chunk, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="act must be 'mean' or 'sample', got 'mode'"):
        SteeredPolicy(base, act="mode")


def test_deploy_ranking_runs_the_candidate_its_action_critic_values_most(tmp_path):
    base = fixture_base(tmp_path, "v1_push_t_flow_transformer")
    policy = SteeredPolicy(base, critic_hidden=[32], rank=4)
    obs = {k: torch.rand(3, base.n_obs_steps, *s, generator=torch.Generator().manual_seed(1))
           for k, s in base.obs_shapes.items()}
    eps = torch.randn(policy.noise_shape(3), generator=torch.Generator().manual_seed(2))
    chunk = policy.predict_action(obs, eps)
    w = policy.choose_noise(obs, eps)
    again, scores, pick, cand = policy.ranked(obs, w, eps)
    torch.testing.assert_close(again, chunk, rtol=0, atol=0)  # the extra draws follow the caller's noise
    torch.testing.assert_close(cand[0], w)  # the actor's own choice is candidate 0
    assert scores.shape == (4, 3) and cand.shape == (4, 3, policy.noise_dim)
    feats = policy.obs_features(policy.newest_frame(obs))
    with torch.no_grad():
        for i in range(3):  # each row on its own: every candidate's chunk, scored by the critic, the best one run
            row = {k: v[i:i + 1] for k, v in obs.items()}
            chunks = [base.predict_action(row, c[i].reshape(1, *policy.noise_dims)) for c in cand]
            q = torch.stack([policy.q_a(feats[i:i + 1], policy.critic_action(c)).min(0).values[0] for c in chunks])
            torch.testing.assert_close(q, scores[:, i], rtol=1e-4, atol=1e-5)
            assert int(q.argmax()) == int(pick[i])
            torch.testing.assert_close(chunk[i:i + 1], chunks[int(pick[i])], rtol=1e-4, atol=1e-5)
    alone = policy.predict_action({k: v[1:2] for k, v in obs.items()}, eps[1:2])  # a row's draws are its own
    torch.testing.assert_close(alone, chunk[1:2], rtol=1e-4, atol=1e-5)
    other = policy.predict_action(obs, -eps)  # other caller noise: other draws
    assert not torch.allclose(other, chunk, atol=1e-3)
    policy.set_rank(1)  # the actor's choice alone
    torch.testing.assert_close(policy.predict_action(obs, eps), base.predict_action(obs, w.reshape(eps.shape)),
                               rtol=0, atol=1e-5)
    policy.set_rank(4)
    save_policy(policy, tmp_path / "ranked")
    loaded = load_policy(tmp_path / "ranked")  # the critic and the rank travel in the checkpoint
    assert loaded.rank == 4 and loaded.wrapper_config()["critic_hidden"] == [32]
    torch.testing.assert_close(loaded.predict_action(obs, eps), chunk, rtol=0, atol=1e-5)


def test_ranking_without_an_action_critic_is_refused_naming_the_variant(tmp_path):
    base = fixture_base(tmp_path, "v1_push_t_flow_transformer")
    with pytest.raises(ValueError, match=r"rank=2 ranks noise draws by the steering run's action critic.*"
                                         r"finetune.variant=na"):
        SteeredPolicy(base, rank=2)
    policy = SteeredPolicy(base, critic_hidden=[16])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got"):
            policy.set_rank(bad)
    assert policy.rank == 1


def test_a_stochastic_sampler_is_refused_naming_the_deterministic_one(tmp_path):
    base = fixture_base(tmp_path, "v1_push_t_diffusion_unet")
    base.set_sampler("ddpm")
    with pytest.raises(ValueError, match=r"draws fresh noise at every denoising step.*use sampler 'ddim' "
                                         r"\(finetune.base_sampler=ddim\)"):
        check_deterministic(base)
    policy = SteeredPolicy(base, sampler="ddim", steps=5)  # steered under DDIM: accepted, and saved so
    assert policy.sampler_config == {"kind": "ddim", "steps": 5}
    assert policy.wrapper_config()["sampler"] == "ddim"


def toy_run(tmp_path: Path, total: int, **settings):
    save_policy(NoiseBase(), tmp_path / "base")
    # plain SAC, the defaults until 2026-12-05, which these toy tests were written for
    s = SteerSettings(**{**PLAIN_SAC_STEER, **dict(learning_starts=200, gamma=0.9, batch_size=64, utd=0.5), **settings})
    policy = SteeredPolicy(load_policy(tmp_path / "base"), **s.policy_config())
    envs = make_vector_env(ReachEnv, num_envs=8, num_workers=0)
    held_out = reach_evaluator()

    sac = SteeringSAC(policy, envs, s, total_env_steps=total, run_dir=tmp_path / "run", evaluate=held_out,
                      eval_every=total // 2, progress=False, run_config={"task": "reach"})
    try:
        return sac, sac.fit(log_every=256)
    finally:
        envs.close()


def test_the_noise_space_environment_records_each_chunk_as_one_transition(tmp_path):
    gamma = 0.9
    sac, out = toy_run(tmp_path, 256, learning_starts=10_000, gamma=gamma)  # all w ~ N(0, I): no learning yet
    r = {k: v[:sac.replay.size] for k, v in sac.replay.data.items()}
    assert sac.replay.size == out["transitions"] == 256 // 2 and out["grad_steps"] == 0  # 2-step chunks
    goal = r["obs"]  # the base's min-max over [-1, 1] leaves the goal as it is
    w = r["w"].reshape(-1, 4, 2)
    raw = goal[:, None] + OFFSET + NOISE_GAIN * w[:, :2]  # the executable part: n_obs 1, 2 actions
    np.testing.assert_allclose(r["act"], (raw / 2.0).reshape(-1, 4), atol=1e-6)  # normalized ([-2, 2] -> [-1, 1])
    step_rewards = -((raw - goal[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(r["reward"][:, 0], step_rewards[:, 0] + gamma * step_rewards[:, 1], rtol=1e-5)
    np.testing.assert_allclose(r["discount"][:, 0], gamma ** 2, rtol=1e-6)
    assert not r["done"].any()  # time limits are bootstrapped, not failures
    np.testing.assert_allclose(r["next_obs"], goal)  # the goal stays put within an episode
    assert np.abs(r["w"]).max() <= 1.5 and r["w"].std() > 0.5  # the base's own N(0, I), clipped to the bound


def test_action_steps_sets_how_many_actions_each_noise_runs_and_is_kept_in_the_checkpoint(tmp_path):
    gamma = 0.9
    sac, out = toy_run(tmp_path, 256, learning_starts=10_000, gamma=gamma, action_steps=1)  # the base's own: 2
    r = {k: v[:sac.replay.size] for k, v in sac.replay.data.items()}
    assert sac.replay.size == out["transitions"] == 256  # one action per noise: a transition per step
    raw = r["obs"][:, None] + OFFSET + NOISE_GAIN * r["w"].reshape(-1, 4, 2)[:, :1]
    np.testing.assert_allclose(r["act"], (raw / 2.0).reshape(-1, 2), atol=1e-6)  # only the first action ran
    np.testing.assert_allclose(r["discount"][:, 0], gamma, rtol=1e-6)
    save_policy(sac.policy, tmp_path / "steered")
    loaded = load_policy(tmp_path / "steered")
    assert loaded.n_action_steps == 1 and loaded.base.n_action_steps == 2
    with pytest.raises(ValueError, match=r"action_steps=5 does not fit the base's chunks: n_action_steps must be in "
                                         r"\[1, 4\]"):
        SteeredPolicy(loaded.base, action_steps=5)
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match=r"finetune\.action_steps must be an integer >= 1 or null"):
            SteerSettings(action_steps=bad).check()


def test_sac_learns_the_noise_that_cancels_the_offset(tmp_path):
    sac, out = toy_run(tmp_path, 2048)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    zero_noise = -EPISODE * float(np.sum(OFFSET ** 2))  # the base on w = 0
    assert evals[-1] > 0.5 * zero_noise, evals  # more than half of the offset cancelled by the chosen noise
    assert evals[-1] > evals[0] + 1.0
    assert out["grad_steps"] == (out["transitions"] - 200) // 2 and out["env_steps"] == 2048
    loaded = load_policy(out["checkpoint"])
    assert isinstance(loaded, SteeredPolicy) and loaded.policy_type == "steered"
    goal = {"goal": torch.tensor([[[0.3, -0.5]]])}
    torch.testing.assert_close(loaded.predict_action(goal), sac.policy.predict_action(goal))
    assert (tmp_path / "run" / "plots" / "success.png").stat().st_size > 1000


def test_noise_aliasing_distils_the_action_critic_into_the_noise_critic(tmp_path):
    sac, out = toy_run(tmp_path, 2048, variant="na", alias_samples=2)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distill = [r["distill_loss"] for r in records if r.get("distill_loss") is not None]
    assert len(distill) >= 5 and min(distill[-3:]) < 0.5 * max(distill[:3]), distill
    assert sac.alias is not None and sac.alias.size == 2 * out["transitions"]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    assert evals[-1] > 0.5 * -EPISODE * float(np.sum(OFFSET ** 2)), evals


def test_a_noise_aliasing_run_gives_a_policy_without_a_critic_one_and_refuses_mismatched_widths(tmp_path):
    save_policy(NoiseBase(), tmp_path / "base")
    s = SteerSettings(variant="na", learning_starts=200, batch_size=64, critic_hidden=[32, 32])
    old = SteeredPolicy(load_policy(tmp_path / "base"), **{**s.policy_config(), "critic_hidden": None})
    envs = make_vector_env(ReachEnv, num_envs=2, num_workers=0)
    try:  # a policy saved before it held the critic (resuming an older run): the trainer attaches one
        run = SteeringSAC(old, envs, s, total_env_steps=8, run_dir=tmp_path / "run", progress=False,
                          run_config={"task": "reach"})
        assert run.q_a is old.q_a and old.critic_hidden == [32, 32]
        old.set_rank(2)  # and the policy can now rank with it
        wide = SteeredPolicy(load_policy(tmp_path / "base"), **{**s.policy_config(), "critic_hidden": [64]})
        with pytest.raises(ValueError, match=r"action critic has widths \[64\], the settings' critic_hidden "
                                             r"\[32, 32\]"):
            SteeringSAC(wide, envs, s, total_env_steps=8, run_dir=tmp_path / "run2", progress=False,
                        run_config={"task": "reach"})
    finally:
        envs.close()


def test_steer_settings_refuse_nonsense_naming_the_key():
    for bad, key in ((dict(variant="ppo"), "finetune.variant"), (dict(max_noise=0.0), "finetune.max_noise"),
                     (dict(tau=2.0), "finetune.tau"), (dict(batch_size=0), "finetune.batch_size"),
                     (dict(variant="na", alias_samples=0), "finetune.alias_samples"),
                     (dict(critic_hidden=[]), "finetune.critic_hidden"), (dict(td_target="max"), "finetune.td_target"),
                     (dict(act="mode"), "finetune.act"), (dict(variant="na", rank=0), "finetune.rank"),
                     (dict(variant="sac", rank=4), "finetune.rank")):  # rank > 1 needs variant=na's action critic
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            SteerSettings(**bad).check()


def test_the_noise_actor_log_probability_matches_a_change_of_variables():
    from robolearn.rl.steer_policy import NoiseActor

    torch.manual_seed(0)
    actor = NoiseActor(3, 2, [8], max_noise=1.5)
    obs, eps = torch.randn(5, 3), torch.randn(5, 2)
    w, logp = actor.sample(obs, eps)
    mean, log_std = actor.params(obs)
    u = torch.atanh(w / 1.5)
    density = torch.exp(-0.5 * ((u - mean) / log_std.exp()) ** 2) / (log_std.exp() * math.sqrt(2 * math.pi))
    jac = 1.5 * (1 - torch.tanh(u) ** 2)
    torch.testing.assert_close(logp, torch.log(density / jac).sum(-1), rtol=1e-4, atol=1e-4)
    assert w.abs().max() < 1.5


def test_behavior_targets_bootstrap_at_the_decision_the_run_took_next(tmp_path):
    sac, out = toy_run(tmp_path, 256, learning_starts=10_000, td_target="behavior")
    r = {k: v[:sac.replay.size] for k, v in sac.replay.data.items()}
    following = {(tuple(np.round(o, 6)), tuple(np.round(w, 6))) for o, w in zip(r["obs"], r["w"])}
    linked = r["has_next"][:, 0] == 1
    assert linked.sum() >= 100 and not r["done"][linked].any()
    for nxt, w in zip(r["next_obs"][linked], r["next_w"][linked]):  # that decision is itself in the buffer
        assert (tuple(np.round(nxt, 6)), tuple(np.round(w, 6))) in following
    # episode ends have no next decision: bootstrapped at the actor (time limit) with has_next 0
    assert (~linked).sum() == 256 // EPISODE and np.all(r["next_w"][~linked] == 0)


def test_sac_with_behavior_targets_still_learns_the_toy(tmp_path):
    _, out = toy_run(tmp_path, 2048, td_target="behavior", utd=1.0)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    assert evals[-1] > 0.5 * -EPISODE * float(np.sum(OFFSET ** 2)), evals


def test_monte_carlo_targets_hold_each_episodes_discounted_return_with_the_reward_offset(tmp_path):
    gamma, offset = 0.9, 1.0
    sac, out = toy_run(tmp_path, 256, learning_starts=10_000, gamma=gamma, td_target="mc", reward_offset=offset,
                       bootstrap_truncated=False)
    r = {k: v[:sac.replay.size] for k, v in sac.replay.data.items()}
    assert sac.replay.size == 256 // 2  # every episode ended within the run: all its chunks were stored
    goal, w = r["obs"], r["w"].reshape(-1, 4, 2)
    raw = goal[:, None] + OFFSET + NOISE_GAIN * w[:, :2]
    step = -((raw - goal[:, None]) ** 2).sum(-1) - offset  # each step's reward less the offset
    chunks = EPISODE // 2  # an episode's chunks enter the buffer together, in order
    want = (step[:, 0] + gamma * step[:, 1]).reshape(-1, chunks)
    want[:, -1] -= gamma ** 2 * offset / (1 - gamma)  # a time-limit end is a failure: the offset paid forever after
    np.testing.assert_allclose(r["reward"][:, 0], want.reshape(-1), rtol=1e-5)
    # the return runs backwards through the episode's chunks, 0 after its end
    ret, rew, disc = (r[k][:, 0].reshape(-1, chunks) for k in ("ret", "reward", "discount"))
    np.testing.assert_allclose(ret[:, -1], rew[:, -1], rtol=1e-5)
    np.testing.assert_allclose(ret[:, :-1], rew[:, :-1] + disc[:, :-1] * ret[:, 1:], rtol=1e-5)
    assert ret.max() <= -offset / (1 - gamma) + 1e-4  # a timed-out episode is worth no more than never succeeding


def test_sac_on_monte_carlo_returns_learns_the_toy(tmp_path):
    _, out = toy_run(tmp_path, 2048, td_target="mc", utd=1.0)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    zero_noise = -EPISODE * float(np.sum(OFFSET ** 2))  # the base on w = 0
    assert evals[-1] > zero_noise and evals[-1] > evals[0] + 5.0, evals  # noisier targets than TD: a looser bar
