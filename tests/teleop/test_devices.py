"""Devices: the keyboard throttle, event logs and replay, the gamepad's joystick protocol, SpaceMouse reports,
device names. Real files and FIFOs; no hardware is needed (none is on this machine)."""
from __future__ import annotations

import json
import os
import struct
import time

import numpy as np
import pytest

from robolearn.teleop.devices import (
    JS_AXIS,
    JS_BUTTON,
    JS_INIT,
    DeviceError,
    DeviceSet,
    EventLog,
    GamepadDevice,
    KeyboardDevice,
    ReplayDevice,
    SpaceMouseDevice,
    parse_device,
    parse_spacemouse_report,
)

# GLFW codes: arrows, Space, Enter, Escape, F8 (save), Insert (gripper); S and G are the viewer's (shadow, fog).
UP, DOWN, RIGHT, SPACE, ENTER, ESCAPE, F8, INSERT = 265, 264, 262, 32, 257, 256, 297, 260
KEY_S, KEY_G, KEY_A = 83, 71, 65


def test_keyboard_presses_are_a_throttle_and_events():
    kb = KeyboardDevice()
    for code in (UP, UP, RIGHT, KEY_A, KEY_S, ENTER):  # letters are the viewer's: ignored, not logged
        kb.press(code)
    raw = kb.read_raw()
    assert raw == {"keys": ["Up", "Up", "Right", "Enter"]}
    cmd = kb.interpret(raw)
    np.testing.assert_allclose(cmd.twist, [1 / 3, 2 / 3, 0, 0, 0, 0])
    assert cmd.events == ["start"]
    assert kb.read_raw() is None  # drained
    # Held without new presses; four more Ups saturate at 3 steps; the opposite key takes one away.
    np.testing.assert_allclose(kb.interpret(None).twist[:2], [1 / 3, 2 / 3])
    cmd = kb.interpret({"keys": ["Up"] * 4 + ["Down", "F8", "Insert"]})
    np.testing.assert_allclose(cmd.twist[:2], [1 / 3, 2 / 3])
    assert cmd.events == ["save", "gripper"]
    assert not kb.interpret({"keys": ["Space"]}).twist.any()
    kb.press(ESCAPE)
    kb.press(KEY_G)
    kb.press(INSERT)
    assert kb.interpret(kb.read_raw()).events == ["quit", "gripper"]
    kb.interpret({"keys": ["Left"]})
    kb.halt()
    assert not kb.interpret(None).twist.any()


def test_event_log_replays_the_same_commands_tick_by_tick(tmp_path):
    path = tmp_path / "events.jsonl"
    kb = KeyboardDevice()
    live = DeviceSet([kb], EventLog(path, {"task": "push_t", "device": "keyboard", "sources": ["keyboard"],
                                           "seed": 5}))
    presses = {0: [ENTER, RIGHT], 3: [UP, UP], 4: [SPACE], 7: [F8]}
    commands = []
    for tick in range(9):
        for code in presses.get(tick, []):
            kb.press(code)
        commands.append(live.poll(tick))
    live.close(end_tick=9)
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert lines[0]["format"] == "robolearn-teleop-events" and lines[0]["seed"] == 5
    assert [ln.get("t") for ln in lines[1:-1]] == [0, 3, 4, 7] and lines[-1] == {"end": 9}

    replay = ReplayDevice(path)
    assert replay.recorded_device == "keyboard" and replay.header["task"] == "push_t"
    for tick, want in enumerate(commands):
        got = replay.poll(tick)
        np.testing.assert_array_equal(got.twist, want.twist)
        assert got.events == want.events
    assert replay.poll(9).events == ["quit"] and replay.quit_reason == "end of the replay log"


def _js(value: int, kind: int, number: int, ms: int = 0) -> bytes:
    return struct.pack("<IhBB", ms, value, kind, number)


def test_gamepad_reads_the_linux_joystick_protocol(tmp_path):
    fifo = tmp_path / "js0"
    os.mkfifo(fifo)
    writer_fd = os.open(fifo, os.O_RDWR)  # opened first, so the device's non-blocking open finds a writer
    pad = GamepadDevice(str(fifo))
    try:
        os.write(writer_fd, _js(0, JS_AXIS | JS_INIT, 0) + _js(32767, JS_AXIS, 0) + _js(-32767, JS_AXIS, 1)
                 + _js(1, JS_BUTTON, 0))
        deadline = time.monotonic() + 5
        raw = None
        while raw is None or raw["buttons"][0] != 1 or raw["axes"][1] != -1.0:
            assert time.monotonic() < deadline, f"the gamepad thread never saw the events (last: {raw})"
            raw = pad.read_raw() or raw
            time.sleep(0.01)
        cmd = pad.interpret(raw)
        np.testing.assert_allclose(cmd.twist[:2], [1.0, 1.0])  # stick right and pushed away (-y on the pad)
        assert cmd.events == ["gripper"]  # A, on the press
        assert pad.interpret(None).events == []  # still held: no second press
        os.write(writer_fd, _js(0, JS_BUTTON, 0) + _js(3000, JS_AXIS, 0))  # release; x inside the dead zone
        deadline = time.monotonic() + 5
        while True:
            raw2 = pad.read_raw()
            if raw2 is not None and raw2["buttons"][0] == 0 and raw2["axes"][0] < 0.5:
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pad.interpret(raw2).twist[0] == 0.0
    finally:
        pad.close()
        os.close(writer_fd)


def test_gamepad_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(DeviceError, match="cannot open gamepad .*nope"):
        GamepadDevice(str(tmp_path / "nope"))


def test_spacemouse_reports_and_missing_hid_message():
    axes, buttons = parse_spacemouse_report(bytes([1]) + struct.pack("<6h", 350, -175, 0, 0, 0, 350))
    assert axes == {0: 1.0, 1: -0.5, 2: 0.0, 3: 0.0, 4: 0.0, 5: 1.0} and buttons == {}
    axes, _ = parse_spacemouse_report(bytes([2]) + struct.pack("<3h", 0, 0, -350))
    assert axes == {3: 0.0, 4: 0.0, 5: -1.0}
    assert parse_spacemouse_report(bytes([3, 0b10]))[1] == {0: 0, 1: 1}
    sm = SpaceMouseDevice(live=False)
    cmd = sm.interpret({"axes": [1.0, -1.0, 0.0, 0.0, 0.0, 1.0], "buttons": [1, 0]})
    np.testing.assert_allclose(cmd.twist, [1, 1, 0, 0, 0, -1])
    assert cmd.events == ["gripper"]
    try:
        import hid  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError, match=r"pip install hidapi"):
            SpaceMouseDevice()
    else:  # pragma: no cover - with the package but (here) without the device
        with pytest.raises(DeviceError, match="no SpaceMouse found"):
            SpaceMouseDevice()


@pytest.mark.parametrize("spec, want", [("keyboard", ("keyboard", None)), ("Spacemouse", ("spacemouse", None)),
                                        ("gamepad", ("gamepad", None)),
                                        ("gamepad:/dev/input/js1", ("gamepad", "/dev/input/js1")),
                                        ("replay:x.jsonl", ("replay", "x.jsonl"))])
def test_device_names(spec, want):
    assert parse_device(spec) == want


@pytest.mark.parametrize("spec", ["foo", "keyboard:1", "mouse"])
def test_bad_device_names_list_the_valid_ones(spec):
    with pytest.raises(DeviceError, match=r"unknown device .*valid devices: keyboard, spacemouse, gamepad"):
        parse_device(spec)


def test_bad_replay_logs(tmp_path):
    with pytest.raises(DeviceError, match="needs a file"):
        parse_device("replay:")
    with pytest.raises(DeviceError, match="does not exist"):
        ReplayDevice(tmp_path / "none.jsonl")
    (tmp_path / "a.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(DeviceError, match="not a robolearn teleop event log"):
        ReplayDevice(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"format": "robolearn-teleop-events", "version": 1, "sources": ["keyboard"]}\n'
                                      '{"t": 1, "gamepad": {"axes": []}}\n')
    with pytest.raises(DeviceError, match=r"line 2: input from \['gamepad'\]"):
        ReplayDevice(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"format": "robolearn-teleop-events", "version": 1}\nnot json\n')
    with pytest.raises(DeviceError, match="line 2: not JSON"):
        ReplayDevice(tmp_path / "c.jsonl")


def test_bound_keys_are_not_the_viewers_shortcuts():
    import mujoco

    from robolearn.teleop.controls import GLFW_KEYS, KEY_EVENTS, KEY_MOTION, SHARED_WITH_VIEWER, VIEWER_KEYS

    # The viewer's flag shortcuts, read from MuJoCo itself (S shadow, R reflection, K skybox, G fog, L additive...).
    flags = {ord(row[2].upper()) for row in (*mujoco.mjRNDSTRING, *mujoco.mjVISSTRING) if row[2]}
    assert {ord(c) for c in "SRKGL"} <= flags
    assert flags <= set(VIEWER_KEYS), sorted(flags - set(VIEWER_KEYS))
    clash = {code: GLFW_KEYS[code] for code in set(GLFW_KEYS) & set(VIEWER_KEYS) - SHARED_WITH_VIEWER}
    assert not clash, f"teleop binds keys MuJoCo's viewer acts on: {clash}"
    assert {GLFW_KEYS[c] for c in SHARED_WITH_VIEWER} == {"Escape", "Backspace"}
    # Every bound name does something, and every action has a key.
    assert set(GLFW_KEYS.values()) == set(KEY_MOTION) | set(KEY_EVENTS) | {"Space"}
    assert set(KEY_EVENTS.values()) == {"start", "save", "discard", "reset", "takeover", "handback", "gripper",
                                        "quit"}
    assert sorted(KEY_MOTION.values()) == [(a, s) for a in range(6) for s in (-1, 1)]


def test_an_event_log_never_overwrites_a_file(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("precious\n")
    with pytest.raises(FileExistsError):
        EventLog(path, {"task": "push_t"})
    assert path.read_text() == "precious\n"


def test_quit_records_end_a_replay_before_that_ticks_inputs(tmp_path):
    path = tmp_path / "events.jsonl"
    log = EventLog(path, {"task": "push_t", "device": "keyboard", "sources": ["keyboard"], "seed": 0})
    log.tick(2, {"keyboard": {"keys": ["Enter"]}})
    log.quit(5, "window closed")
    log.close(end_tick=5)  # never before the last record: the end is written as tick 6
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert lines[-2:] == [{"t": 5, "quit": "window closed"}, {"end": 6}]
    replay = ReplayDevice(path)
    assert replay.poll(2).events == ["start"] and replay.poll(4).events == []
    assert replay.poll(5).events == ["quit"] and replay.quit_reason == "window closed"
