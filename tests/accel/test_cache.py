"""Block-wise adaptive caching (robolearn.accel.cache): exactness of the all-updates schedule, the scheduler's
dynamic program, Bubbling Union, schedules through checkpoints, refusals; and the CLI (accel calibrate, bench
latency, eval cache=)."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from robolearn.accel.cache import (
    CacheError,
    CacheSchedule,
    CachedPolicy,
    all_steps,
    branch_keys,
    bubbling_union,
    caching_error,
    calibrate,
    dp_update_steps,
    next_ff,
    SEARCH_LIMIT,
    schedule_from_calibration,
    searched_schedule,
    shared_schedule,
    step_sensitivity,
    uniform_schedule,
    uniform_steps,
    warm_window,
)
from robolearn.accel import use_kernels
from robolearn.cli import main
from robolearn.policies import load_policy, make_policy, save_policy

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def s(d: int) -> dict[str, np.ndarray]:
    return {"min": -np.ones(d), "max": np.ones(d), "mean": np.zeros(d), "std": np.ones(d), "count": np.array(1.0)}


def transformer_policy(ptype: str = "diffusion", sampler: dict | None = None, seed: int = 0) -> Any:
    """A tiny transformer policy whose zero-initialized (adaLN-Zero) layers are randomized, so that its chunks
    depend on every branch."""
    torch.manual_seed(seed)
    cfg = {"type": ptype, "backbone": {"name": "transformer", "preset": "tiny"}, "obs": {"state": [5]},
           "action_dim": 2, "sampler": sampler or ({"kind": "ddim", "steps": 10} if ptype == "diffusion"
                                                    else {"kind": "euler", "steps": 8})}
    policy = make_policy(cfg, {"state": s(5), "action": s(2)}).eval()
    bb = policy.backbone
    for layer in (bb.out_proj, bb.time_mod, bb.final_mod):
        torch.nn.init.normal_(layer.weight, 0.0, 0.1)
    return policy


def obs(batch: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"state": torch.randn(batch, 2, 5, generator=torch.Generator().manual_seed(seed))}


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("ptype,sampler", [("diffusion", {"kind": "ddim", "steps": 10}),
                                           ("diffusion", {"kind": "ddpm", "steps": 20}),
                                           ("flow", {"kind": "midpoint", "steps": 4})])
@pytest.mark.parametrize("kernels", ["gemm", "onednn"])  # the models' code; the fused inference path
def test_every_step_an_update_equals_the_uncached_policy_exactly(ptype, sampler, kernels):
    policy = use_kernels(transformer_policy(ptype, sampler), kernels)
    o, noise = obs(), torch.randn(policy.noise_shape(3))
    plain = policy.predict_action(o, noise)
    total = 2 * sampler["steps"] if sampler["kind"] == "midpoint" else sampler["steps"]
    cached = CachedPolicy(policy, all_steps(branch_keys(policy.backbone), f"{sampler['kind']}-{sampler['steps']}",
                                            total))
    assert torch.equal(cached.predict_action(o, noise), plain)
    assert cached.denoiser.computed == cached.denoiser.calls == total * 6  # 2 blocks x 3 branches


def test_a_sparse_schedule_computes_only_its_update_steps_and_stays_close():
    policy = transformer_policy()
    o, noise = obs(), torch.randn(policy.noise_shape(3))
    plain = policy.predict_action(o, noise)
    sched = uniform_schedule(branch_keys(policy.backbone), "ddim-10", 10, updates=5)
    cached = CachedPolicy(policy, sched)
    out = cached.predict_action(o, noise)
    assert cached.denoiser.computed == 6 * 5 and cached.denoiser.calls == 6 * 10
    assert sched.compute_fraction == pytest.approx(0.5)
    rel = float((out - plain).norm() / plain.norm())
    assert 0.0 < rel < 0.5  # reuse changes the chunk, a little


def staggered_schedule(policy: Any, sampler: str, total: int, seed: int = 0) -> CacheSchedule:
    """Every branch at its own random update steps (step 0 always), as a BAC schedule staggers them."""
    rng = np.random.default_rng(seed)
    ups = {k: tuple(sorted({0, *rng.choice(np.arange(1, total), size=int(rng.integers(1, total // 2)),
                                           replace=False).tolist()}))
           for k in branch_keys(policy.backbone)}
    return CacheSchedule(updates=ups, sampler=sampler, total=total, method="bac")


@pytest.mark.parametrize("sampler", [{"kind": "ddim", "steps": 10}, {"kind": "ddpm", "steps": 20}])
def test_the_fused_cache_loop_computes_what_the_branch_by_branch_loop_computes(sampler):
    """The fused loop (2-D stream, outputs kept in one tensor, a run of skipped branches added as one sum)
    against the generic loop on the models' own code, for staggered per-branch schedules, a change of batch
    size between chunks, and the warm start's mid-schedule first call."""
    policy = transformer_policy(sampler=sampler)
    name, total = f"{sampler['kind']}-{sampler['steps']}", sampler["steps"]
    for seed in range(3):
        sched = staggered_schedule(policy, name, total, seed)
        fused = CachedPolicy(use_kernels(policy, "onednn"), sched)
        for batch in (3, 1):
            o, noise = obs(batch, seed), torch.randn(policy.noise_shape(batch))
            use_kernels(policy, "onednn")
            a = fused.predict_action(o, noise)
            assert fused.denoiser._store is not None and fused.denoiser._store.shape[1] == batch * 16
            use_kernels(policy, "gemm")
            generic = CachedPolicy(policy, sched)
            b = generic.predict_action(o, noise)
            assert generic.denoiser._store is None  # the models' code: the branch-by-branch loop ran
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert fused.denoiser.computed == generic.denoiser.computed < generic.denoiser.calls
            fused.denoiser.reset_counts()
            assert not torch.equal(a, policy.predict_action(o, noise))  # the schedule did skip work
        if sampler["kind"] == "ddim":
            use_kernels(policy, "onednn")
            o, noise = obs(2, seed), torch.randn(policy.noise_shape(2))
            prev = policy.predict_action(o, noise)
            fused.denoiser.reset_counts()
            a = fused.predict_action_warm(o, prev, 8, 4, noise)
            use_kernels(policy, "gemm")
            generic = CachedPolicy(policy, sched)
            b = generic.predict_action_warm(o, prev, 8, 4, noise)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert fused.denoiser.computed == generic.denoiser.computed >= 6  # the first call computes all 6


def test_warm_start_through_the_cache_equals_the_uncached_warm_start_with_every_step():
    policy = transformer_policy()
    o, noise = obs(2), torch.randn(policy.noise_shape(2))
    prev = policy.predict_action(o, noise)
    cached = CachedPolicy(policy, all_steps(branch_keys(policy.backbone), "ddim-10", 10))
    a = policy.predict_action_warm(o, prev, 8, 4, noise)
    b = cached.predict_action_warm(o, prev, 8, 4, noise)
    assert torch.equal(a, b)
    sparse = CachedPolicy(policy, uniform_schedule(branch_keys(policy.backbone), "ddim-10", 10, 2))  # 0 and 5
    sparse.predict_action_warm(o, prev, 8, 4, noise)  # steps 6..9 of 10: the first call computes everything
    assert sparse.denoiser.computed == 6 and sparse.denoiser.calls == 24


def test_a_warm_window_schedule_is_the_scheduler_on_the_last_steps_and_caches_only_the_warm_start():
    policy = transformer_policy()
    keys = branch_keys(policy.backbone)
    cal = calibrate(policy, [obs(8, 2)])
    sched = schedule_from_calibration(cal, "bac", 2, bubble=0, warm_steps=4)  # steps 6..9 of 10, 2 updates each
    for k in keys:  # the dynamic program on the window's own similarity matrix, shifted to its place
        window = dp_update_steps(cal.similarity[k][6:, 6:], 2)
        assert sched.updates[k] == (0, 1, 2, 3, 4, 5, *(6 + s for s in window)), k
    assert sched.info["warm_steps"] == 4 and sched.info["warm_compute_fraction"] == 0.5
    assert sched.total == 10 and sched.compute_fraction == pytest.approx(0.8)
    again = CacheSchedule.from_dict(json.loads(json.dumps(sched.to_dict())))
    assert again.updates == sched.updates and again.info["warm_steps"] == 4
    # a warm start of those 4 steps computes the window's update steps only (the first computes everything)
    o, noise = obs(2), torch.randn(policy.noise_shape(2))
    prev = policy.predict_action(o, noise)
    cached = CachedPolicy(policy, sched)
    cached.predict_action_warm(o, prev, 8, 4, noise)
    assert cached.denoiser.calls == 4 * len(keys) and cached.denoiser.computed == 2 * len(keys)
    # a full sampling run (an episode's first chunk) is exact up to the window
    cached.predict_action(o, noise)
    assert cached.denoiser.computed == 2 * len(keys) + 8 * len(keys)
    # uniform over the window; a window of every step is the ordinary schedule
    uni = warm_window(uniform_schedule(keys, "ddim-10", 4, 2), 10)
    assert set(uni.updates.values()) == {(0, 1, 2, 3, 4, 5, 6, 8)}
    full = schedule_from_calibration(cal, "bac", 3, bubble=0, warm_steps=10)
    assert full.updates == schedule_from_calibration(cal, "bac", 3, bubble=0).updates
    with pytest.raises(CacheError, match="updates=3 must be between 1 and the warm start's 2 denoiser calls"):
        schedule_from_calibration(cal, "bac", 3, warm_steps=2)
    with pytest.raises(CacheError, match="warm_steps=11 must be between 1 and the 10 steps of ddim-10"):
        schedule_from_calibration(cal, "bac", 1, warm_steps=11)
    shared = schedule_from_calibration(cal, "shared", 2, warm_steps=4)
    assert shared.info["steps"] == list(next(iter(shared.updates.values()))[6:])  # in the full numbering


def test_a_midpoint_warm_window_covers_both_calls_of_each_step_and_ddpm_is_refused():
    from robolearn.cli import CLIError
    from robolearn.cli.accel import make_cached

    policy = transformer_policy("flow", {"kind": "midpoint", "steps": 5})  # 10 denoiser calls
    keys = branch_keys(policy.backbone)
    cal = calibrate(policy, [obs(8, 2)])
    sched = schedule_from_calibration(cal, "uniform", 2, warm_steps=2)  # the last 2 steps: calls 6..9
    assert set(sched.updates.values()) == {(0, 1, 2, 3, 4, 5, 6, 8)} and sched.info["warm_steps"] == 2
    o, noise = obs(2), torch.randn(policy.noise_shape(2))
    cached = CachedPolicy(policy, sched)
    cached.predict_action_warm(o, policy.predict_action(o, noise), 8, 2, noise)
    assert cached.denoiser.calls == 4 * len(keys) and cached.denoiser.computed == 2 * len(keys)
    assert sched.info["warm_compute_fraction"] == 0.5
    # a diffusion policy's warm start runs DDIM steps: a DDPM-sampled one is refused before any calibration
    ddpm = transformer_policy("diffusion", {"kind": "ddpm", "steps": 20})
    with pytest.raises(CLIError, match="warm start runs DDIM steps .ddim-20., but this one samples with ddpm-20"):
        make_cached(ddpm, Path("nowhere"), "bac", warm_steps=2)


# ---------------------------------------------------------------------------------------------- scheduler
# 6 steps; outputs change sharply after step 2 and again after step 4.
HAND_SIM = np.array([
    [1.0, 0.9, 0.8, 0.1, 0.1, 0.0],
    [0.0, 1.0, 0.9, 0.2, 0.1, 0.0],
    [0.0, 0.0, 1.0, 0.3, 0.2, 0.1],
    [0.0, 0.0, 0.0, 1.0, 0.9, 0.2],
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.3],
    [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
])


def test_dp_picks_the_hand_worked_optimum():
    sim = HAND_SIM
    # k=2: {0,3} scores 0.9+0.8 (steps 1,2 from 0) + 0.9+0.2 (4,5 from 3) = 2.8, the best of the five choices
    assert dp_update_steps(sim, 2) == (0, 3)
    # k=3: {0,3,5}: 0.9+0.8 + 0.9 = 2.6; {0,3,4}: 0.9+0.8 + 0.3 = 2.0; {0,2,3}: 0.9 + 0.9+0.2 = 2.0;
    # {0,1,3}: 0.9+0.9+0.2 = 2.0 (and the rest lower)
    assert dp_update_steps(sim, 3) == (0, 3, 5)
    assert dp_update_steps(sim, 1) == (0,)
    assert dp_update_steps(sim, 6) == (0, 1, 2, 3, 4, 5)
    assert caching_error(sim, (0, 3)) == pytest.approx(((1 - 0.9) + (1 - 0.8) + (1 - 0.9) + (1 - 0.2)) / 6)


def test_dp_matches_exhaustive_search_on_random_matrices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        S, k = 7, int(rng.integers(1, 6))
        sim = rng.uniform(-1, 1, (S, S))
        np.fill_diagonal(sim, 1.0)  # a step is identical to itself (cosine 1), as in every real calibration

        def score(ups):
            return -caching_error(sim, ups) * S + sum(sim[j, j] for j in range(S))

        best = max(((0, *c) for c in itertools.combinations(range(1, S), k - 1)), key=score)
        assert score(dp_update_steps(sim, k)) == pytest.approx(score(best))


def test_step_weights_steer_the_dp_to_the_weighted_optimum():
    sim = HAND_SIM
    assert dp_update_steps(sim, 2, np.ones(6)) == dp_update_steps(sim, 2) == (0, 3)  # equal weights: BAC's choice
    # step 5 weighs 10, steps 1 and 2 0.01: the weighted loss of {0, c} for c = 1..5 is 11.701, 10.501, 8.103 (BAC's
    # unweighted choice {0, 3}: 0.01 x (0.1 + 0.2) + 1 x 0.1 + 10 x 0.8), 7.903 and 1.803 ({0, 5}: 0.01 x (0.1 + 0.2)
    # + 1 x 0.9 + 1 x 0.9)
    w = np.array([1.0, 0.01, 0.01, 1.0, 1.0, 10.0])
    assert dp_update_steps(sim, 2, w) == (0, 5)
    assert caching_error(sim, (0, 5), w) * 6 == pytest.approx(1.803)
    with pytest.raises(ValueError, match="step weights must be 6 finite numbers >= 0"):
        dp_update_steps(sim, 2, [1.0] * 5)
    rng = np.random.default_rng(1)
    for _ in range(20):  # the weighted DP is the optimum of the weighted caching error, by exhaustive search
        S, k = 7, int(rng.integers(1, 6))
        sim = rng.uniform(-1, 1, (S, S))
        np.fill_diagonal(sim, 1.0)
        w = rng.uniform(0, 3, S)
        best = min(((0, *c) for c in itertools.combinations(range(1, S), k - 1)),
                   key=lambda ups: caching_error(sim, ups, w))
        assert caching_error(sim, dp_update_steps(sim, k, w), w) == pytest.approx(caching_error(sim, best, w))


def test_step_sensitivity_finds_that_this_untrained_ddim_chunk_barely_depends_on_its_last_call():
    policy = transformer_policy(sampler={"kind": "ddim", "steps": 10})
    w = step_sensitivity(policy, [obs(8, 2)], sampler="ddim", steps=10)
    assert w.shape == (10,) and w.mean() == pytest.approx(1.0)
    # the last DDIM step lands on alpha_bar = 1 and scales its noise estimate by sqrt(1 - alpha_bar_0) ~ 0.025
    assert w[-1] < 0.1 * np.median(w[:-1]), w
    cal = calibrate(policy, [obs(16, 2), obs(16, 3)], step_weights=True)
    np.testing.assert_allclose(cal.step_weights,  # measured on the first 32 observations
                               step_sensitivity(policy, [obs(16, 2), obs(16, 3)], sampler="ddim", steps=10))
    sched = schedule_from_calibration(cal, "bac", 4, bubble=0)
    assert sched.info["step_weights"] == [round(float(v), 6) for v in cal.step_weights]
    assert not any(9 in steps for steps in sched.updates.values())  # no branch spends an update on the last call
    assert CacheSchedule.from_dict(json.loads(json.dumps(sched.to_dict()))).info["step_weights"] == \
        sched.info["step_weights"]


def test_bubbling_union_on_a_hand_built_ranking():
    updates = {"0.self_attn": (0, 4), "0.cross_attn": (0, 2), "0.ff": (0, 3),
               "1.self_attn": (0, 1), "1.cross_attn": (0, 5), "1.ff": (0, 6)}
    errors = {"0.self_attn": 0.5, "0.cross_attn": 0.1, "0.ff": 0.4, "1.self_attn": 0.05, "1.cross_attn": 0.3,
              "1.ff": 0.9}
    out, chosen = bubbling_union(updates, errors, n_blocks=2, top=3)
    # 1.ff has the largest error but no feed-forward branch after it: not a candidate
    assert chosen == ["0.self_attn", "0.ff", "1.cross_attn"]
    assert out["0.self_attn"] == (0, 3, 4)  # with 0.ff's
    assert out["0.ff"] == (0, 3, 6)  # with 1.ff's (the original, not a chain)
    assert out["1.cross_attn"] == (0, 5, 6)
    assert out["0.cross_attn"] == (0, 2) and out["1.ff"] == (0, 6) and out["1.self_attn"] == (0, 1)
    assert next_ff("1.ff", 2) is None and next_ff("0.cross_attn", 2) == "0.ff"
    assert bubbling_union(updates, errors, 2, 0)[1] == []


def test_shared_schedule_is_the_dp_optimum_of_the_mean_similarity_for_every_branch():
    a = np.eye(6) + np.triu(np.full((6, 6), 0.9), 1)  # changes little anywhere
    b = HAND_SIM  # changes sharply after step 2 and after step 4
    sched = shared_schedule({"0.self_attn": a, "0.ff": b}, "ddim-6", 2)
    # mean: {0, 3} scores 0.9 + 0.85 (steps 1, 2) + 0.9 + 0.55 (steps 4, 5) = 3.2; next best {0, 4}: 2.85
    assert sched.updates == {"0.self_attn": (0, 3), "0.ff": (0, 3)}
    assert sched.updates["0.ff"] == dp_update_steps((a + b) / 2, 2)
    assert sched.method == "shared" and sched.compute_fraction == pytest.approx(2 / 6)
    assert sched.info["error"]["0.ff"] == pytest.approx(caching_error(b, (0, 3)), abs=1e-6)
    assert CacheSchedule.from_dict(sched.to_dict()).updates == sched.updates


def test_searched_schedule_is_the_set_with_the_smallest_chunk_error_by_brute_force():
    policy = transformer_policy(sampler={"kind": "ddim", "steps": 6})
    batches = [obs(4, 2), obs(4, 3)]
    sched = searched_schedule(policy, batches, 3, seed=5)
    keys = branch_keys(policy.backbone)
    steps = sched.updates[keys[0]]
    assert sched.method == "searched" and sched.sampler == "ddim-6" and steps[0] == 0 and len(steps) == 3
    assert all(v == steps for v in sched.updates.values())  # one set of steps for every branch
    assert sched.info["candidates"] == 10 and sched.info["observations"] == 8  # C(5, 2) sets, 8 observations
    # recompute every candidate's error independently (same noise rule): the chosen one is the smallest
    gen = torch.Generator().manual_seed(5)
    noises = [torch.randn(policy.noise_shape(4), generator=gen) for _ in batches]
    with torch.no_grad():
        ref = [policy.predict_action(b, n) for b, n in zip(batches, noises)]

        def err(st):
            c = CachedPolicy(policy, CacheSchedule("searched", "ddim-6", 6, {k: st for k in keys}))
            outs = [c.predict_action(b, n) for b, n in zip(batches, noises)]
            return float(torch.cat([(o - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)
                                    for o, r in zip(outs, ref)]).mean())

        errors = {(0, *rest): err((0, *rest)) for rest in itertools.combinations(range(1, 6), 2)}
    assert min(errors, key=errors.get) == steps
    assert sched.info["action_rel_error"] == pytest.approx(errors[steps], rel=1e-4)
    assert sched.info["action_rel_error"] <= sched.info["uniform_action_rel_error"] + 1e-9
    # all steps: exactly the uncached policy
    assert searched_schedule(policy, batches[:1], 6).info["action_rel_error"] == 0.0
    assert CacheSchedule.from_dict(sched.to_dict()).updates == sched.updates
    # many-step samplers: refused before any sampling, naming what to use instead
    ddpm = transformer_policy(sampler={"kind": "ddpm", "steps": 100})
    with pytest.raises(CacheError, match=rf"more than the {SEARCH_LIMIT} it allows; use method=bac or uniform"):
        searched_schedule(ddpm, batches, 25)


def test_uniform_steps():
    assert uniform_steps(100, 25) == tuple(range(0, 100, 4))
    assert uniform_steps(10, 3) == (0, 3, 6)
    assert uniform_steps(5, 9) == (0, 1, 2, 3, 4)


def test_calibrated_bac_beats_uniform_at_equal_compute_on_this_model():
    policy = transformer_policy(sampler={"kind": "ddim", "steps": 10})
    cal = calibrate(policy, [obs(8, 2), obs(8, 3)])
    assert cal.observations == 16 and cal.total == 10 and set(cal.similarity) == set(branch_keys(policy.backbone))
    for sim in cal.similarity.values():
        assert np.allclose(np.diag(sim), 1.0, atol=1e-5) and sim.shape == (10, 10)
    bac = schedule_from_calibration(cal, "bac", 3, bubble=0)
    uni = schedule_from_calibration(cal, "uniform", 3)
    assert bac.compute_fraction == uni.compute_fraction == pytest.approx(0.3)
    # the scheduler maximizes exactly the similarity that caching_error measures
    assert sum(bac.info["error"].values()) <= sum(uni.info["error"].values()) + 1e-12
    l1 = calibrate(policy, [obs(4, 2)], metric="l1")
    assert all(np.allclose(np.diag(v), 0.0, atol=1e-6) and (v <= 1e-6).all() for v in l1.similarity.values())


# ---------------------------------------------------------------------------------------------- schedules
def test_schedule_round_trips_and_refuses_bad_contents():
    policy = transformer_policy()
    sched = schedule_from_calibration(calibrate(policy, [obs(4)]), "bac", 4, bubble=2)
    again = CacheSchedule.from_dict(json.loads(json.dumps(sched.to_dict())))
    assert again.updates == sched.updates and again.fingerprint == sched.fingerprint
    assert again.sampler == "ddim-10" and again.info["bubbled"] == sched.info["bubbled"]
    with pytest.raises(CacheError, match="must include step 0"):
        CacheSchedule("bac", "ddim-10", 10, {"0.ff": (2, 5)})
    with pytest.raises(CacheError, match="outside the schedule's 10 steps"):
        CacheSchedule("bac", "ddim-10", 10, {"0.ff": (0, 10)})
    with pytest.raises(CacheError, match="missing"):
        CacheSchedule.from_dict({"method": "bac"})


def test_a_schedule_of_another_checkpoint_or_sampler_is_refused(tmp_path):
    policy = transformer_policy(seed=0)
    other = transformer_policy(seed=1)
    sched = schedule_from_calibration(calibrate(policy, [obs(4)]), "bac", 4)
    with pytest.raises(CacheError, match="calibrated for another checkpoint"):
        CachedPolicy(other, sched)
    cached = CachedPolicy(policy, sched)
    with pytest.raises(CacheError, match=r"calibrated for sampler ddim-10 .* samples with ddim-5.*steps=5"):
        cached.predict_action(obs(), steps=5)
    with pytest.raises(CacheError, match="ddim-20"):
        cached.set_sampler(steps=20)
    with pytest.raises(CacheError, match="other blocks"):
        CachedPolicy(transformer_policy(), CacheSchedule("uniform", "ddim-10", 10, {"0.ff": (0,)}))
    unet = make_policy({"type": "diffusion", "backbone": {"name": "unet", "preset": "tiny"}, "obs": {"state": [5]},
                        "action_dim": 2}, {"state": s(5), "action": s(2)})
    with pytest.raises(CacheError, match="needs a transformer backbone.*ConditionalUnet1D"):
        CachedPolicy(unet, sched)


def test_cached_checkpoint_round_trips_and_names_its_base(tmp_path):
    policy = transformer_policy()
    save_policy(policy, tmp_path / "base", config={"task": "push_t"})
    base = load_policy(tmp_path / "base")
    sched = schedule_from_calibration(calibrate(base, [obs(4)]), "bac", 3)
    cached = CachedPolicy(base, sched)
    save_policy(cached, tmp_path / "cached")
    loaded = load_policy(tmp_path / "cached")
    assert loaded.policy_type == "cached" and loaded.schedule.updates == sched.updates
    o, noise = obs(), torch.randn(policy.noise_shape(3))
    assert torch.equal(loaded.predict_action(o, noise), cached.predict_action(o, noise))
    assert loaded.checkpoint_state() == {}  # no weights of its own


# ---------------------------------------------------------------------------------------------- CLI
def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def push_t_ckpt(tmp_path_factory) -> Path:
    """The tiny flow-transformer fixture checkpoint, its run config pointed at a small push_t store."""
    root = tmp_path_factory.mktemp("cache_cli")
    store = root / "push_t.zarr"
    assert main(["collect", "task=push_t", "episodes=2", f"out={store}", "progress=false"]) == 0
    ckpt = root / "base"
    shutil.copytree(FIXTURES / "v1_push_t_flow_transformer", ckpt)
    text = (ckpt / "config.yaml").read_text().replace("/tmp/golden/push_t.zarr", str(store))
    (ckpt / "config.yaml").write_text(text)
    return ckpt


def test_calibrate_writes_a_cached_checkpoint_that_eval_and_bench_use(push_t_ckpt, tmp_path, capsys):
    out = tmp_path / "bac"
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "updates=2", "observations=24", "batch=8",
                 f"out={out}", "progress=false"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["checkpoint"] == str(out) and summary["sampler"] == "euler-4" and summary["updates"] == 2
    assert summary["step_weights"] is None  # BAC's own scheduler unless asked
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "updates=2", "observations=8", "batch=8",
                 "step_weights=true", f"out={tmp_path / 'weighted'}", "progress=false"]) == 0
    weighted = last_json(capsys.readouterr().out)["step_weights"]
    assert len(weighted) == 4 and np.mean(weighted) == pytest.approx(1.0, abs=1e-5) and min(weighted) > 0
    assert 2 / 4 <= summary["compute_fraction"] < 1.0 and summary["observations"] == 24
    for f in ("schedule.png", "similarity.npz", "config.yaml"):
        assert (out / f).is_file(), f
    assert (out / "schedule.png").stat().st_size > 5000
    assert main(["eval", f"checkpoint={out}", "episodes=2", "num_envs=2", "workers=0",
                 f"run_dir={tmp_path / 'ev'}"]) == 0
    ev = last_json(capsys.readouterr().out)
    assert ev["policy_type"] == "cached" and ev["episodes"] == 2 and ev["cache"]["sampler"] == "euler-4"
    assert main(["bench", "latency", f"checkpoint={out}", "repeats=2", "warmup=1", "observations=3",
                 f"out={tmp_path / 'lat.json'}"]) == 0
    lat = last_json(capsys.readouterr().out)
    for key in ("speedup", "latency_ms_cached", "latency_ms_uncached", "action_rel_error"):
        assert key in lat and lat[key] >= 0
    assert lat["measured_compute_fraction"] == pytest.approx(summary["compute_fraction"], abs=1e-3)
    assert json.loads((tmp_path / "lat.json").read_text())["speedup"] == lat["speedup"]
    assert lat["dtype"] == "float32"
    assert main(["bench", "latency", f"checkpoint={out}", "repeats=1", "warmup=0", "observations=2",
                 "dtype=bf16"]) == 0
    captured = capsys.readouterr()
    lat16 = last_json(captured.out)
    assert lat16["dtype"] == "bf16" and "samples in torch.bfloat16" in captured.err
    assert 0.0 <= lat16["action_rel_error"] < 1.0
    assert main(["bench", "latency", f"checkpoint={out}", "dtype=int4"]) == 1
    assert "dtype='int4' is not one of float32, bf16, fp16" in capsys.readouterr().err
    # the warm start (RTI-DP) through the same schedule: its calls sit at the end of the euler-4 schedule
    assert main(["bench", "latency", f"checkpoint={out}", "warm_steps=2", "repeats=1", "warmup=0",
                 "observations=2"]) == 0
    warm = last_json(capsys.readouterr().out)
    assert warm["warm_steps"] == 2 and 0.0 <= warm["action_rel_error"] < 1.0
    # more warm steps than the 4 the schedule's sampler has would be clamped by the policy: refused instead
    assert main(["bench", "latency", f"checkpoint={out}", "warm_steps=5", "repeats=1", "warmup=0",
                 "observations=2"]) == 1
    assert "warm_steps=5 is more than the 4 denoising steps" in capsys.readouterr().err
    # a schedule made for the warm start's last 2 steps: the default name says so, the warm start halves its work
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "warm_steps=2", "bubble=0", "observations=8",
                 "batch=8", "plot=false", "progress=false"]) == 0
    made = last_json(capsys.readouterr().out)
    assert made["checkpoint"].endswith("-bac-euler-4-k1-w2") and made["warm_steps"] == 2
    assert made["updates"] == 1 and made["warm_compute_fraction"] == 0.5 and made["compute_fraction"] == 0.75
    assert main(["bench", "latency", f"checkpoint={made['checkpoint']}", "warm_steps=2", "repeats=1", "warmup=0",
                 "observations=2"]) == 0
    assert last_json(capsys.readouterr().out)["measured_compute_fraction"] == 0.5
    # bench latency cache=bac warm_steps=2 on the base schedules for the warm start the same way
    assert main(["bench", "latency", f"checkpoint={push_t_ckpt}", "cache=bac", "updates=1", "warm_steps=2",
                 "repeats=1", "warmup=0", "observations=2", "progress=false"]) == 0
    assert last_json(capsys.readouterr().out)["measured_compute_fraction"] == 0.5
    # run without the warm start it was made for: it runs, and says so
    assert main(["run", f"checkpoint={made['checkpoint']}", "realtime=false", "latency_s=0", "episodes=1",
                 "status=false", f"run_dir={tmp_path / 'run_w2'}"]) == 0
    assert "scheduled for a 2-step warm start (accel calibrate warm_steps=2), but blend=none" in \
        capsys.readouterr().err
    shutil.rmtree(made["checkpoint"])  # it was written beside the shared fixture checkpoint


def test_cache_on_a_base_checkpoint_and_bad_input(push_t_ckpt, tmp_path, capsys):
    assert main(["eval", f"checkpoint={push_t_ckpt}", "cache=uniform", "cache_updates=2", "episodes=1",
                 "num_envs=1", "workers=0", f"run_dir={tmp_path / 'ev'}"]) == 0
    ev = last_json(capsys.readouterr().out)
    assert ev["cache"] == {"method": "uniform", "sampler": "euler-4", "compute_fraction": 0.5}
    assert main(["bench", "latency", f"checkpoint={push_t_ckpt}", "cache=none", "repeats=1", "warmup=0",
                 "observations=2"]) == 0
    assert last_json(capsys.readouterr().out)["action_rel_error"] == 0.0  # every step computed: exact
    # the real-time runner with the warm start, through a uniform cache (virtual clock)
    # (the cache is scheduled for the warm start's 2 steps: 1 update among them)
    assert main(["run", f"checkpoint={push_t_ckpt}", "cache=uniform", "cache_updates=1", "blend=warmstart",
                 "realtime=false", "latency_s=0", "episodes=1", "status=false", f"run_dir={tmp_path / 'run'}"]) == 0
    printed = capsys.readouterr().out
    assert "50% of the branch computations of the 2-step warm start" in printed
    assert last_json(printed)["episodes"] == 1
    cases = [
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "updates=9"], "updates=9 must be between 1 and the 4"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=fast"], "method='fast' is not one of"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "warm_steps=2", "updates=3"],
         "updates=3 must be between 1 and the warm start's 2 denoiser calls (warm_steps=2)"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "warm_steps=5"],
         "warm_steps=5 must be between 1 and the 4 steps of euler-4"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=searched", "warm_steps=2"],
         "warm_steps=2 schedules a warm start's steps with method=bac, shared or uniform, not method=searched"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=uniform", "step_weights=true"],
         "step_weights=true weighs the calibrated schedulers (method=bac or shared), not method=uniform"),
        (["accel", "calibrate", f"checkpoint={tmp_path / 'nowhere'}"], "nowhere"),
        (["accel", "calibrate", f"checkpoint={FIXTURES / 'v1_push_t_diffusion_unet'}", "method=uniform"],
         "needs a transformer backbone"),
        (["accel", "calibrate", f"checkpoint={push_t_ckpt}", f"dataset={tmp_path / 'none.zarr'}"],
         "none.zarr does not exist"),
        (["eval", f"checkpoint={push_t_ckpt}", "cache=fast"], "cache='fast' is not one of"),
        (["run", "policy=ws://127.0.0.1:1", "task=push_t", "cache=bac"], "cache= applies to a checkpoint="),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
    # the searched schedule through the command: a cached checkpoint eval takes
    searched = tmp_path / "searched"
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=searched", "updates=2",
                 "observations=8", "batch=4", f"out={searched}", "plot=false", "progress=false"]) == 0
    found = last_json(capsys.readouterr().out)
    assert found["method"] == "searched" and found["compute_fraction"] == 0.5 and found["action_rel_error"] >= 0
    assert load_policy(searched).schedule.info["candidates"] == 3  # euler-4: step 0 and one of 3 others
    # the shared adaptive schedule: calibrated like bac, one set of steps for every branch
    shared = tmp_path / "shared"
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=shared", "updates=2",
                 "observations=8", "batch=4", f"out={shared}", "plot=false", "progress=false"]) == 0
    found = last_json(capsys.readouterr().out)
    assert found["method"] == "shared" and found["compute_fraction"] == 0.5 and found["observations"] == 8
    ups = load_policy(shared).schedule.updates
    assert len(set(ups.values())) == 1 and next(iter(ups.values()))[0] == 0
    assert (shared / "similarity.npz").is_file()
    out = tmp_path / "uni"
    assert main(["accel", "calibrate", f"checkpoint={push_t_ckpt}", "method=uniform", "updates=2", f"out={out}",
                 "plot=false"]) == 0
    capsys.readouterr()
    assert main(["eval", f"checkpoint={out}", "sampler.steps=8", "episodes=1"]) == 1
    assert "calibrated for sampler euler-4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CUDA graphs
def test_graph_capture_refuses_a_cpu_policy_and_flattens_conditions():
    from robolearn.accel.graph import GraphError, flatten_tensors, graphed
    from robolearn.models.transformer import TransformerCond

    policy = transformer_policy()
    with pytest.raises(GraphError, match="on a CUDA device; its backbone is on cpu"):
        graphed(policy)
    cond = policy.backbone.prepare(torch.randn(2, 3, policy.backbone.cond_dim))
    flat, rebuild = flatten_tensors(cond)
    assert len(flat) == 1 + 2 * len(policy.backbone.blocks)
    again = rebuild([t + 1 for t in flat])
    assert isinstance(again, TransformerCond) and torch.equal(again.kv[1][0], cond.kv[1][0] + 1)
    assert torch.equal(again.memory, cond.memory + 1)
    with pytest.raises(TypeError, match="cannot capture"):
        flatten_tensors({"a": 1})
    cached = CachedPolicy(policy, all_steps(branch_keys(policy.backbone), "ddim-10", 10))
    with pytest.raises(GraphError, match="wraps a base chunk policy, not a CachedPolicy wrapper"):
        graphed(cached, whole=True)


def test_eval_graph_option_refuses_a_cpu_policy_naming_the_device():
    from robolearn.cli import CLIError
    from robolearn.cli.runtime import apply_inference

    policy = transformer_policy()
    with pytest.raises(CLIError, match=r"graph=true .* needs the policy on a GPU \(device=cuda\); this run's device "
                                      r"is cpu"):
        apply_inference(policy, Path("ckpt"), "bf16", graph=True)
    assert next(policy.backbone.parameters()).dtype == torch.float32  # refused before any cast


def test_graph_options_are_refused_before_loading_and_the_weights_watch_sees_a_cast():
    from robolearn.accel.graph import WeightsWatch
    from robolearn.cli import CLIError
    from robolearn.cli.runtime import check_inference_options

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    check_inference_options("bf16", True, cuda)
    for kw, name in (({"cache": "bac"}, "cache=bac"), ({"rank": 8}, "rank=8")):
        with pytest.raises(CLIError, match=f"graph=true captures a base diffusion or flow policy; {name} wraps it"):
            check_inference_options("float32", True, cuda, **kw)
    with pytest.raises(CLIError, match="dtype='int8' is not one of float32, bf16, fp16"):
        check_inference_options("int8")
    policy = transformer_policy()
    keys = set(policy.state_dict())
    watch = WeightsWatch(policy.backbone)
    before = watch.key()
    assert watch.key() == before and set(policy.state_dict()) == keys  # watching registers nothing
    assert not watch.changed()
    policy.backbone.to(torch.bfloat16)
    assert watch.key() != before  # a graph captured before the cast would read freed float32 weights
    assert watch.changed() and not watch.changed()  # said once per change
