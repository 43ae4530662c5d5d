"""Key bindings and the controls text of ``robolearn teleop --help``: plain data, cheap to import."""
from __future__ import annotations

# GLFW key codes (what MuJoCo's viewer passes to its key callback) -> the names used in logs and in --help.
GLFW_KEYS: dict[int, str] = {
    32: "Space", 256: "Escape", 257: "Enter", 335: "Enter", 259: "Backspace", 261: "Delete",
    262: "Right", 263: "Left", 264: "Down", 265: "Up", 266: "PageUp", 267: "PageDown", 268: "Home", 269: "End",
    54: "6", 55: "7", 56: "8", 57: "9", 71: "G", 75: "K", 76: "L", 82: "R", 83: "S",
}
# key -> (axis index in AXES, direction)
KEY_MOTION: dict[str, tuple[int, int]] = {
    "Right": (0, 1), "Left": (0, -1), "Up": (1, 1), "Down": (1, -1), "PageUp": (2, 1), "PageDown": (2, -1),
    "7": (3, 1), "6": (3, -1), "9": (4, 1), "8": (4, -1), "Home": (5, 1), "End": (5, -1),
}
KEY_EVENTS: dict[str, str] = {
    "Enter": "start", "S": "save", "Delete": "discard", "R": "reset", "Backspace": "reset",
    "K": "takeover", "L": "handback", "G": "gripper", "Escape": "quit",
}
KEY_STOP = "Space"
KEY_LEVELS = 3  # speed steps per axis: each press adds one, the opposite key takes one away


def controls_help() -> str:
    """The controls of every device, for ``robolearn teleop --help`` and the README."""
    return """\
controls (keyboard: keys in the viewer window; MuJoCo reports presses only, so motion keys are a throttle:
each press adds one of 3 speed steps along its axis, the opposite key takes one away, Space stops):
  Up / Down            forward / back            (push_t: +y/-y on the table, lift: away from / towards you)
  Right / Left         right / left
  PageUp / PageDown    up / down                 (tasks that move in 3-D)
  Home / End           yaw left / right          (peg_insert, lift, can, square)
  7 / 6                roll + / -                (robosuite tasks)
  9 / 8                pitch + / -               (robosuite tasks)
  Space                stop all motion
  G                    gripper close / open      (robosuite tasks)
  Enter                start recording an episode
  S                    save the episode (appended atomically to out=) and reset to a new scene
  Delete               discard the episode and retry the same scene
  R, Backspace         reset to a new scene (an unsaved episode is dropped)
  K / L                take over from the policy / hand back to it   (policy=CHECKPOINT)
  Escape               quit (so do closing the window and Ctrl-C; saved episodes are always kept)
spacemouse (3Dconnexion, HID): push/tilt/twist the cap to move; left button gripper, right button take over /
  hand back; episode keys on the keyboard as above.
gamepad (/dev/input/js*): left stick plane, right stick up/down and yaw, d-pad roll/pitch; A gripper,
  Start start, RB save, B discard, LB reset, X take over, Y hand back; keyboard keys work too.
replay:FILE: a log written by record_events=FILE drives the same code path as the live session did."""
