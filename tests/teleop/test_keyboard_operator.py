"""The keyboard is enough to do the task: a simulated operator who only presses keys (as MuJoCo's viewer reports
them) lifts the cube in robosuite's lift. Its presses are logged like a live session's; replaying the log through
``robolearn teleop`` reproduces the very same successful episode."""
from __future__ import annotations

import numpy as np

import sim
from robolearn.cli import main
from robolearn.cli.collect import schema_for
from robolearn.data import EpisodeStore, KeySpec
from robolearn.teleop.devices import KEY_LEVELS, DeviceSet, EventLog, KeyboardDevice
from robolearn.teleop.session import Pacer, TeleopSession
from robolearn.teleop.tasks import control_for

# GLFW codes of the keys this operator uses.
CODE = {"Enter": 257, "F8": 297, "Insert": 260, "Space": 32, "Up": 265, "Down": 264, "Right": 262, "Left": 263,
        "Home": 268, "End": 269}
# (axis of the view-frame twist, key that adds a speed step, key that removes one)
AXES = [(0, "Right", "Left"), (1, "Up", "Down"), (2, "Home", "End")]


class KeyOperator:
    """Looks at the scene and presses keys: over the cube, down, close the gripper, up.

    In lift's view (from the front, facing the robot) right is +y, forward (Up) is -x, Home is +z.
    """

    def __init__(self, keyboard: KeyboardDevice) -> None:
        self.kb = keyboard
        self.levels = np.zeros(3, dtype=int)  # what the operator believes the throttle is at
        self.phase, self.wait = "start", 0

    def press(self, *names: str) -> None:
        for n in names:
            self.kb.press(CODE[n])

    def throttle(self, want: np.ndarray) -> None:
        for axis, plus, minus in AXES:
            delta = int(want[axis]) - self.levels[axis]
            self.press(*([plus] * delta if delta > 0 else [minus] * -delta))
        self.levels = np.asarray(want, dtype=int)

    @staticmethod
    def levels_for(err: np.ndarray, tol: float) -> np.ndarray:
        """One speed step per 2.5 cm of error (at least one outside ``tol``), as a person eases off near a goal."""
        steps = np.clip(np.ceil(np.abs(err) / 0.025), 1, KEY_LEVELS) * np.sign(err)
        return np.where(np.abs(err) > tol, steps, 0).astype(int)

    def act(self, obs: dict[str, np.ndarray], success: bool) -> None:
        hand, cube = obs["robot0_eef_pos"], obs["object"][:3]
        err_world = cube - hand
        err_view = np.array([err_world[1], -err_world[0], err_world[2]])  # right, forward, up
        if self.phase == "start":
            self.press("Enter")
            self.phase = "over"
        elif self.phase == "over":  # above the cube, 8 cm up
            err_view[2] += 0.08
            self.throttle(self.levels_for(err_view, 0.005))
            if np.abs(err_view[:2]).max() < 0.005 and abs(err_view[2]) < 0.02:
                self.phase = "down"
        elif self.phase == "down":
            err_view[2] += 0.005
            self.throttle(self.levels_for(err_view, 0.004))
            if abs(err_view[2]) < 0.006:
                self.throttle(np.zeros(3))
                self.press("Insert")
                self.phase, self.wait = "grip", 12
        elif self.phase == "grip":
            self.wait -= 1
            if self.wait == 0:
                self.throttle(np.array([0, 0, 2]))
                self.phase = "up"
        elif self.phase == "up" and success:
            self.press("F8")
            self.phase = "done"


def test_a_keyboard_operator_lifts_the_cube_and_the_log_replays_it(tmp_path, capsys):
    env = sim.make("lift")
    schema = {**schema_for(env), "intervention": KeySpec((), "bool", "flag")}
    out, log = tmp_path / "lift.zarr", tmp_path / "lift.jsonl"
    store = EpisodeStore.create(out, schema, fps=20, task="lift", env_config=env.unwrapped.env_config())
    keyboard = KeyboardDevice()
    device = DeviceSet([keyboard], EventLog(log, {"task": "lift", "device": "keyboard", "sources": ["keyboard"],
                                                   "seed": 0, "env_config": env.unwrapped.env_config()}))
    session = TeleopSession(env, control_for("lift", env), device, store, device_label="keyboard", seed=0,
                            max_episodes=1, echo=False)
    operator = KeyOperator(keyboard)
    pacer = Pacer(0.05, realtime=False)
    while not session.quit and session.tick_index < 400:
        if session.tick_index > 0:  # the first tick resets the scene; the operator looks at it after that
            operator.act(session.obs, bool(session.info.get("success", False)))
        pacer.wait()
        session.tick()
    device.close(session.tick_index)
    store.close()
    env.close()
    assert session.quit_reason == "1 episodes saved", session.message
    saved = EpisodeStore.open(out)
    attrs = saved.episode_attrs(0)
    assert attrs["success"] is True and attrs["device"] == "keyboard"
    ep = saved.get_episode(0)
    z = ep["object"][:, 2]
    assert z[-1] > z.min() + 0.01  # off the table (the task ends at success: robosuite's height threshold)
    assert set(np.unique(ep["action"][:, 6])) == {-1.0, 1.0}  # open, then closed
    assert len(ep["action"]) < 200

    # The same key presses, replayed from the log by the command, give the same episode.
    assert main(["teleop", f"device=replay:{log}", f"out={tmp_path / 'replayed.zarr'}"]) == 0
    replayed = EpisodeStore.open(tmp_path / "replayed.zarr")
    assert replayed.episode_attrs(0)["success"] is True
    for k, v in ep.items():
        np.testing.assert_array_equal(replayed.get_episode(0)[k], v)
