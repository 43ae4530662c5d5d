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
    KEY_STOP,
    controls_help,
)

# Discrete events a device can produce. "gripper" toggles the gripper; "driver" toggles who drives (policy/human).
EVENTS = ("start", "save", "discard", "reset", "takeover", "handback", "driver", "gripper", "quit")
AXES = ("right", "forward", "up", "roll", "pitch", "yaw")
LOG_FORMAT = "robolearn-teleop-events"
LOG_VERSION = 1


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


# --------------------------------------------------------------------------------------------------- keyboard
class KeyboardDevice(Device):
    """Keys pressed in the viewer window.

    MuJoCo's viewer reports key presses only (no releases, no auto-repeat), so motion keys work like a throttle:
    each press of a direction key adds one speed step (of ``KEY_LEVELS``) along its axis and the opposite key takes
    one away; the motion is held until changed, and Space stops everything. Keys the viewer itself uses for its
    rendering options (most letters, digits 0-5, Tab, F1-F5) are avoided; Backspace, which also resets the
    viewer's copy of the simulation, is bound to "reset" so the two agree.
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
                "device=spacemouse needs the 'hid' module: install it with `.venv/bin/pip install hidapi` (its "
                "wheel bundles the HID library; on Debian `apt-get install libhidapi-hidraw0` also works), then "
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

    First line: a header (format, version, task, device, sources, rate, first seed, creation time); then
    ``{"t": tick, "<source>": raw, ...}``; last, ``{"end": tick}`` when the session ended normally (a replay then
    quits at that tick; without it, right after the last logged tick).
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", encoding="utf-8")
        self._write({"format": LOG_FORMAT, "version": LOG_VERSION,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     **header})

    def _write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._f.flush()

    def tick(self, tick: int, raws: dict[str, Any]) -> None:
        if raws and not self._f.closed:
            self._write({"t": int(tick), **raws})

    def close(self, end_tick: int | None = None) -> None:
        if self._f.closed:
            return
        if end_tick is not None:
            self._write({"end": int(end_tick)})
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

    def halt(self) -> None:
        for d in self.devices:
            d.halt()

    def close(self, end_tick: int | None = None) -> None:
        for d in self.devices:
            d.close()
        if self.log is not None:
            self.log.close(end_tick)


class ReplayDevice(Device):
    """``replay:FILE``: a recorded session's raw inputs, fed tick by tick to fresh device interpreters.

    After the log's end (its ``end`` line, else the tick after its last input) every poll also says "quit".
    """

    name = "replay"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DeviceError(f"replay log {self.path} does not exist (record one with record_events=PATH)")
        lines = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        records = []
        for i, ln in enumerate(lines, start=1):
            try:
                records.append(json.loads(ln))
            except json.JSONDecodeError as e:
                raise DeviceError(f"replay log {self.path}, line {i}: not JSON ({e.msg})") from None
        if not records or records[0].get("format") != LOG_FORMAT:
            raise DeviceError(f"{self.path} is not a robolearn teleop event log (its first line should be a "
                              f"header with format {LOG_FORMAT!r})")
        self.header: dict[str, Any] = records[0]
        if int(self.header.get("version", 0)) > LOG_VERSION:
            raise DeviceError(f"replay log {self.path} has version {self.header.get('version')}; this robolearn "
                              f"reads up to {LOG_VERSION}")
        self.sources: list[str] = list(self.header.get("sources") or [self.header.get("device", "keyboard")])
        self.devices = {name: interpreter(name) for name in self.sources}
        self.recorded_device = str(self.header.get("device", self.sources[0]))
        self.by_tick: dict[int, dict[str, Any]] = {}
        self.end: int | None = None
        for i, rec in enumerate(records[1:], start=2):
            if "end" in rec:
                self.end = int(rec["end"])
            elif "t" in rec:
                unknown = set(rec) - {"t"} - set(self.sources)
                if unknown:
                    raise DeviceError(f"replay log {self.path} line {i}: input from {sorted(unknown)}, which the "
                                      f"header's sources {self.sources} do not list")
                self.by_tick[int(rec["t"])] = {k: v for k, v in rec.items() if k != "t"}
            else:
                raise DeviceError(f"replay log {self.path} line {i}: neither a tick ('t') nor the end ('end')")
        if self.end is None:
            self.end = max(self.by_tick, default=-1) + 1
        self.quit_reason: str | None = None

    def poll(self, tick: int) -> Command:
        raws = self.by_tick.get(tick, {})
        cmd = Command.merge(d.interpret(raws.get(name)) for name, d in self.devices.items())
        if tick >= (self.end or 0):
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
