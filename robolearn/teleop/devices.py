"""Teleoperation input devices: each turns what an operator does into one normalized :class:`Command` per tick.

Every device is split in two halves, so that a recorded session replays through exactly the code a person drives:

- ``read_raw()`` collects what the hardware reported since the last control tick (key presses, axis values) as a
  small JSON-able dict, or None when nothing happened;
- ``interpret(raw)`` turns that into a :class:`Command`, keeping whatever state the device needs (held
  velocities, button edges).

A live session calls both and can write each tick's raw inputs to an event log (:class:`EventLog`); the replay
device (``replay:FILE``, :class:`ReplayDevice`) reads the log and feeds the same raw inputs, at the same control
ticks, to fresh interpreters of the same devices. Nothing downstream can tell a replay from a person.

A command is a twist in the operator's view frame, each component in [-1, 1]: ``right, forward, up`` (translation)
and ``roll, pitch, yaw`` (rotation), plus discrete events (``EVENTS``). How a twist becomes an action is the task's
business (:mod:`robolearn.teleop.tasks`).

This module imports no GUI and no hardware library at import time: ``hid`` (SpaceMouse) is imported when that
device is opened, the keyboard is fed by the viewer's key callback, the gamepad is read from the Linux joystick
device file.
"""
from __future__ import annotations

import collections
import datetime
import glob
import json
import math
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from robolearn.teleop.controls import (  # noqa: F401  (re-exported)
    GLFW_KEYS,
    KEY_EVENTS,
    KEY_LEVELS,
    KEY_MOTION,
    KEY_NAMES,
    KEY_STOP,
    controls_help,
)

# Discrete events a device can produce. "gripper" toggles the gripper; "driver" toggles who drives (policy/human).
EVENTS = ("start", "save", "discard", "reset", "takeover", "handback", "driver", "gripper", "quit")
AXES = ("right", "forward", "up", "roll", "pitch", "yaw")
LOG_FORMAT = "robolearn-teleop-events"
LOG_VERSION = 2  # 2: quit records ({"t": N, "quit": reason}); mode and latency_s in the header
# Bounds no real session reaches, checked with the rest of a replay log (a tick of 10^12 would replay for months):
MAX_TICK = 10**8  # ticks (and the end tick) are below it: 116 days at 10 Hz, almost 3 hours at the top rate
MAX_SEED = 2**32 - 1
MIN_RATE_HZ, MAX_RATE_HZ = 0.01, 10000.0


class DeviceError(Exception):
    """A device that cannot be opened or a bad device name; the message says what to do."""


@dataclass
class Command:
    """What the operator asks for during one control tick."""

    twist: np.ndarray = field(default_factory=lambda: np.zeros(6))  # AXES order, each in [-1, 1]
    events: list[str] = field(default_factory=list)

    @staticmethod
    def merge(commands: Iterable["Command"]) -> "Command":
        """Several devices at once (a SpaceMouse and the viewer's keyboard): twists add up (clipped), events queue."""
        twist = np.zeros(6)
        events: list[str] = []
        for c in commands:
            twist = twist + c.twist
            events.extend(c.events)
        return Command(np.clip(twist, -1.0, 1.0), events)


class Device:
    """Base of all devices. ``name`` is what the event log and the episode attributes call it."""

    name = "device"

    def read_raw(self) -> dict[str, Any] | None:
        """Hardware input since the last call (JSON-able), or None. Live devices only."""
        return None

    def interpret(self, raw: dict[str, Any] | None) -> Command:
        """The command for one tick, from that tick's raw input (None: nothing new arrived)."""
        raise NotImplementedError

    def halt(self) -> None:
        """Forget held motion (a new episode, a takeover): the operator starts from rest."""

    def close(self) -> None:
        """Release the hardware."""

    @classmethod
    def check_raw(cls, raw: Any) -> str | None:
        """What is wrong with ``raw`` as a logged input of this device (None: nothing)."""
        return None if isinstance(raw, dict) else f"its input must be a JSON object, not {_kind(raw)}"


def _kind(value: Any) -> str:
    """How a JSON value reads in an error message: 'a number (42)', 'a string ("3")'."""
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    text = json.dumps(value)
    return f"{kinds.get(type(value), type(value).__name__)} ({text if len(text) <= 40 else text[:37] + '...'})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------- keyboard
class KeyboardDevice(Device):
    """Keys pressed in the viewer window.

    MuJoCo's viewer reports key presses only (no releases, no auto-repeat), so motion keys work like a throttle:
    each press of a direction key adds one speed step (of ``KEY_LEVELS``) along its axis and the opposite key takes
    one away; the motion is held until changed, and Space stops everything. Keys the viewer itself acts on
    (letters, digits 0-5, F1-F7, Tab, PageUp, ...: see :mod:`robolearn.teleop.controls`) are not bound; Backspace,
    on which the viewer also resets the simulation, is bound to "reset" so the two agree.
    """

    name = "keyboard"

    def __init__(self) -> None:
        self._pending: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._levels = np.zeros(6, dtype=np.int64)

    def press(self, keycode: int) -> None:
        """The viewer's key callback (runs on the viewer's thread). Unbound keys are ignored."""
        name = GLFW_KEYS.get(int(keycode))
        if name is not None:
            with self._lock:
                self._pending.append(name)

    def read_raw(self) -> dict[str, Any] | None:
        with self._lock:
            keys = list(self._pending)
            self._pending.clear()
        return {"keys": keys} if keys else None

    def interpret(self, raw: dict[str, Any] | None) -> Command:
        events: list[str] = []
        for key in (raw or {}).get("keys", []):
            if key in KEY_MOTION:
                axis, sign = KEY_MOTION[key]
                self._levels[axis] = int(np.clip(self._levels[axis] + sign, -KEY_LEVELS, KEY_LEVELS))
            elif key == KEY_STOP:
                self._levels[:] = 0
            elif key in KEY_EVENTS:
                events.append(KEY_EVENTS[key])
        return Command(self._levels / KEY_LEVELS, events)

    def halt(self) -> None:
        self._levels[:] = 0

    @classmethod
    def check_raw(cls, raw: Any) -> str | None:
        if not isinstance(raw, dict) or set(raw) != {"keys"}:
            return f'keyboard input must be {{"keys": [key names]}}, not {_kind(raw)}'
        keys = raw["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return f"keyboard keys must be a list of key names, not {_kind(keys)}"
        unknown = sorted(set(keys) - KEY_NAMES)
        if unknown:
            return f"unknown key name(s) {unknown} (known: {', '.join(sorted(KEY_NAMES))})"
        return None


# -------------------------------------------------------------------------------------------- axis devices
class _AxisDevice(Device):
    """Devices whose state is a vector of axes and a vector of buttons, read by a background thread.

    The raw input of a tick is the whole state when it changed since the last tick (axes rounded to 1e-3 so the
    log stays short and a replay sees exactly what the live session saw). Buttons act on the press (rising edge).
    """

    n_axes = 0
    n_buttons = 0
    deadzone = 0.1
    BUTTON_EVENTS: dict[int, str] = {}

    def __init__(self) -> None:
        self._state_lock = threading.Lock()
        self._axes = [0.0] * self.n_axes
        self._buttons = [0] * self.n_buttons
        self._last_raw: dict[str, Any] | None = None
        self._held_axes = np.zeros(self.n_axes)
        self._held_buttons = [0] * self.n_buttons
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None

    def _set(self, axes: dict[int, float] | None = None, buttons: dict[int, int] | None = None) -> None:
        with self._state_lock:
            for i, v in (axes or {}).items():
                if 0 <= i < self.n_axes:
                    self._axes[i] = float(np.clip(v, -1.0, 1.0))
            for i, v in (buttons or {}).items():
                if 0 <= i < self.n_buttons:
                    self._buttons[i] = int(bool(v))

    def read_raw(self) -> dict[str, Any] | None:
        if self.error is not None:
            raise DeviceError(self.error)
        with self._state_lock:
            raw = {"axes": [round(a, 3) for a in self._axes], "buttons": list(self._buttons)}
        if raw == self._last_raw:
            return None
        self._last_raw = raw
        return raw

    def interpret(self, raw: dict[str, Any] | None) -> Command:
        events: list[str] = []
        if raw is not None:
            axes = np.asarray(raw.get("axes", []), dtype=np.float64)[: self.n_axes]
            self._held_axes[: len(axes)] = axes
            buttons = list(raw.get("buttons", []))[: self.n_buttons]
            for i, b in enumerate(buttons):
                if b and not self._held_buttons[i] and i in self.BUTTON_EVENTS:
                    events.append(self.BUTTON_EVENTS[i])
                self._held_buttons[i] = int(bool(b))
        a = self._held_axes
        mag = np.abs(a)
        shaped = np.where(mag > self.deadzone, np.sign(a) * (mag - self.deadzone) / (1.0 - self.deadzone), 0.0)
        return Command(np.clip(self._twist(shaped), -1.0, 1.0), events)

    def _twist(self, axes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()

    @classmethod
    def check_raw(cls, raw: Any) -> str | None:
        if not isinstance(raw, dict) or not raw or set(raw) - {"axes", "buttons"}:
            return f'{cls.name} input must be {{"axes": [numbers], "buttons": [numbers]}}, not {_kind(raw)}'
        for key, most in (("axes", cls.n_axes), ("buttons", cls.n_buttons)):
            values = raw.get(key, [])
            if not isinstance(values, list) or not all(_is_number(v) for v in values):
                return f"{cls.name} {key} must be a list of numbers, not {_kind(values)}"
            if len(values) > most:
                return f"{cls.name} {key}: {len(values)} values, the device has {most}"
        return None


class SpaceMouseDevice(_AxisDevice):
    """A 3Dconnexion SpaceMouse over HID (the ``hid`` module of the ``hidapi`` package).

    Axes in 3Dconnexion's HID convention: x right, y towards the user, z down; rx, ry, rz about them. Left button:
    gripper; right button: take over / hand back (intervention mode).
    """

    name = "spacemouse"
    n_axes = 6
    n_buttons = 2
    deadzone = 0.05
    BUTTON_EVENTS = {0: "gripper", 1: "driver"}
    VENDORS = (0x256F, 0x046D)  # 3Dconnexion; Logitech (older 3Dconnexion devices)
    SCALE = 350.0  # full deflection in HID units

    def __init__(self, live: bool = True) -> None:
        super().__init__()
        self._dev: Any = None
        if live:
            self._open()

    def _open(self) -> None:
        try:
            import hid  # type: ignore[import-not-found]
        except ImportError:
            raise DeviceError(
                "device=spacemouse needs the 'hid' module: install it with `pip install 'robolearn-mujoco[teleop]'` "
                "(or `.venv/bin/pip install hidapi` in a checkout; its wheel bundles the HID library; on Debian `apt-get install libhidapi-hidraw0` also works), then "
                "give your user read access to /dev/hidraw* (a udev rule) or use device=keyboard"
            ) from None
        found = [d for d in hid.enumerate() if d.get("vendor_id") in self.VENDORS
                 and ("space" in str(d.get("product_string", "")).lower() or d.get("vendor_id") == 0x256F)]
        if not found:
            raise DeviceError(
                "no SpaceMouse found: hid.enumerate() lists no 3Dconnexion device. Plug it in, check that your "
                "user can read /dev/hidraw*, or use device=keyboard / device=gamepad")
        dev = hid.device()
        try:
            dev.open_path(found[0]["path"])
        except (OSError, IOError) as e:
            raise DeviceError(f"cannot open the SpaceMouse at {found[0]['path']!r}: {e} (permissions on "
                              f"/dev/hidraw*?)") from None
        self._dev = dev
        self._thread = threading.Thread(target=self._read_loop, name="robolearn-spacemouse", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._dev.read(16, 100)  # 100 ms timeout, so close() is noticed
            except (OSError, IOError, ValueError) as e:
                self.error = f"SpaceMouse stopped answering: {e}"
                return
            if data:
                axes, buttons = parse_spacemouse_report(bytes(data))
                self._set(axes, buttons)

    def _twist(self, a: np.ndarray) -> np.ndarray:
        x, y, z, rx, ry, rz = a
        return np.array([x, -y, -z, -ry, -rx, -rz])

    def close(self) -> None:
        super().close()
        if self._thread is not None:
            self._thread.join(0.5)
        if self._dev is not None:
            try:
                self._dev.close()
            except Exception:
                pass
            self._dev = None


def parse_spacemouse_report(data: bytes) -> tuple[dict[int, float], dict[int, int]]:
    """One HID input report -> (axis index -> value in [-1, 1], button index -> 0/1).

    Report 1 carries translation (and, on newer devices, rotation too: 13 bytes), report 2 rotation, report 3 the
    button bitmask; each axis is a little-endian int16 of about +-350 at full deflection.
    """
    axes: dict[int, float] = {}
    buttons: dict[int, int] = {}
    if not data:
        return axes, buttons
    rid, body = data[0], data[1:]

    def words(b: bytes, n: int) -> list[float]:
        return [v / SpaceMouseDevice.SCALE for v in struct.unpack(f"<{n}h", b[: 2 * n])]

    if rid == 1 and len(body) >= 6:
        n = 6 if len(body) >= 12 else 3
        axes.update(enumerate(words(body, n)))
    elif rid == 2 and len(body) >= 6:
        axes.update({3 + i: v for i, v in enumerate(words(body, 3))})
    elif rid == 3 and len(body) >= 1:
        buttons.update({0: body[0] & 1, 1: (body[0] >> 1) & 1})
    return axes, buttons


JS_EVENT = struct.Struct("<IhBB")  # linux/joystick.h struct js_event: time (ms), value, type, number
JS_BUTTON, JS_AXIS, JS_INIT = 0x01, 0x02, 0x80


class GamepadDevice(_AxisDevice):
    """A gamepad through the Linux joystick API (``/dev/input/js*``), read directly: no extra Python package.

    Layout of the common Xbox-style pads: left stick moves in the plane, right stick up/down and yaw, the d-pad
    rolls and pitches. A: gripper, B: discard, X: take over, Y: hand back, LB: reset, RB: save, Start: start.
    """

    name = "gamepad"
    n_axes = 8
    n_buttons = 11
    deadzone = 0.15
    BUTTON_EVENTS = {0: "gripper", 1: "discard", 2: "takeover", 3: "handback", 4: "reset", 5: "save", 7: "start"}

    def __init__(self, path: str | None = None, live: bool = True) -> None:
        super().__init__()
        self.path = path
        self._fd: int | None = None
        if live:
            self._open()

    def _open(self) -> None:
        path = self.path
        if path is None:
            found = sorted(glob.glob("/dev/input/js*"))
            if not found:
                raise DeviceError(
                    "no gamepad found: there is no /dev/input/js* device. Plug one in (the kernel's joydev module "
                    "must be loaded: modprobe joydev), name it with device=gamepad:/dev/input/jsN, or use "
                    "device=keyboard")
            path = found[0]
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise DeviceError(f"cannot open gamepad {path}: {e.strerror} (is it plugged in, and readable by your "
                              f"user: the 'input' group?)") from None
        self.path = path
        self._thread = threading.Thread(target=self._read_loop, name="robolearn-gamepad", daemon=True)
        self._thread.start()

    def _read_loop(self) -> None:
        import select

        assert self._fd is not None
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(self._fd, JS_EVENT.size * 32)
            except BlockingIOError:
                continue
            except OSError as e:
                self.error = f"gamepad {self.path} stopped answering: {e.strerror}"
                return
            if not chunk:  # a FIFO whose writer went away, or an unplugged pad
                self._stop.wait(0.05)
                continue
            buf += chunk
            while len(buf) >= JS_EVENT.size:
                _, value, kind, number = JS_EVENT.unpack(buf[: JS_EVENT.size])
                buf = buf[JS_EVENT.size:]
                kind &= ~JS_INIT
                if kind == JS_AXIS:
                    self._set(axes={number: value / 32767.0})
                elif kind == JS_BUTTON:
                    self._set(buttons={number: value})

    def _twist(self, a: np.ndarray) -> np.ndarray:
        lx, ly, _lt, rx, ry, _rt, dx, dy = a
        return np.array([lx, -ly, -ry, dx, -dy, -rx])

    def close(self) -> None:
        super().close()
        if self._thread is not None:
            self._thread.join(0.5)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------------------------- sets, logs, replay
INTERPRETERS = {"keyboard": KeyboardDevice, "spacemouse": SpaceMouseDevice, "gamepad": GamepadDevice}


def interpreter(name: str) -> Device:
    """A device of kind ``name`` with no hardware behind it: what a replay feeds logged raw inputs to."""
    if name == "keyboard":
        return KeyboardDevice()
    if name in INTERPRETERS:
        return INTERPRETERS[name](live=False)  # type: ignore[call-arg]
    raise DeviceError(f"the event log names an unknown device {name!r} (known: {', '.join(INTERPRETERS)})")


class EventLog:
    """Writes a live session's raw inputs as JSON lines, one line per tick that had input, flushed at once.

    First line: a header (format, version, task, device, sources, rate_hz, first seed, environment config, policy,
    mode, latency_s, creation time); then ``{"t": tick, "<source>": raw, ...}``; ``{"t": tick, "quit": reason}``
    where the session quit without asking the devices (Ctrl-C, a closed window); last, ``{"end": tick}`` when the
    log is closed (a replay then quits at that tick; without it, right after the last logged tick).
    The file is created, never overwritten: FileExistsError if ``path`` exists.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "x", encoding="utf-8")
        self._last_tick = -1
        self._write({"format": LOG_FORMAT, "version": LOG_VERSION,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **header})

    def _write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._f.flush()

    def tick(self, tick: int, raws: dict[str, Any]) -> None:
        if raws and not self._f.closed:
            self._write({"t": int(tick), **raws})
            self._last_tick = int(tick)

    def quit(self, tick: int, reason: str) -> None:
        """The session quit at ``tick`` before polling its devices: a replay quits there too, before any input."""
        if not self._f.closed:
            self._write({"t": int(tick), "quit": str(reason)})
            self._last_tick = int(tick)

    def close(self, end_tick: int | None = None) -> None:
        if self._f.closed:
            return
        if end_tick is not None:
            self._write({"end": max(int(end_tick), self._last_tick + 1)})
        self._f.close()


class DeviceSet(Device):
    """The devices of a live session (the chosen one, plus the viewer's keyboard for episode keys), merged."""

    def __init__(self, devices: list[Device], log: EventLog | None = None) -> None:
        self.devices = devices
        self.log = log
        self.name = devices[0].name if devices else "none"

    @property
    def sources(self) -> list[str]:
        return [d.name for d in self.devices]

    def poll(self, tick: int) -> Command:
        raws = {}
        commands = []
        for d in self.devices:
            raw = d.read_raw()
            if raw is not None:
                raws[d.name] = raw
            commands.append(d.interpret(raw))
        if self.log is not None:
            self.log.tick(tick, raws)
        return Command.merge(commands)

    def mark_quit(self, tick: int, reason: str) -> None:
        """The session quit at ``tick`` without polling (Ctrl-C, closed window): say so in the log."""
        if self.log is not None:
            self.log.quit(tick, reason)

    def halt(self) -> None:
        for d in self.devices:
            d.halt()

    def close(self, end_tick: int | None = None) -> None:
        for d in self.devices:
            d.close()
        if self.log is not None:
            self.log.close(end_tick)


# What a header may hold: key -> (check, what it must be). Absent keys and null values are allowed.
_HEADER_FIELDS: dict[str, tuple[Any, str]] = {
    "task": (lambda v: isinstance(v, str) and bool(v), "a task name"),
    "device": (lambda v: v in INTERPRETERS, f"one of {sorted(INTERPRETERS)}"),
    "sources": (lambda v: isinstance(v, list) and bool(v) and all(s in INTERPRETERS for s in v)
                and len(set(v)) == len(v), f"a list of distinct device names from {sorted(INTERPRETERS)}"),
    "seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "rate_hz": (lambda v: _is_number(v) and MIN_RATE_HZ <= v <= MAX_RATE_HZ,
                f"a number in [{MIN_RATE_HZ:g}, {MAX_RATE_HZ:g}] (Hz)"),
    "env_config": (lambda v: isinstance(v, dict), "an object"),
    "policy": (lambda v: isinstance(v, str) and bool(v), "a checkpoint path"),
    "mode": (lambda v: v in ("sync", "async"), "sync or async"),
    "latency_s": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "created": (lambda v: isinstance(v, str), "a time stamp"),
}


@dataclass
class EventLogContents:
    """A validated event log: its header, inputs by tick, quit ticks (with reasons) and end tick (or None)."""

    header: dict[str, Any]
    sources: list[str]
    inputs: dict[int, dict[str, Any]]
    quits: dict[int, str]
    end: int | None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def read_event_log(path: str | os.PathLike) -> EventLogContents:
    """Read and check a whole event log before anything runs: every failure is a DeviceError saying
    ``replay log PATH, line N: what is wrong`` (N counts the file's lines as they are, blank ones included).
    Ticks and the end tick are below ``MAX_TICK``, the seed in [0, ``MAX_SEED``], ``rate_hz`` in
    [``MIN_RATE_HZ``, ``MAX_RATE_HZ``]: a log beyond them was not written by a real session."""
    path = Path(path)

    def fail(line: int, message: str) -> DeviceError:
        return DeviceError(f"replay log {path}, line {line}: {message}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeviceError(f"replay log {path} does not exist (record one with record_events=PATH)") from None
    except OSError as e:
        raise DeviceError(f"replay log {path} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")  # strict: a binary file is refused here, not half-parsed
    except UnicodeDecodeError as e:
        raise fail(data.count(b"\n", 0, e.start) + 1,
                   f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): is it a binary file?") from None
    header: dict[str, Any] | None = None
    header_line = 0
    sources: list[str] = []
    inputs: dict[int, dict[str, Any]] = {}
    quits: dict[int, str] = {}
    end: int | None = None
    end_line = 0
    last_t: int | None = None
    for n, line in enumerate(text.split("\n"), start=1):  # only "\n" ends a line, as for `wc -l` and editors
        if not line.strip():
            continue
        try:
            rec = json.loads(line, parse_constant=_reject_constant)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            raise fail(n, f"not JSON ({getattr(e, 'msg', e)})") from None
        if header is None:
            if not isinstance(rec, dict):
                raise fail(n, f"the header must be a JSON object, not {_kind(rec)}")
            if rec.get("format") != LOG_FORMAT:
                raise fail(n, f"not a robolearn teleop event log (its first line should be a header with format "
                              f"{LOG_FORMAT!r})")
            version = rec.get("version")
            if not _is_int(version) or version < 1:
                raise fail(n, f"the header's version must be a positive integer, not {_kind(version)}")
            if version > LOG_VERSION:
                raise fail(n, f"the log has version {version}; this robolearn reads up to {LOG_VERSION}")
            for key, (ok, what) in _HEADER_FIELDS.items():
                if rec.get(key) is not None and not ok(rec[key]):
                    raise fail(n, f"the header's {key} must be {what}, not {_kind(rec[key])}")
            header, header_line = rec, n
            sources = list(rec.get("sources") or [rec.get("device") or "keyboard"])
            continue
        if not isinstance(rec, dict):
            raise fail(n, f"a record must be a JSON object, not {_kind(rec)}")
        if end is not None:
            raise fail(n, f"a record after the end line (line {end_line})")
        if "end" in rec:
            if set(rec) != {"end"}:
                raise fail(n, f"the end line holds other keys too: {sorted(set(rec) - {'end'})}")
            if not _is_int(rec["end"]) or not 0 <= rec["end"] < MAX_TICK:
                raise fail(n, f"'end' must be a non-negative integer tick below {MAX_TICK}, not {_kind(rec['end'])}")
            if last_t is not None and rec["end"] <= last_t:
                raise fail(n, f"the end (tick {rec['end']}) is not after the last record (tick {last_t})")
            end, end_line = int(rec["end"]), n
            continue
        if "t" not in rec:
            raise fail(n, "neither a tick ('t') nor the end ('end')")
        t = rec["t"]
        if not _is_int(t) or not 0 <= t < MAX_TICK:
            raise fail(n, f"'t' must be a non-negative integer tick below {MAX_TICK}, not {_kind(t)}")
        if last_t is not None and t <= last_t:
            raise fail(n, f"tick {t} does not come after the previous record's tick {last_t} (each tick has one "
                          f"record, in increasing order)")
        last_t = t
        unknown = set(rec) - {"t", "quit"} - set(sources)
        if unknown:
            raise fail(n, f"input from {sorted(unknown)}, which the header's sources {sources} (line "
                          f"{header_line}) do not list")
        if "quit" in rec:
            if not isinstance(rec["quit"], str) or not rec["quit"]:
                raise fail(n, f"'quit' must be the reason (a non-empty string), not {_kind(rec['quit'])}")
            quits[t] = rec["quit"]
        raws = {k: v for k, v in rec.items() if k not in ("t", "quit")}
        for name, raw in raws.items():
            problem = INTERPRETERS[name].check_raw(raw)
            if problem:
                raise fail(n, problem)
        if raws:
            inputs[t] = raws
    if header is None:
        raise DeviceError(f"replay log {path} is empty: it should start with a header line (format {LOG_FORMAT!r})")
    return EventLogContents(header, sources, inputs, quits, end)


class ReplayDevice(Device):
    """``replay:FILE``: a recorded session's raw inputs, fed tick by tick to fresh device interpreters.

    The whole log is checked when it is opened (:func:`read_event_log`). At a quit record the replay quits before
    that tick's inputs (the live session never polled them); after the log's end (its ``end`` line, else the tick
    after its last record) every poll also says "quit".
    """

    name = "replay"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        log = read_event_log(self.path)
        self.header: dict[str, Any] = log.header
        self.sources: list[str] = log.sources
        self.devices = {name: interpreter(name) for name in self.sources}
        self.recorded_device = str(self.header.get("device") or self.sources[0])
        self.by_tick = log.inputs
        self.quits = log.quits
        last = max([*log.inputs, *log.quits], default=-1)
        self.end: int = log.end if log.end is not None else last + 1
        self.quit_reason: str | None = None

    def poll(self, tick: int) -> Command:
        if tick in self.quits:
            self.quit_reason = self.quits[tick]
            return Command(events=["quit"])
        raws = self.by_tick.get(tick, {})
        cmd = Command.merge(d.interpret(raws.get(name)) for name, d in self.devices.items())
        if tick >= self.end:
            cmd.events.append("quit")
            self.quit_reason = "end of the replay log"
        return cmd

    def interpret(self, raw: dict[str, Any] | None) -> Command:  # pragma: no cover - poll() is the entry point
        raise TypeError("ReplayDevice is polled by tick")

    def halt(self) -> None:
        for d in self.devices.values():
            d.halt()

    def close(self, end_tick: int | None = None) -> None:
        pass


# ------------------------------------------------------------------------------------------------- naming
DEVICE_NAMES = ("keyboard", "spacemouse", "gamepad", "replay:FILE")


def parse_device(spec: str) -> tuple[str, str | None]:
    """``"gamepad:/dev/input/js1"`` -> ``("gamepad", "/dev/input/js1")``; refuses unknown names, listing the valid."""
    kind, sep, arg = str(spec).partition(":")
    kind = kind.strip().lower()
    valid = ("valid devices: keyboard, spacemouse, gamepad (or gamepad:/dev/input/jsN), replay:FILE (an event log "
             "written with record_events=FILE)")
    if kind == "replay":
        if not arg:
            raise DeviceError(f"device=replay needs a file: device=replay:PATH; {valid}")
        return kind, arg
    if kind == "gamepad":
        return kind, arg or None
    if kind in ("keyboard", "spacemouse") and not sep:
        return kind, None
    raise DeviceError(f"unknown device {spec!r}; {valid}")


def open_live_device(kind: str, arg: str | None) -> Device:
    """The hardware device besides the keyboard (None for the keyboard itself, which the viewer feeds)."""
    if kind == "spacemouse":
        return SpaceMouseDevice()
    if kind == "gamepad":
        return GamepadDevice(arg)
    raise DeviceError(f"{kind} is not a hardware device")
