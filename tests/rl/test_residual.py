"""Residual RL (ResiP): the residual policy kind and its PPO, on real torch steps and real gymnasium/MuJoCo
environments; the base policies are the tiny push_t checkpoints of tests/fixtures and a fixed chunk policy that
misses a tiny task's reward by a constant (tests/rl/toys.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.policies import ChunkExecutor, load_policy, save_policy
from robolearn.rl.residual import Critic, ResidualPPO, RolloutCorrector, Rollout, gae
from robolearn.rl.residual_policy import ResidualPolicy
from robolearn.rl.settings import ResidualSettings
from robolearn.training.trainer import switch_latest
from sim.vector import make_vector_env
from toys import EPISODE, OFFSET, OffsetBase, ReachEnv, fixture_base, reach_evaluator, toy_base



def drive(policy, steps: int, seed: int = 3) -> np.ndarray:
    """Actions of ``steps`` executor steps in two push_t environments (batched inference, as fine-tuning runs)."""
    envs = make_vector_env("push_t", num_envs=2, num_workers=0, seed=seed)
    try:
        executor = ChunkExecutor(policy, 2, seed=seed)
        obs, _ = envs.reset(seed=seed)
        executor.reset(obs)
        out = []
        with torch.no_grad():
            for _ in range(steps):
                actions = executor.act()
                out.append(actions)
                obs, _, term, trunc, _ = envs.step(actions)
                for i in range(2):
                    row = {k: v[i] for k, v in obs.items()}
                    executor.reset_env(i, row) if term[i] or trunc[i] else executor.observe_env(i, row)
        return np.stack(out)
    finally:
        envs.close()


@pytest.mark.parametrize("name", ["v1_push_t_flow_transformer", "v1_push_t_diffusion_unet"])
def test_zero_initialised_residual_reproduces_the_base_exactly(tmp_path, name):
    base = fixture_base(tmp_path, name)
    want = drive(base, 20)
    residual = ResidualPolicy(base)
    assert ChunkExecutor(residual, 2).corrector == residual.correct_actions  # the executor's per-step hook
    got = drive(residual, 20)
    assert np.array_equal(got, want)  # bit for bit, through the executor's corrector hook
    assert not np.array_equal(want[0], want[1])  # (the comparison is not between constant actions)


def test_residual_moves_actions_in_normalized_action_space(tmp_path):
    residual = ResidualPolicy(toy_base(tmp_path), action_scale=0.1)
    with torch.no_grad():
        residual.actor.mean[-1].bias.copy_(torch.tensor([1.0, -0.5]))
    obs = {"goal": np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32)}
    base = obs["goal"] + OFFSET
    got = residual.correct_actions(obs, base, np.arange(2))
    # action normalizer maps [-2, 2] to [-1, 1]: 0.1 x (1, -0.5) normalized is (0.2, -0.1) raw
    np.testing.assert_allclose(got - base, np.tile([0.2, -0.1], (2, 1)), atol=1e-6)


def test_chunk_clients_get_only_the_current_action_corrected(tmp_path):
    base = fixture_base(tmp_path, "v1_push_t_flow_transformer")
    residual = ResidualPolicy(base)
    with torch.no_grad():
        residual.actor.mean[-1].bias.fill_(2.0)
    view = residual.for_chunk_clients()
    assert not hasattr(view, "correct_actions")  # an executor driving the view executes its chunks as sent
    obs = {k: torch.randn(1, base.n_obs_steps, *s) for k, s in base.obs_shapes.items()}
    noise = torch.randn(base.noise_shape(1))
    plain = base.predict_action(obs, noise).numpy()
    assert np.array_equal(residual.predict_action(obs, noise).numpy(), plain)  # the executor's path: base chunks
    served = view.predict_action(obs, noise).numpy()
    now = base.n_obs_steps - 1
    newest = {k: v[:, -1].numpy() for k, v in obs.items()}
    np.testing.assert_array_equal(np.delete(served, now, axis=1), np.delete(plain, now, axis=1))
    np.testing.assert_allclose(served[:, now], residual.correct_actions(newest, plain[:, now]), rtol=0, atol=0)
    assert not np.allclose(served[:, now], plain[:, now])


def test_gae_by_hand():
    buf = Rollout(3, 1, 1, 1, torch.device("cpu"))
    buf.reward[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    buf.value[:, 0] = torch.tensor([0.5, 0.25, 0.125])
    buf.done[:, 0] = torch.tensor([0.0, 1.0, 0.0])  # the episode ends with step 1's action
    adv, ret = gae(buf, torch.tensor([4.0]), gamma=0.5, lam=0.5)
    d2 = 3.0 + 0.5 * 4.0 - 0.125
    d1 = 2.0 - 0.25  # nothing after an episode's end
    d0 = 1.0 + 0.5 * 0.25 - 0.5
    want = torch.tensor([d0 + 0.25 * d1, d1, d2])
    torch.testing.assert_close(adv[:, 0], want)
    torch.testing.assert_close(ret, adv + buf.value)


@pytest.mark.parametrize("terminate,bootstrap", [(False, True), (True, True), (False, False)])
def test_truncated_episodes_bootstrap_from_their_last_observation_terminated_ones_do_not(tmp_path, terminate,
                                                                                          bootstrap):
    policy = ResidualPolicy(toy_base(tmp_path))
    envs = make_vector_env(ReachEnv, num_envs=2, num_workers=0, reward_scale=0.0, terminate=terminate)
    s = ResidualSettings(rollout_steps=EPISODE + 4, gamma=0.9, bootstrap_truncated=bootstrap)
    ppo = ResidualPPO(policy, envs, s, total_env_steps=1, run_dir=tmp_path / "run", progress=False)
    with torch.no_grad():  # a critic that values every observation at 1.0
        ppo.critic.net[-1].weight.zero_()
        ppo.critic.net[-1].bias.fill_(1.0)
    ppo.start_episodes()
    buf, last_value, stats = ppo.collect()
    envs.close()
    ends = buf.done[:, 0].nonzero().flatten().tolist()
    assert ends == [EPISODE - 1] and stats["episodes"] == 2
    expected = torch.zeros(s.rollout_steps)
    expected[EPISODE - 1] = 0.9 if bootstrap and not terminate else 0.0  # gamma x V(final_obs): time limit only
    torch.testing.assert_close(buf.reward[:, 0], expected)
    torch.testing.assert_close(last_value, torch.ones(2))


def toy_run(tmp_path: Path, total: int, *, policy=None, resume_from: Path | None = None, evaluate=None,
            eval_seed: int = 0, no_eval: bool = False, **settings):
    defaults = dict(actor_lr=3e-3, rollout_steps=64, gamma=0.9)
    s = ResidualSettings(**{**defaults, **settings})
    policy = policy if policy is not None else ResidualPolicy(toy_base(tmp_path), **s.policy_config())
    envs = make_vector_env(ReachEnv, num_envs=8, num_workers=0)
    held_out = None if no_eval else reach_evaluator() if evaluate is None else evaluate

    ppo = ResidualPPO(policy, envs, s, total_env_steps=total, run_dir=tmp_path / "run", evaluate=held_out,
                      eval_every=2048, ckpt_every=2048, progress=False,
                      run_config={"task": "reach", "eval": {"seed": eval_seed, "episodes": 8}})
    if resume_from is not None:
        ppo.load_state(resume_from)
    try:
        return ppo, ppo.fit(resume=resume_from is not None), held_out
    finally:
        envs.close()


def test_ppo_learns_the_constant_correction_the_base_misses(tmp_path):
    ppo, out, held_out = toy_run(tmp_path, 4096)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_mean_return" in r]
    before, after = evals[0]["eval_mean_return"], evals[-1]["eval_mean_return"]
    base_return = -EPISODE * float(np.sum(OFFSET ** 2))
    assert before == pytest.approx(base_return, abs=1e-4)  # the zero residual is the base
    assert after > before + 0.5 * abs(before), (before, after)  # at least half of the gap to the optimum (0) closed
    assert out["env_steps"] == 4096 and out["updates"] == 8
    assert [r["env_steps"] for r in evals] == [0, 2048, 4096]
    # The checkpoint is the policy: loaded through the registry (its base checked), it evaluates the same.
    loaded = load_policy(out["checkpoint"])
    assert isinstance(loaded, ResidualPolicy) and loaded.base.checkpoint_path == str((tmp_path / "base").resolve())
    assert held_out(loaded, 0)["mean_return"] == pytest.approx(after, abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "best", "latest", "step_0000002048", "step_0000004096"]
    # checkpoints/best: the policy at the best in-run evaluation (success, then mean return), evaluating the same
    trained = [r for r in evals if r["env_steps"] > 0]
    top = max(trained, key=lambda r: (r["eval_success_rate"], r["eval_mean_return"]))
    assert (out["best_env_steps"], out["best_success_rate"]) == (top["env_steps"], top["eval_success_rate"])
    best = load_policy(out["best_checkpoint"])
    assert isinstance(best, ResidualPolicy) and not (Path(out["best_checkpoint"]) / "rl_state.pt").exists()
    assert held_out(best, 0)["mean_return"] == pytest.approx(top["eval_mean_return"], abs=1e-6)
    assert (tmp_path / "run" / "plots" / "success.png").stat().st_size > 1000
    assert list((tmp_path / "run" / "tb").iterdir())


def test_ppo_with_td_advantages_and_correlated_noise_still_learns_the_correction(tmp_path):
    """The two exploration/variance knobs beyond ResiP (finetune.actor_gae_lambda, finetune.noise_corr) keep PPO
    working on the toy task: the actor from one-step TD advantages, the critic from lambda-returns."""
    _, out, _ = toy_run(tmp_path, 4096, actor_gae_lambda=0.0, noise_corr=0.5)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_mean_return"] for r in records if "eval_mean_return" in r]
    assert evals[-1] > evals[0] + 0.5 * abs(evals[0]), evals


def test_resume_continues_counters_optimizers_and_rng(tmp_path):
    first, out, _ = toy_run(tmp_path, 2048)
    state = first.actor_opt.state_dict()
    ckpt = Path(out["checkpoint"])
    policy = load_policy(ckpt)
    second, out2, _ = toy_run(tmp_path, 4096, policy=policy, resume_from=ckpt)
    assert out2["env_steps"] == 4096 and out2["updates"] == 8
    assert out2["success_rate_before"] == out["success_rate_before"]
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updates = [r["env_steps"] for r in records if "update" in r]
    assert updates == list(range(512, 4097, 512))  # one record per update, none repeated
    # The optimizer continued (Adam's step count), not restarted.
    resumed_steps = next(iter(second.actor_opt.state_dict()["state"].values()))["step"]
    first_steps = next(iter(state["state"].values()))["step"]
    assert float(resumed_steps) > float(first_steps)
    assert out2["success_rate_after"] is not None


def test_best_checkpoint_outlives_a_resume_and_a_kill_before_the_next_checkpoint(tmp_path):
    """``checkpoints/best`` is its own record: a resumed run compares against the score in its ``extra.json`` --
    also when the run was killed after writing it and before the step checkpoint, and resumes from an earlier one."""
    scores = {2048: 0.5, 4096: 0.9}

    def scripted(policy, env_steps):  # success by step; the evaluation before training scores 0
        return {"success_rate": scores.get(env_steps, 0.0), "mean_return": 0.0}

    _, out, _ = toy_run(tmp_path, 4096, evaluate=scripted)
    assert (out["best_env_steps"], out["best_success_rate"]) == (4096, 0.9)
    root = tmp_path / "run" / "checkpoints"
    weights = (root / "best" / "model.safetensors").read_bytes()
    shutil.rmtree(root / "step_0000004096")  # as if killed after best was written, before step_4096 was
    switch_latest(root, "step_0000002048")
    scores[4096] = 0.3  # the resumed run does worse at 4096: the killed run's best stands
    _, out2, _ = toy_run(tmp_path, 4096, policy=load_policy(root / "latest"), resume_from=root / "latest",
                         evaluate=scripted)
    assert (out2["best_env_steps"], out2["best_success_rate"]) == (4096, 0.9)
    assert (root / "best" / "model.safetensors").read_bytes() == weights
    scores[6144] = 0.95  # a better evaluation replaces it
    _, out3, _ = toy_run(tmp_path, 6144, policy=load_policy(root / "latest"), resume_from=root / "latest",
                         evaluate=scripted)
    assert (out3["best_env_steps"], out3["best_success_rate"]) == (6144, 0.95)
    assert json.loads((root / "best" / "extra.json").read_text())["env_steps"] == 6144


def test_a_best_whose_score_is_unreadable_is_kept_aside_not_overwritten(tmp_path, capsys):
    """A resumed run that cannot read ``checkpoints/best/extra.json`` renames that folder ``best.unreadable``
    (weights untouched, the file named on stderr) and writes a new ``best`` at its next evaluation."""
    scores = {2048: 0.5, 4096: 0.2}

    def scripted(policy, env_steps):
        return {"success_rate": scores.get(env_steps, 0.0), "mean_return": 0.0}

    _, out, _ = toy_run(tmp_path, 2048, evaluate=scripted)
    root = tmp_path / "run" / "checkpoints"
    weights = (root / "best" / "model.safetensors").read_bytes()
    (root / "best" / "extra.json").write_text("{not json")  # a damaged score
    capsys.readouterr()
    _, out2, _ = toy_run(tmp_path, 4096, policy=load_policy(root / "latest"), resume_from=root / "latest",
                         evaluate=scripted)
    err = capsys.readouterr().err
    assert str(root / "best" / "extra.json") in err and "best.unreadable" in err
    assert (root / "best.unreadable" / "model.safetensors").read_bytes() == weights  # nothing lost
    assert (out2["best_env_steps"], out2["best_success_rate"]) == (4096, 0.2)  # the new best: the only comparable score
    assert json.loads((root / "best" / "extra.json").read_text())["env_steps"] == 4096
    (root / "best" / "extra.json").write_text("[]")  # damaged again: the next name is taken, not the first
    toy_run(tmp_path, 4096, policy=load_policy(root / "latest"), resume_from=root / "latest", evaluate=scripted)
    assert (root / "best.unreadable" / "model.safetensors").read_bytes() == weights
    assert (root / "best.unreadable.1" / "extra.json").read_text() == "[]"
    # Resumed with other evaluation seeds: the old best's score is not comparable, so it is set aside too
    best_weights = (root / "best" / "model.safetensors").read_bytes()
    assert json.loads((root / "best" / "extra.json").read_text())["eval_seed"] == 0
    capsys.readouterr()
    toy_run(tmp_path, 4096, policy=load_policy(root / "latest"), resume_from=root / "latest", evaluate=scripted,
            eval_seed=500)
    err = capsys.readouterr().err
    assert "eval_seed=0" in err and "eval_seed=500" in err and "best.other-eval" in err
    assert (root / "best.other-eval" / "model.safetensors").read_bytes() == best_weights
    assert json.loads((root / "best" / "extra.json").read_text())["eval_seed"] == 500


def test_a_resume_keeps_best_when_it_cannot_replace_it_and_compares_a_best_from_before_eval_keys(tmp_path, capsys):
    """A resume that never evaluates (no evaluator) leaves ``checkpoints/best`` as it was even when its evaluation
    seeds differ; a ``best`` written before ``eval_seed``/``eval_episodes`` were kept is compared as before."""
    scores = {2048: 0.5, 4096: 0.2}

    def scripted(policy, env_steps):
        return {"success_rate": scores.get(env_steps, 0.0), "mean_return": 0.0}

    toy_run(tmp_path, 2048, evaluate=scripted)
    root = tmp_path / "run" / "checkpoints"
    weights = (root / "best" / "model.safetensors").read_bytes()
    capsys.readouterr()
    _, out, _ = toy_run(tmp_path, 4096, policy=load_policy(root / "latest"), resume_from=root / "latest",
                        no_eval=True, eval_seed=500)
    assert "best." not in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("best")) == ["best"]
    assert (root / "best" / "model.safetensors").read_bytes() == weights
    assert out["best_checkpoint"] is None  # chosen on other seeds than this run's: not reported as its best
    extra = json.loads((root / "best" / "extra.json").read_text())
    for key in ("eval_seed", "eval_episodes"):  # as an older run wrote it
        del extra[key]
    (root / "best" / "extra.json").write_text(json.dumps(extra))
    scores[6144] = 0.3  # worse than the old best's 0.5: it stands, compared although it has no eval keys
    _, out2, _ = toy_run(tmp_path, 6144, policy=load_policy(root / "latest"), resume_from=root / "latest",
                         evaluate=scripted, eval_seed=500)
    assert (out2["best_env_steps"], out2["best_success_rate"]) == (2048, 0.5)
    assert (root / "best" / "model.safetensors").read_bytes() == weights
    # Killed between save_policy's two renames: the old best was left moved aside. It is put back and compared.
    (root / "best").rename(root / ".best.old-0123abcd")
    scores[8192] = 0.4
    _, out3, _ = toy_run(tmp_path, 8192, policy=load_policy(root / "latest"), resume_from=root / "latest",
                         evaluate=scripted, eval_seed=500)
    assert (out3["best_env_steps"], out3["best_success_rate"]) == (2048, 0.5)
    assert (root / "best" / "model.safetensors").read_bytes() == weights and not (root / ".best.old-0123abcd").exists()


def test_exploration_noise_is_ar1_with_the_set_correlation_and_restarts_fresh(tmp_path):
    policy = ResidualPolicy(toy_base(tmp_path), init_log_std=0.0, obs_norm="base")  # residual = mean 0 + 1 x noise
    obs, base = {"goal": np.zeros((3, 2), np.float32)}, np.zeros((3, 2), np.float32)

    def draws(corr: float, restart_at: int | None = None) -> np.ndarray:
        corrector = RolloutCorrector(policy, Critic(policy.obs_dim, [8]), torch.Generator().manual_seed(0), 3, corr)
        out = []
        for t in range(3000):
            if t == restart_at:
                corrector.restart(1)  # environment 1 begins a new episode
            corrector(obs, base, np.arange(3))
            out.append(corrector.last.residual.numpy().copy())
        return np.stack(out)  # (steps, envs, action_dim)

    xi, e = draws(0.0), draws(0.9, restart_at=1500)  # white noise: the fresh draws the AR(1) is built from
    lag1 = lambda x: np.mean([np.corrcoef(x[:-1, i, j], x[1:, i, j])[0, 1] for i in range(3) for j in range(2)])
    assert abs(lag1(xi)) < 0.05 and lag1(e) == pytest.approx(0.9, abs=0.03)
    assert np.allclose(e.std(axis=0), 1.0, atol=0.2)  # each step's noise keeps the actor's std
    np.testing.assert_allclose(e[0], xi[0])  # every episode's first step: fresh noise
    np.testing.assert_allclose(e[1], 0.9 * e[0] + np.sqrt(1 - 0.81) * xi[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e[1500, 1], xi[1500, 1])  # the restarted environment starts afresh ...
    np.testing.assert_allclose(e[1500, [0, 2]], 0.9 * e[1499, [0, 2]] + np.sqrt(0.19) * xi[1500, [0, 2]],
                               rtol=1e-5, atol=1e-6)  # ... the others carry on


def test_settings_refuse_nonsense_naming_the_key():
    from robolearn.policies import ConfigError

    for bad, key in ((dict(action_scale=0.0), "finetune.action_scale"), (dict(gamma=1.5), "finetune.gamma"),
                     (dict(minibatches=0), "finetune.minibatches"), (dict(target_kl=0.0), "finetune.target_kl"),
                     (dict(actor_hidden=[]), "finetune.actor_hidden"), (dict(noise_corr=1.0), "finetune.noise_corr"),
                     (dict(actor_gae_lambda=1.5), "finetune.actor_gae_lambda")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            ResidualSettings(**bad).check()
    with pytest.raises(ValueError, match="action_scale"):
        ResidualPolicy(OffsetBase(), action_scale=-1.0)


def test_running_observation_statistics_match_numpy_are_saved_and_frozen_outside_training(tmp_path):
    policy = ResidualPolicy(toy_base(tmp_path), obs_norm="running")
    rng = np.random.default_rng(0)
    batches = [rng.normal(0.3, 0.01, size=(n, 2)).astype(np.float32) for n in (5, 1, 17)]
    for b in batches:
        policy.obs_features({"goal": b}, update_stats=True)
    raw = torch.cat([policy.normalizer.normalize("goal", torch.as_tensor(b)) for b in batches]).double().numpy()
    np.testing.assert_allclose(policy.obs_mean.numpy(), raw.mean(0), rtol=1e-9)
    np.testing.assert_allclose(policy.obs_var.numpy(), raw.var(0), rtol=1e-6)
    assert float(policy.obs_count) == 23
    # A millimetre-scale spread becomes unit scale (what the min-max normalization alone would squash).
    feats = policy.obs_features({"goal": batches[2]})
    assert 0.5 < float(feats.std()) < 2.0
    # Evaluation (the per-step hook) reads the statistics but does not move them.
    policy.correct_actions({"goal": batches[0]}, batches[0] + OFFSET)
    assert float(policy.obs_count) == 23
    save_policy(policy, tmp_path / "res")
    loaded = load_policy(tmp_path / "res")
    assert loaded.obs_norm == "running" and float(loaded.obs_count) == 23
    torch.testing.assert_close(loaded.obs_features({"goal": batches[2]}), feats)
    with pytest.raises(ValueError, match="obs_norm"):
        ResidualPolicy(OffsetBase(), obs_norm="batch")
