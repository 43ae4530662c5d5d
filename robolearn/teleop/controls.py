"""Key bindings and the controls text of ``robolearn teleop --help``: plain data, cheap to import.

MuJoCo's viewer keeps its own shortcuts while teleop listens to the same key presses, so teleop binds only keys the
viewer ignores. Checked against mujoco 3.9's viewer (``simulate``): its source, its tables, and keys pressed in a
passive viewer on Xvfb (teleop's changed nothing there). Letters and ``, ; ' ` \\ /`` toggle rendering and
visualization flags (``mujoco.mjRNDSTRING``: S shadow, W wireframe, R reflection, L additive, K skybox, G fog;
``mujoco.mjVISSTRING``: most other letters), digits 0-5 geom groups (Shift: site groups), F1-F5 help, info,
profiler, sensors and full screen, F6/F7 cycle frames and labels, Tab the side panels, ``[ ]`` cameras, PageUp
selects the parent body, Escape switches to the free camera and Backspace resets the simulation (the viewer writes
that reset into the environment's data at its next sync). Space, ``-``, ``=`` and the arrow keys act only in a
viewer that runs its own physics, not in the passive one teleop opens. Teleop therefore uses arrows, Home/End,
PageDown, Insert, Delete, Enter, Space, digits 6-9 and F8-F12; Escape (quit: the window goes away anyway) and
Backspace (reset: so the viewer's reset and the session's agree) are shared on purpose. The keypad is not used
(many laptops have none), except keypad Enter as Enter. :data:`VIEWER_KEYS` lists what the viewer uses, for the
tests.
"""
from __future__ import annotations

# GLFW key codes (what MuJoCo's viewer passes to its key callback) -> the names used in logs and in --help.
GLFW_KEYS: dict[int, str] = {
    32: "Space", 256: "Escape", 257: "Enter", 335: "Enter", 259: "Backspace", 260: "Insert", 261: "Delete",
    262: "Right", 263: "Left", 264: "Down", 265: "Up", 267: "PageDown", 268: "Home", 269: "End",
    54: "6", 55: "7", 56: "8", 57: "9",
    297: "F8", 298: "F9", 299: "F10", 300: "F11", 301: "F12",
}
KEY_NAMES = frozenset(GLFW_KEYS.values())
# key -> (axis index in AXES, direction)
KEY_MOTION: dict[str, tuple[int, int]] = {
    "Right": (0, 1), "Left": (0, -1), "Up": (1, 1), "Down": (1, -1), "Home": (2, 1), "End": (2, -1),
    "F11": (3, 1), "F12": (3, -1), "9": (4, 1), "8": (4, -1), "7": (5, 1), "6": (5, -1),
}
KEY_EVENTS: dict[str, str] = {
    "Enter": "start", "F8": "save", "Delete": "discard", "PageDown": "reset", "Backspace": "reset",
    "F9": "takeover", "F10": "handback", "Insert": "gripper", "Escape": "quit",
}
KEY_STOP = "Space"
KEY_LEVELS = 3  # speed steps per axis: each press adds one, the opposite key takes one away

# GLFW codes of the keys MuJoCo's viewer (mujoco 3.9, passive) acts on; teleop shares only Escape and Backspace.
VIEWER_KEYS: dict[int, str] = {
    **{ord(c): f"{c} (rendering / visualization flag)" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ,;'`\\/"},
    **{ord(str(d)): f"{d} (geom group {d})" for d in range(6)},
    **{290 + i: f"F{i + 1} ({what})" for i, what in enumerate(
        ("help", "info", "profiler", "sensors", "full screen", "frames", "labels"))},
    258: "Tab (side panels)", 91: "[ (cameras)", 93: "] (cameras)", 266: "PageUp (select parent body)",
    256: "Escape (free camera)", 259: "Backspace (reset)",
}
SHARED_WITH_VIEWER = frozenset({256, 259})


def controls_help() -> str:
    """The controls of every device, for ``robolearn teleop --help`` and the README."""
    return """\
controls (keyboard: keys in the viewer window; MuJoCo reports presses only, so motion keys are a throttle:
each press adds one of 3 speed steps along its axis, the opposite key takes one away, Space stops; letters are
left to the viewer, whose shortcuts they are):
  Up / Down            forward / back            (push_t: +y/-y on the table, lift: away from / towards you)
  Right / Left         right / left
  Home / End           up / down                 (tasks that move in 3-D)
  7 / 6                yaw left / right          (peg_insert, lift, can, square)
  9 / 8                pitch + / -               (robosuite tasks)
  F11 / F12            roll + / -                (robosuite tasks)
  Space                stop all motion
  Insert               gripper close / open      (robosuite tasks)
  Enter                start recording an episode
  F8                   save the episode (appended atomically to out=) and reset to a new scene
  Delete               discard the episode and retry the same scene
  PageDown, Backspace  reset to a new scene (an unsaved episode is dropped)
  F9 / F10             take over from the policy / hand back to it   (policy=CHECKPOINT)
  Escape               quit (so do closing the window and Ctrl-C; saved episodes are always kept)
spacemouse (3Dconnexion, HID): push/tilt/twist the cap to move; left button gripper, right button take over /
  hand back; episode keys on the keyboard as above.
gamepad (/dev/input/js*): left stick plane, right stick up/down and yaw, d-pad roll/pitch; A gripper,
  Start start, RB save, B discard, LB reset, X take over, Y hand back; keyboard keys work too.
mouse: the viewer's drag-to-perturb forces are cleared before every recorded step (they never reach the data).
replay:FILE: a log written by record_events=FILE drives the same code path as the live session did. A replay
  of an intervention session (policy=) needs policy= again and uses the log's mode, latency_s and rate_hz: it
  reproduces the operator's inputs and flags, not bit-identical trajectories (the policy samples noise)."""
