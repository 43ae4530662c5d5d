"""The session on its own, headless, with real push_t and real stores: what the overlay says, a save that fails,
the handback to a policy (no stale actions), quit records in the event log, and the viewer's mouse forces."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sim
from robolearn.cli import main
from robolearn.cli.collect import schema_for
from robolearn.data import EpisodeStore, KeySpec
from robolearn.teleop.devices import DeviceSet, EventLog, KeyboardDevice, ReplayDevice
from robolearn.teleop.session import Pacer, TeleopSession, run_intervention
from robolearn.teleop.tasks import control_for
from robolearn.teleop.viewer import mujoco_handles

CODE = {"Enter": 257, "F8": 297, "Up": 265, "Right": 262}


@pytest.fixture
def push_t():
    env = sim.make("push_t")
    yield env
    env.close()


def _store(env, path) -> EpisodeStore:
    schema = {**schema_for(env), "intervention": KeySpec((), "bool", "flag")}
    return EpisodeStore.create(path, schema, fps=10, task="push_t", env_config=env.unwrapped.env_config())


def _session(env, store, device, **kw) -> TeleopSession:
    return TeleopSession(env, control_for("push_t", env), device, store, device_label="keyboard",
                         seed=kw.pop("seed", 3), echo=False, handles=mujoco_handles, **kw)


def _rows(texts, corner="topleft") -> dict[str, str]:
    left, right = next((lft, rgt) for c, lft, rgt in texts if c == corner)
    return dict(zip(left.split("\n"), right.split("\n")))


def test_overlay_shows_saved_count_length_success_and_driver(push_t, tmp_path, write_log):
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter", "Right"], 3: ["F8"], 4: ["Enter"]}, end=50)
    session = _session(push_t, _store(push_t, tmp_path / "s.zarr"), ReplayDevice(log))
    session.tick()
    rows = _rows(session.overlay())
    assert rows["State"] == "RECORDING" and rows["Episode length"] == "1 steps (0.1 s)"
    assert (rows["Saved episodes"], rows["Success"], rows["Driver"], rows["Scene (seed)"]) == ("0", "no", "human", "3")
    for _ in range(6):
        session.tick()
    rows = _rows(session.overlay())
    assert rows["Saved episodes"] == "1" and rows["Episode length"] == "3 steps (0.3 s)" and rows["Scene (seed)"] == "4"
    keys = _rows(session.overlay(), "bottomleft")
    assert keys["F8"] == "save" and keys["Del"] == "discard" and keys["arrows"] == "move"
    assert "F9" not in keys and "Home/End" not in keys  # no policy; push_t moves in the plane only
    assert session.overlay()[-1] == ("topright", "recording (scene 4)", "")  # the last message

    # Intervention mode: who drives, and the keys that change it.
    log = write_log(tmp_path / "p.jsonl", {1: ["F9"]}, end=50)
    session = _session(push_t, _store(push_t, tmp_path / "p.zarr"), ReplayDevice(log), policy_label="ckpt")
    session.begin_episode()
    assert _rows(session.overlay())["Driver"] == "policy (F9 takes over)"
    session.tick(np.zeros(2))
    session.tick(np.zeros(2))
    assert _rows(session.overlay())["Driver"] == "OPERATOR (F10 hands back)"
    assert _rows(session.overlay(), "bottomleft")["F10"] == "hand back"


def test_a_failed_save_keeps_the_episode_for_another_try(push_t, tmp_path, write_log):
    out = tmp_path / "s.zarr"
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter", "Up"], 3: ["F8"], 5: ["F8"]}, end=6)
    store = _store(push_t, out)
    session = _session(push_t, store, ReplayDevice(log))
    for _ in range(3):
        session.tick()
    store.close()  # the store goes away under the session (a lost disk, a lock taken back): not writable
    session.tick()  # F8
    assert session.saved == 0 and session.recorded_steps == 3 and session.state == "done"
    assert session.save_error and "StoreError" in session.save_error
    assert _rows(session.overlay())["State"].startswith("DONE (save failed)")
    corner, message, _ = session.overlay()[-1]
    assert corner == "topright" and message.startswith("SAVE FAILED, the episode (3 steps) is kept: F8 tries again")
    session.tick()  # frozen while it waits: nothing recorded, nothing lost
    assert session.recorded_steps == 3
    session.store = EpisodeStore.open(out, mode="a")
    session.tick()  # F8 again
    assert session.saved == 1 and session.save_error is None
    session.store.close()
    saved = EpisodeStore.open(out)
    assert saved.n_episodes == 1 and saved.episode_lengths[0] == 3 and saved.episode_attrs(0)["seed"] == 3


STEP = 0.002


class PusherChunkPolicy:
    """A real chunk policy for push_t that shows where its chunks come from: action ``i`` of the executed part is
    the pusher position it observed plus ``(i + 1) * STEP`` along +y."""

    horizon, n_obs_steps, n_action_steps, action_dim = 16, 2, 8, 2
    obs_keys = ["agent_pos"]
    obs_shapes = {"agent_pos": (2,)}

    def reset(self) -> None:
        pass

    def predict_action(self, obs_history, noise=None):
        pos = obs_history["agent_pos"][:, -1].to(torch.float64)
        j = torch.arange(self.horizon, dtype=torch.float64) - (self.n_obs_steps - 1) + 1
        chunk = pos[:, None, :].repeat(1, self.horizon, 1)
        chunk[:, :, 1] += j[None] * STEP
        return chunk.float()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_after_a_handback_the_policy_acts_on_a_chunk_inferred_after_it(push_t, tmp_path, write_log, mode):
    # Policy drives; F9 at tick 3 takes over (Right: +x at 0.5 cm per tick); F10 at 8 hands back; F8 at 15 saves.
    log = write_log(tmp_path / "e.jsonl", {3: ["F9", "Right"], 8: ["F10"], 15: ["F8"]}, seed=5, end=16)
    out = tmp_path / "s.zarr"
    session = _session(push_t, _store(push_t, out), ReplayDevice(log), policy_label="pusher", seed=5)
    result = run_intervention(session, PusherChunkPolicy(), 10.0, realtime=False, mode=mode, latency_s=0.25)
    session.store.close()
    assert result["replans"] == 1 and result["episodes_saved"] == 1
    ep = EpisodeStore.open(out).get_episode(0)
    np.testing.assert_array_equal(ep["intervention"], [0, 0, 0] + [1] * 6 + [0] * 6)
    pos, action = ep["agent_pos"].astype(np.float64), ep["action"].astype(np.float64)
    # The operator moved the pusher: what the policy saw before the handback is far from where it is now.
    assert pos[9, 0] - pos[5, 0] > 0.01
    # From tick 9 on, the actions are the chunk inferred from tick 9's observation, taken in order.
    for i in range(4):
        np.testing.assert_allclose(action[9 + i], pos[9] + [0.0, (i + 1) * STEP], atol=1e-6)


SESSION = {0: ["Enter", "Right"], 4: ["F8"], 5: ["Enter", "Up"]}


def test_a_quit_without_polling_is_logged_and_replays_to_the_same_episodes(push_t, tmp_path, capsys):
    log_path, out = tmp_path / "live.jsonl", tmp_path / "live.zarr"
    store = _store(push_t, out)
    keyboard = KeyboardDevice()
    device = DeviceSet([keyboard], EventLog(log_path, {"task": "push_t", "device": "keyboard",
                                                       "sources": ["keyboard"], "seed": 3,
                                                       "env_config": push_t.unwrapped.env_config()}))
    session = _session(push_t, store, device)
    pacer = Pacer(0.1, realtime=False)
    while not session.quit:
        for name in SESSION.get(session.tick_index, []):
            keyboard.press(CODE[name])
        if session.tick_index == 9:  # F8 pressed, and Ctrl-C comes before the next tick polls it
            keyboard.press(CODE["F8"])
            session.interrupt = True
        pacer.wait()
        session.tick()
    device.close(session.tick_index)
    store.close()
    assert session.quit_reason == "interrupted (Ctrl-C)" and session.saved == 1 and session.tick_index == 10
    records = [json.loads(ln) for ln in log_path.read_text().splitlines()][1:]
    assert records[-2:] == [{"t": 9, "quit": "interrupted (Ctrl-C)"}, {"end": 10}]
    live = EpisodeStore.open(out)

    def replay(path, name):
        assert main(["teleop", f"device=replay:{path}", f"out={tmp_path / name}"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["quit_reason"] == "interrupted (Ctrl-C)" and summary["ticks"] == 10
        again = EpisodeStore.open(tmp_path / name)
        assert again.n_episodes == live.n_episodes == 1
        for k, v in live.get_episode(0).items():
            np.testing.assert_array_equal(again.get_episode(0)[k], v)

    replay(log_path, "a.zarr")
    # Inputs logged at the quit tick (an older writer polled first) are not replayed: the quit comes first.
    lines = log_path.read_text().splitlines()
    lines[-2] = json.dumps({"t": 9, "quit": "interrupted (Ctrl-C)", "keyboard": {"keys": ["F8"]}})
    with_keys = tmp_path / "with_keys.jsonl"
    with_keys.write_text("\n".join(lines) + "\n")
    replay(with_keys, "b.zarr")


def test_mouse_forces_from_the_viewer_do_not_reach_recorded_steps(tmp_path, write_log):
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter", "Up"], 8: ["F8"]}, end=9)
    episodes = []
    for push in (False, True):
        env = sim.make("push_t")
        model, data = mujoco_handles(env)
        block = model.body("block").id
        out = tmp_path / f"s{int(push)}.zarr"
        session = _session(env, _store(env, out), ReplayDevice(log))
        while not session.quit:
            if push:  # what the viewer's Ctrl+right-drag writes at its sync, between two ticks
                data.xfrc_applied[block] = [40.0, 40.0, 0.0, 0.0, 0.0, 5.0]
            session.tick()
        session.store.close()
        env.close()
        episodes.append(EpisodeStore.open(out).get_episode(0))
    for k, v in episodes[0].items():
        np.testing.assert_array_equal(episodes[1][k], v)
    # The forces are large: left in place during a step, they move the block.
    env = sim.make("push_t")
    model, data = mujoco_handles(env)
    moved = []
    for force in (0.0, 40.0):
        obs, _ = env.reset(seed=3)
        data.xfrc_applied[model.body("block").id] = [force, force, 0.0, 0.0, 0.0, 0.0]
        moved.append(env.step(np.asarray(obs["agent_pos"], dtype=np.float32))[0]["block_pose"])
    env.close()
    assert np.abs(moved[1][:2] - moved[0][:2]).max() > 0.002
