"""Replayed sessions through ``robolearn teleop`` (headless): the store they make, scripted stores they extend,
robosuite's lift, and intervention mode with a policy trained by ``robolearn train`` on replayed episodes."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest

import sim
from robolearn.cli import main
from robolearn.cli.collect import schema_for
from robolearn.data import EpisodeStore, KeySpec

TINY_TRAIN = ["policy.backbone.preset=tiny", "training.batch_size=8", "training.warmup_steps=1",
              "training.progress=false", "training.steps=3", "training.log_every=1", "training.val_every=0",
              "training.ckpt_every=3", "eval.episodes=0"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# Two saved episodes and a discarded attempt in between (same scene again, so seeds 3 and 4).
PUSH_T_SESSION = {0: ["Enter", "Right", "Right"], 5: ["Up"], 10: ["F8"], 11: ["Enter", "Left"], 15: ["Delete"],
                  16: ["Enter", "Down"], 20: ["Space"], 25: ["F8"]}


def test_replayed_push_t_session_makes_the_expected_store(tmp_path, capsys, write_log):
    log = write_log(tmp_path / "events.jsonl", PUSH_T_SESSION, seed=3, end=27)
    out = tmp_path / "teleop.zarr"
    assert main(["teleop", f"device=replay:{log}", f"out={out}"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes_saved"] == 2 and summary["episodes_discarded"] == 1 and summary["ticks"] == 28
    assert summary["quit_reason"] == "end of the replay log" and summary["intervention_flag"] is True

    store = EpisodeStore.open(out)  # validates
    assert store.task == "push_t" and store.fps == 10.0
    env = sim.make("push_t")
    assert store.env_config == env.unwrapped.env_config()
    assert store.schema == {**schema_for(env), "intervention": KeySpec((), "bool", "flag")}
    np.testing.assert_array_equal(store.episode_lengths, [10, 9])  # ticks 0-9; 16-24 (the retry)
    attrs = store.all_episode_attrs()
    assert [a["seed"] for a in attrs] == [3, 4] and [a["steps"] for a in attrs] == [10, 9]
    for a in attrs:
        assert a["source"] == "teleop" and a["device"] == "keyboard" and a["replayed_from"] == str(log)
        assert a["intervention_steps"] == a["steps"]
        started = datetime.datetime.fromisoformat(a["started_at"])
        assert started <= datetime.datetime.fromisoformat(a["saved_at"])
    ep0, ep1 = store.get_episode(0), store.get_episode(1)
    assert ep0["intervention"].dtype == bool and ep0["intervention"].all()
    # Right twice: 2/3 of 0.15 m/s at 10 Hz -> the pusher target moves 1 cm per tick along +x; Up from tick 5.
    start = ep0["agent_pos"][0].astype(np.float64)
    np.testing.assert_allclose(ep0["action"][:5], start + np.outer(np.arange(1, 6), [0.01, 0.0]), atol=1e-6)
    np.testing.assert_allclose(np.diff(ep0["action"][4:], axis=0), [[0.01, 0.005]] * 5, atol=1e-6)
    # The retry starts from rest (the Left of the discarded attempt is forgotten): Down for 4 ticks, then Space.
    np.testing.assert_allclose(np.diff(ep1["action"], axis=0)[:3], [[0.0, -0.005]] * 3, atol=1e-6)
    np.testing.assert_allclose(np.diff(ep1["action"], axis=0)[4:], 0.0, atol=1e-7)
    # Same scene as a plain reset with that seed: episodes begin at the reset observation.
    obs, _ = env.reset(seed=4)
    np.testing.assert_array_equal(ep1["agent_pos"][0], obs["agent_pos"])
    assert main(["data", "validate", str(out)]) == 0

    # The replay is deterministic: again, into another store, the very same arrays.
    out2 = tmp_path / "again.zarr"
    assert main(["teleop", f"device=replay:{log}", f"out={out2}"]) == 0
    again = EpisodeStore.open(out2)
    for i in range(2):
        for k, v in store.get_episode(i).items():
            np.testing.assert_array_equal(again.get_episode(i)[k], v)


def test_teleop_appends_to_a_scripted_store(tmp_path, capsys, write_log):
    out = tmp_path / "push_t.zarr"
    assert main(["collect", "task=push_t", "episodes=1", f"out={out}", "progress=false"]) == 0
    next_seed = EpisodeStore.open(out).attrs["collect"]["next_seed"]
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter", "Up"], 4: ["F8"]}, seed=None, end=5)
    assert main(["teleop", f"device=replay:{log}", f"out={out}"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["intervention_flag"] is False
    store = EpisodeStore.open(out)
    assert store.n_episodes == 2 and "intervention" not in store.schema
    assert store.episode_attrs(0)["source"] == "scripted"  # the scripted one
    assert store.episode_attrs(1)["source"] == "teleop" and store.episode_attrs(1)["seed"] == next_seed
    assert store.attrs["teleop"]["next_seed"] == next_seed + 1
    # The root no longer claims that every episode came from the scripted expert.
    assert store.attrs["source"]["kind"] == "mixed"
    assert [s["source"] for s in store.attrs["source"]["sources"]] == ["scripted", "teleop"]


def test_replayed_lift_session_drives_the_arm_and_gripper(tmp_path, capsys, write_log):
    # Up is "away from the viewer": the viewer looks at the robot from the front, so that is -x in the world.
    log = write_log(tmp_path / "lift.jsonl", {0: ["Enter", "Up", "End"], 3: ["Insert", "7"], 6: ["F8"]},
                    task="lift", seed=0, end=7)
    out = tmp_path / "lift.zarr"
    assert main(["teleop", f"device=replay:{log}", f"out={out}"]) == 0
    assert last_json(capsys.readouterr().out)["episodes_saved"] == 1
    store = EpisodeStore.open(out)
    ep = store.get_episode(0)
    assert store.task == "lift" and store.fps == 20 and ep["action"].shape == (6, 7)
    np.testing.assert_allclose(ep["action"][:, :3], [[-1 / 3, 0.0, -1 / 3]] * 6, atol=1e-6)
    np.testing.assert_allclose(ep["action"][:, 6], [-1, -1, -1, 1, 1, 1])  # Insert closes the gripper at tick 3
    np.testing.assert_allclose(ep["action"][:, 5], [0, 0, 0, 0.1, 0.1, 0.1], atol=1e-6)  # 7: yaw, 1 step of 3
    np.testing.assert_allclose(ep["action"][:, 3:5], 0.0, atol=1e-7)
    assert ep["robot0_eef_pos"][-1][2] < ep["robot0_eef_pos"][0][2]  # the hand went down


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A push_t store recorded by replaying a log, and a tiny policy trained on it by ``robolearn train``."""
    tmp = tmp_path_factory.mktemp("intervention")
    log = tmp / "demo.jsonl"
    keys = {0: ["Enter", "Right"], 12: ["F8"], 13: ["Enter", "Up"], 25: ["F8"], 26: ["Enter", "Left", "Down"],
            38: ["F8"]}
    header = {"format": "robolearn-teleop-events", "version": 1, "task": "push_t", "device": "keyboard",
              "sources": ["keyboard"], "seed": 0}
    log.write_text("".join(json.dumps(x) + "\n" for x in
                           [header, *({"t": t, "keyboard": {"keys": k}} for t, k in keys.items()), {"end": 39}]))
    data = tmp / "demos.zarr"
    assert main(["teleop", f"device=replay:{log}", f"out={data}"]) == 0
    run = tmp / "run"
    assert main(["train", "task=push_t", f"dataset={data}", f"run_dir={run}", *TINY_TRAIN]) == 0
    return data, run / "checkpoints" / "latest"


def test_a_policy_trained_on_teleop_data_runs_with_interventions(trained, tmp_path, capsys, write_log):
    data, ckpt = trained
    assert EpisodeStore.open(data).n_episodes == 3
    assert (ckpt / "model.safetensors").is_file()  # `robolearn train` took the store, intervention flag and all
    capsys.readouterr()
    # The policy drives; F9 at tick 3 (with a Right press) takes over, F10 at 8 hands back (that tick is still the
    # operator's), F8 at 12 saves. Then: F9 at 14, discard at 16 (the same scene again), save after 3 policy steps.
    # The log's header says how the live session ran the policy: the replay runs it the same way.
    log = write_log(tmp_path / "int.jsonl", {3: ["F9", "Right"], 8: ["F10"], 12: ["F8"], 14: ["F9"], 16: ["Delete"],
                                             20: ["F8"]}, seed=7, end=21,
                    header={"policy": str(ckpt), "mode": "sync", "latency_s": 0.0, "rate_hz": 10.0})
    out = tmp_path / "dagger.zarr"
    assert main(["teleop", f"device=replay:{log}", f"policy={ckpt}", f"out={out}"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["episodes_saved"] == 2 and summary["episodes_discarded"] == 1 and summary["policy"] == str(ckpt)
    assert (summary["mode"], summary["latency_s"], summary["rate_hz"], summary["replans"]) == ("sync", 0.0, 10.0, 1)
    assert summary["deadline_misses"] == 0  # sync with no latency: never waits
    store = EpisodeStore.open(out)
    ep0, ep1 = store.get_episode(0), store.get_episode(1)
    np.testing.assert_array_equal(ep0["intervention"], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(ep1["intervention"], [0, 0, 0])
    # While the operator drives, the target moves 0.5 cm per tick along +x from where the policy left it.
    np.testing.assert_allclose(np.diff(ep0["action"][2:9], axis=0), [[0.005, 0.0]] * 6, atol=1e-6)
    a0, a1 = store.all_episode_attrs()
    assert (a0["source"], a0["policy"], a0["intervention_steps"], a0["seed"]) == ("intervention", str(ckpt), 6, 7)
    assert (a1["intervention_steps"], a1["seed"]) == (0, 8)  # the discarded try was scene 8; so is the saved one
    # A scripted store has no intervention flag: intervention mode refuses to write into it.
    scripted = tmp_path / "scripted.zarr"
    assert main(["collect", "task=push_t", "episodes=1", f"out={scripted}", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["teleop", f"device=replay:{log}", f"policy={ckpt}", f"out={scripted}"]) == 1
    assert "no per-step 'intervention' flag" in capsys.readouterr().err
