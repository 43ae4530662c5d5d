"""``data audit``, ``data filter``, episode/intervention weights and merging stores that differ in flag keys.

The audit runs on a synthetic store: a point mass driven toward a goal by a proportional controller (state:
position and goal; action: the velocity command; the next position follows the action), with planted bad
episodes: Gaussian noise on the executed actions, actions shuffled in time after recording, and a long idle
stretch. Real zarr on disk, real torch training of the cross-fitted regressors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from robolearn.audit.rules import (RuleError, auto_threshold, episode_weights, parse_rule, read_scores,
                                   select_episodes)
from robolearn.cli import main
from robolearn.data import EpisodeStore, KeySpec, SequenceDataset, merge_stores

SCHEMA = {"pos": KeySpec((2,), "float32", "obs"), "goal": KeySpec((2,), "float32", "obs"),
          "action": KeySpec((2,), "float32", "action"), "reward": KeySpec((), "float32", "reward")}
FLAGGED = {**SCHEMA, "intervention": KeySpec((), "bool", "flag")}
N_GOOD, LENGTH = 80, 40
PLANTED = {"noise": [N_GOOD, N_GOOD + 1], "shuffled": [N_GOOD + 2, N_GOOD + 3], "idle": [N_GOOD + 4, N_GOOD + 5]}


def reach_episode(seed: int, kind: str = "good") -> dict[str, np.ndarray]:
    """A proportional controller toward one of four goals (never reached in 40 steps; the action decays slowly)."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-0.5, 0.5, 2)
    angle = 2 * np.pi * (seed % 4) / 4  # four goals, each reached for from everywhere: dense coverage
    goal = 1.2 * np.array([np.cos(angle), np.sin(angle)])
    P, A = [], []
    for t in range(LENGTH):
        a = 0.5 * (goal - pos)
        if kind == "noise":
            a = a + rng.normal(0, 0.3, 2)
        if kind == "idle" and 10 <= t < 30:
            a = np.zeros(2)  # the operator let go: nothing moves
        P.append(pos.copy())
        A.append(a)
        pos = pos + 0.04 * a
    actions = np.array(A)
    if kind == "shuffled":  # the recorded actions belong to another episode
        actions = reach_episode(seed + 1001)["action"]  # another goal's
    n = LENGTH
    return {"pos": np.array(P, np.float32), "goal": np.repeat(goal[None], n, 0).astype(np.float32),
            "action": actions.astype(np.float32), "reward": np.zeros(n, np.float32)}


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "reach.zarr"
    with EpisodeStore.create(path, SCHEMA, fps=10, task="reach_unit") as store:
        kinds = ["good"] * N_GOOD + ["noise", "noise", "shuffled", "shuffled", "idle", "idle"]
        store.append_episodes([reach_episode(i, kind) for i, kind in enumerate(kinds)],
                              [{"seed": i, "success": True} for i in range(len(kinds))])
    return path


@pytest.fixture(scope="module")
def audited(reach_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit_out")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["data", "audit", str(reach_store), f"out={out}", "fit_steps=100", "folds=4",
                     "progress=false", "videos=2"]) == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    return out, summary


def test_audit_ranks_the_planted_episodes_worst(audited, reach_store):
    out, summary = audited
    rows = read_scores(out / "scores.jsonl", n_episodes=N_GOOD + 6)
    planted = {e for v in PLANTED.values() for e in v}
    by_overall = sorted(rows, key=lambda r: -r["overall"])
    assert {r["episode"] for r in by_overall[:6]} == planted
    # each kind is worse than every good episode on the score that should see it
    good = [r for r in rows if r["episode"] < N_GOOD]

    def above_good(score: str, episodes: list[int]) -> bool:
        return min(rows[e][score] for e in episodes) > max(r[score] for r in good)

    assert above_good("action_divergence", sorted(planted))
    assert above_good("idle_share", PLANTED["idle"]) and rows[PLANTED["idle"][0]]["idle_share"] >= 0.45
    assert all(r["idle_share"] == 0 for r in good)
    assert above_good("action_jerk", PLANTED["noise"])
    assert above_good("transition_diversity", PLANTED["shuffled"] + PLANTED["noise"])
    assert sum(r["weight"] == 1.0 for r in good) >= 0.9 * N_GOOD and all(rows[e]["weight"] < 0.05 for e in planted)
    assert all(r["success"] is True and r["seed"] == r["episode"] for r in rows)
    # what the summary and the report say
    assert summary["episodes"] == N_GOOD + 6 and summary["steps"] == (N_GOOD + 6) * LENGTH
    assert summary["action_divergence"]["method"] == "cross_fit" and summary["action_divergence"]["folds"] == 4
    assert {w["episode"] for w in summary["worst"][:6]} == planted
    assert "no robolearn" in summary.get("videos_note", "") or "reach_unit" in summary.get("videos_note", "")
    assert (out / "report.png").stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert "report.png" in page and f"<td>{by_overall[0]['episode']}</td>" in page
    last = json.loads((out / "scores.jsonl").read_text().strip().splitlines()[-1])
    assert last["summary"]["episodes"] == N_GOOD + 6


def test_audit_replays_the_worst_episodes_of_a_simulated_task(tmp_path, capsys):
    store = tmp_path / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=3", f"out={store}", "progress=false"]) == 0
    assert main(["collect", "task=peg_insert", "episodes=2", f"out={store}", "progress=false", "seed=500",
                 "expert.noise=1.0", "append_mismatch=allow"]) == 0
    capsys.readouterr()
    out = tmp_path / "aud"
    assert main(["data", "audit", str(store), f"out={out}", "fit_steps=50", "progress=false", "videos=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    video = Path(summary["worst"][0]["video"])
    assert video.exists() and video.stat().st_size > 1000 and video.parent == out / "videos"


def test_audit_bad_input(reach_store, tmp_path, capsys):
    assert main(["data", "audit", str(reach_store), "fold=3"]) == 1
    assert "unknown option 'fold'; did you mean folds?" in capsys.readouterr().err
    assert main(["data", "audit", str(reach_store), "folds=x"]) == 1
    assert "folds takes a whole number, got 'x'" in capsys.readouterr().err
    assert main(["data", "audit", str(tmp_path / "nope.zarr")]) == 1
    assert "nope.zarr" in capsys.readouterr().err
    assert main(["data", "audit", str(reach_store), f"checkpoint={tmp_path / 'ckpt'}"]) == 1
    assert "ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["action_divergence>q90", "idle_share>=0.5", "success==0", "length<12",
                                  "overall>auto", "transition_diversity<=q97.5", "action_jerk!=0.1",
                                  "intervention_share>0.333333333333"])
def test_rules_round_trip(text):
    rule = parse_rule(text)
    assert parse_rule(str(rule)) == rule
    assert str(parse_rule(f"  {rule.score} {rule.op} {str(rule)[len(rule.score) + len(rule.op):]} ")) == str(rule)


@pytest.mark.parametrize("text,message", [
    ("action_divergenc>q90", "did you mean 'action_divergence'"),
    ("action_divergence=>1", "cannot read the rule"),
    ("action_divergence>q150", "outside 0-100"),
    ("action_divergence>qx", "not a percentile"),
    ("action_divergence==auto", "use it with"),
    ("action_divergence>high", "not a number"),
    ("", "cannot read the rule"),
])
def test_bad_rules_are_named(text, message):
    with pytest.raises(RuleError, match=message):
        parse_rule(text)


def test_auto_splits_two_groups_and_leaves_one_alone():
    rng = np.random.default_rng(0)
    two = np.concatenate([rng.normal(1.0, 0.1, 60), rng.normal(3.0, 0.3, 40)])
    res = auto_threshold(two)
    assert 1.3 < res["threshold"] < 2.2 and res["high_group"] == 40
    one = rng.normal(1.0, 0.1, 100)
    res = auto_threshold(one)
    assert res["threshold"] is None and "do not form two groups" in res["why"]
    rows = [{"episode": i, "action_divergence": float(v)} for i, v in enumerate(one)]
    assert select_episodes(rows, drop=["action_divergence>auto"])["dropped"] == []


def test_select_drop_and_keep_rules():
    rows = [{"episode": i, "length": 10 + i, "success": i % 2 == 0, "idle_share": None} for i in range(10)]
    res = select_episodes(rows, drop=["length>q80"], keep=["success==true"])
    assert res["dropped"] == [1, 3, 5, 7, 8, 9] and res["kept"] == [0, 2, 4, 6]
    assert res["rules"][0]["threshold"] == pytest.approx(17.2)
    with pytest.raises(RuleError, match="no episode has a 'idle_share' score"):
        select_episodes(rows, drop=["idle_share>0"])
    with pytest.raises(RuleError, match="no rule given"):
        select_episodes(rows)


def test_filter_writes_the_kept_episodes_and_its_rules(audited, reach_store, tmp_path, capsys):
    out, _ = audited
    scores = out / "scores.jsonl"
    before = EpisodeStore.open(reach_store)
    n_before, steps_before = before.n_episodes, before.n_steps
    before.close()
    dest = tmp_path / "kept.zarr"
    capsys.readouterr()
    assert main(["data", "filter", str(reach_store), "--scores", str(scores), "--out", str(dest),
                 "--drop", "overall>auto", "--drop", "idle_share>0.3", "--dry-run"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["dry_run"] and not dest.exists()
    assert main(["data", "filter", str(reach_store), "--scores", str(scores), "--out", str(dest),
                 "--drop", "action_divergence>q90", "--drop", "idle_share>0.3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dropped = set(res["dropped"])
    assert set(PLANTED["idle"]) <= dropped and len(dropped) >= 5
    with EpisodeStore.open(dest) as kept, EpisodeStore.open(reach_store) as src:
        assert kept.n_episodes == n_before - len(dropped)
        f = kept.attrs["filter"]
        assert [parse_rule(r["rule"]) for r in f["rules"]] == [parse_rule("action_divergence>q90"),
                                                               parse_rule("idle_share>0.3")]
        assert sorted(f["dropped"]) == sorted(dropped) and f["scores"] == str(scores)
        first_kept = min(set(range(n_before)) - dropped)
        np.testing.assert_array_equal(kept.get_episode(0)["pos"], src.get_episode(first_kept)["pos"])
        assert kept.all_episode_attrs()[0]["seed"] == first_kept
        assert src.n_episodes == n_before and src.n_steps == steps_before  # the source is untouched
    # an existing --out is refused; a stale score file (another store) is named
    assert main(["data", "filter", str(reach_store), "--scores", str(scores), "--out", str(dest),
                 "--drop", "length>1000"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "filter", str(dest), "--scores", str(scores), "--out", str(tmp_path / "x.zarr"),
                 "--drop", "length>1000"]) == 1
    err = capsys.readouterr().err
    assert "does not describe" in err and str(scores) in err
    assert main(["data", "filter", str(dest), "--out", str(tmp_path / "y.zarr"), "--drop", "length>1000"]) == 1
    assert "run robolearn data audit" in capsys.readouterr().err


def test_weighted_loss_on_a_hand_checked_batch():
    from robolearn.policies.base import weighted_mse

    pred = torch.zeros(2, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [0.0, 0.0], [0.0, 0.0]]])
    # per-action errors (mean over the 2 dims): [[1, 2, 0], [9, 0, 0]]
    assert float(weighted_mse(pred, target)) == pytest.approx(12 / 6)
    assert float(weighted_mse(pred, target, torch.ones(2, 3) * 5)) == pytest.approx(12 / 6)
    assert float(weighted_mse(pred, target, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))) == pytest.approx(3 / 3)
    assert float(weighted_mse(pred, target, torch.tensor([[0.0, 2, 0], [1, 0, 0]]))) == pytest.approx((4 + 9) / 3)
    zero = weighted_mse(pred.requires_grad_(), target, torch.zeros(2, 3))
    zero.backward()
    assert float(zero.detach()) == 0.0 and float(pred.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_policy_loss_weights_each_sample(kind, reach_store):
    from robolearn.policies import make_policy

    ds = SequenceDataset(reach_store, horizon=4, n_obs_steps=2, n_action_steps=2)
    policy = make_policy({"type": kind, "backbone": {"name": "unet", "preset": "tiny"}, "horizon": 4,
                          "n_obs_steps": 2, "n_action_steps": 2, "obs": {"pos": [2], "goal": [2]},
                          "action_dim": 2}, ds.stats())
    batch = next(ds.batches(2, shuffle=False))

    def loss(weight=None):
        torch.manual_seed(0)
        b = dict(batch) if weight is None else {**batch, "weight": torch.tensor(weight, dtype=torch.float32)}
        return float(policy.compute_loss(b).detach())

    plain, first, second = loss(), loss([[1.0] * 4, [0.0] * 4]), loss([[0.0] * 4, [1.0] * 4])
    assert plain == pytest.approx((first + second) / 2, rel=1e-5)
    assert loss([[3.0] * 4, [1.0] * 4]) == pytest.approx((3 * first + second) / 4, rel=1e-5)
    assert first != pytest.approx(second)
    with pytest.raises(ValueError, match=r"batch\['weight'\] must have shape \(2, 4\)"):
        policy.compute_loss({**batch, "weight": torch.ones(2)})


def make_flagged(path: Path, n: int, flag_every: int = 0, seed0: int = 0) -> Path:
    with EpisodeStore.create(path, FLAGGED if flag_every else SCHEMA, fps=10, task="reach_unit") as s:
        for i in range(n):
            ep = reach_episode(seed0 + i)
            if flag_every:
                ep["intervention"] = (np.arange(LENGTH) % flag_every) == 0
            s.append_episode(ep, attrs={"seed": seed0 + i})
    return path


def test_merge_of_a_teleop_store_with_a_scripted_one_keeps_every_episode_and_flag(tmp_path, capsys):
    teleop = make_flagged(tmp_path / "teleop.zarr", 3, flag_every=4)
    scripted = make_flagged(tmp_path / "scripted.zarr", 2, seed0=10)
    out = tmp_path / "both.zarr"
    assert main(["data", "merge", str(scripted), str(teleop), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "has no intervention: written as false" in text
    with EpisodeStore.open(out) as m, EpisodeStore.open(teleop) as t:
        assert m.n_episodes == 5 and m.schema["intervention"].role == "flag"
        flags = [m.get_episode(i)["intervention"] for i in range(5)]
        assert not any(f.any() for f in flags[:2])
        for i in range(3):
            np.testing.assert_array_equal(flags[2 + i], t.get_episode(i)["intervention"])
            np.testing.assert_array_equal(m.get_episode(2 + i)["pos"], t.get_episode(i)["pos"])
        assert m.attrs["filled_flags"] == {str(scripted): ["intervention"]}
        assert [a["seed"] for a in m.all_episode_attrs()] == [10, 11, 0, 1, 2]
    # keys other than flags still have to match
    other = tmp_path / "other.zarr"
    with EpisodeStore.create(other, {**SCHEMA, "extra": KeySpec((1,), "float32", "obs")}, fps=10,
                             task="reach_unit") as s:
        s.append_episode({**reach_episode(0), "extra": np.zeros((LENGTH, 1), np.float32)})
    assert main(["data", "merge", str(scripted), str(other), "--out", str(tmp_path / "no.zarr")]) == 1
    assert "key 'extra' only in the second store" in capsys.readouterr().err
    bad = tmp_path / "badflag.zarr"
    with EpisodeStore.create(bad, {**SCHEMA, "intervention": KeySpec((), "float32", "flag")}, fps=10,
                             task="reach_unit") as s:
        s.append_episode({**reach_episode(0), "intervention": np.zeros(LENGTH, np.float32)})
    with pytest.raises(Exception, match="intervention"):
        merge_stores([teleop, bad], tmp_path / "no2.zarr")
    assert not (tmp_path / "no2.zarr").exists()


def test_step_weights_from_a_score_file_and_interventions(tmp_path):
    from omegaconf import OmegaConf

    from robolearn.cli import CLIError
    from robolearn.cli.train import step_weights

    store_path = make_flagged(tmp_path / "t.zarr", 3, flag_every=4)
    weights = tmp_path / "w.jsonl"
    weights.write_text("".join(json.dumps({"episode": e, "weight": w, "length": LENGTH}) + "\n"
                               for e, w in enumerate([1.0, 0.0, 0.5])))
    with EpisodeStore.open(store_path) as store:
        t = OmegaConf.create({"episode_weights": str(weights), "intervention_weight": 3.0})
        w = step_weights(t, store)
        flags = store.load(["intervention"])["intervention"]
        expect = np.repeat([1.0, 0.0, 0.5], LENGTH) * np.where(flags, 3.0, 1.0)
        np.testing.assert_allclose(w, expect)
        ds = SequenceDataset(store, horizon=4, n_obs_steps=1, n_action_steps=4, step_weights=w)
        b = ds.get_batch([0, len(ds) - 1])
        np.testing.assert_allclose(b["weight"][0], expect[ds.index.rows(0)[0]])
        assert b["weight"].shape == (2, 4)
        assert step_weights(OmegaConf.create({"episode_weights": None, "intervention_weight": None}), store) is None
        weights.write_text(json.dumps({"episode": 0, "weight": 1.0}) + "\n")
        with pytest.raises(CLIError, match="has no line for episode 1"):
            step_weights(OmegaConf.create({"episode_weights": str(weights), "intervention_weight": None}), store)
    plain = make_flagged(tmp_path / "p.zarr", 1)
    with EpisodeStore.open(plain) as store, pytest.raises(CLIError, match="needs an 'intervention' flag"):
        step_weights(OmegaConf.create({"episode_weights": None, "intervention_weight": 2.0}), store)
    with pytest.raises(ValueError, match="every weight is 0"):
        w0 = tmp_path / "w0.jsonl"
        w0.write_text(json.dumps({"episode": 0, "weight": 0}) + "\n")
        episode_weights(w0, 1)


def test_a_camera_only_store_is_audited_on_pooled_frames(tmp_path, capsys):
    schema = {"cam": KeySpec((16, 16, 3), "uint8", "obs"), "action": KeySpec((2,), "float32", "action")}
    rng = np.random.default_rng(0)
    with EpisodeStore.create(tmp_path / "cam.zarr", schema, fps=10) as s:
        for i in range(6):
            frames = np.zeros((12, 16, 16, 3), np.uint8)
            for t in range(12):  # a bright square sliding right; the action says how far
                frames[t, 4:8, t:t + 4] = 200
            s.append_episode({"cam": frames, "action": np.tile([1.0, 0.0], (12, 1)).astype(np.float32)
                              + rng.normal(0, 0.01, (12, 2)).astype(np.float32)})
    assert main(["data", "audit", str(tmp_path / "cam.zarr"), f"out={tmp_path / 'a'}", "fit_steps=20",
                 "progress=false"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["state_from_cameras"] and summary["state_keys"] == ["cam"] and summary["episodes"] == 6
    assert "names no task" in summary["videos_note"]
