"""X11 plumbing for the viewer: is there a display, a virtual one (Xvfb) for tests, and screenshots.

Why check the display ourselves: ``mujoco.viewer.launch_passive`` initializes GLFW on its own thread, and when that
fails (no ``DISPLAY``, or one nobody answers) the exception stays on that thread while the caller waits forever
for the viewer's handle. Asking Xlib first turns both cases into a clear message.

Screenshots read the X server's framebuffer with ``XGetImage`` through ctypes (libX11 is already there: GLFW needs
it), in-process, with no ImageMagick. Under Xvfb, GL frames rendered by Mesa land in that framebuffer, so what
comes back is what an operator would see.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import time
from typing import Any

import numpy as np


class DisplayError(Exception):
    """No usable display; the message says how to get one."""


_X11: Any = None


def _xlib() -> Any:
    global _X11
    if _X11 is None:
        name = ctypes.util.find_library("X11") or "libX11.so.6"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise DisplayError("libX11 is missing: the viewer needs an X11 client library "
                               "(Debian: apt-get install libx11-6)") from None
        lib.XOpenDisplay.restype = ctypes.c_void_p
        lib.XOpenDisplay.argtypes = [ctypes.c_char_p]
        lib.XCloseDisplay.argtypes = [ctypes.c_void_p]
        lib.XDefaultRootWindow.restype = ctypes.c_ulong
        lib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        lib.XDefaultScreen.argtypes = [ctypes.c_void_p]
        lib.XDisplayWidth.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.XDisplayHeight.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.XGetImage.restype = ctypes.POINTER(_XImage)
        lib.XGetImage.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                  ctypes.c_uint, ctypes.c_ulong, ctypes.c_int]
        _X11 = lib
    return _X11


class _XImageFuncs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("create_image", "destroy_image", "get_pixel", "put_pixel", "sub_image", "add_pixel")]


class _XImage(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_int), ("height", ctypes.c_int), ("xoffset", ctypes.c_int), ("format", ctypes.c_int),
        ("data", ctypes.POINTER(ctypes.c_ubyte)), ("byte_order", ctypes.c_int), ("bitmap_unit", ctypes.c_int),
        ("bitmap_bit_order", ctypes.c_int), ("bitmap_pad", ctypes.c_int), ("depth", ctypes.c_int),
        ("bytes_per_line", ctypes.c_int), ("bits_per_pixel", ctypes.c_int), ("red_mask", ctypes.c_ulong),
        ("green_mask", ctypes.c_ulong), ("blue_mask", ctypes.c_ulong), ("obdata", ctypes.c_void_p),
        ("f", _XImageFuncs),
    ]


NO_DISPLAY = (
    "no display: the teleop viewer opens a window and DISPLAY is not set. Set DISPLAY (a desktop session, "
    "`ssh -X`), or run on a virtual display: xvfb-run -a robolearn teleop ... (Debian: apt-get install xvfb); "
    "a replay log runs headless with viewer=false")


def check_display(display: str | None = None) -> str:
    """The display name if an X server answers there; DisplayError saying what to do otherwise."""
    name = display if display is not None else os.environ.get("DISPLAY", "")
    if not name:
        raise DisplayError(NO_DISPLAY)
    lib = _xlib()
    handle = lib.XOpenDisplay(name.encode())
    if not handle:
        raise DisplayError(
            f"cannot open display {name!r}: no X server answers there. Start one, fix DISPLAY, or run on a virtual "
            f"display: xvfb-run -a robolearn teleop ...")
    lib.XCloseDisplay(handle)
    return name


def grab(display: str | None = None, region: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The screen of ``display`` (default ``$DISPLAY``) as an RGB uint8 array; ``region`` = (x, y, w, h)."""
    name = check_display(display)
    lib = _xlib()
    handle = lib.XOpenDisplay(name.encode())
    try:
        screen = lib.XDefaultScreen(handle)
        sw, sh = lib.XDisplayWidth(handle, screen), lib.XDisplayHeight(handle, screen)
        x, y, w, h = region if region is not None else (0, 0, sw, sh)
        x, y = max(0, x), max(0, y)
        w, h = min(w, sw - x), min(h, sh - y)
        if w <= 0 or h <= 0:
            raise DisplayError(f"region {region} lies outside the {sw}x{sh} screen of {name}")
        all_planes = (1 << (8 * ctypes.sizeof(ctypes.c_ulong))) - 1
        img = lib.XGetImage(handle, lib.XDefaultRootWindow(handle), x, y, w, h, all_planes, 2)  # 2: ZPixmap
        if not img:
            raise DisplayError(f"XGetImage failed on display {name}")
        try:
            im = img.contents
            if im.bits_per_pixel != 32:
                raise DisplayError(f"screenshots need a 24/32-bit display; {name} has {im.bits_per_pixel} bpp")
            raw = np.ctypeslib.as_array(im.data, shape=(im.height * im.bytes_per_line,)).copy()
            words = raw.reshape(im.height, im.bytes_per_line)[:, : 4 * im.width].copy().view(
                "<u4" if im.byte_order == 0 else ">u4")
            out = np.empty((im.height, im.width, 3), dtype=np.uint8)
            for c, mask in enumerate((im.red_mask, im.green_mask, im.blue_mask)):
                shift = (mask & -mask).bit_length() - 1
                out[..., c] = (words >> np.uint32(shift)) & np.uint32(0xFF)
        finally:
            destroy = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_XImage))(img.contents.f.destroy_image)
            destroy(img)
        return out
    finally:
        lib.XCloseDisplay(handle)


def find_window(name: str, display: str | None = None, timeout_s: float = 20.0) -> tuple[str, tuple[int, ...]]:
    """Id and (x, y, w, h) of the first window whose title contains ``name`` (via xdotool)."""
    if shutil.which("xdotool") is None:
        raise DisplayError("xdotool is missing (Debian: apt-get install xdotool; tools/setup_xvfb.sh does it)")
    env = dict(os.environ, DISPLAY=display or os.environ.get("DISPLAY", ""))
    deadline = time.monotonic() + timeout_s
    while True:
        r = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], capture_output=True, text=True,
                           env=env)
        ids = r.stdout.split()
        if ids:
            g = subprocess.run(["xdotool", "getwindowgeometry", "--shell", ids[0]], capture_output=True, text=True,
                               env=env).stdout
            vals = dict(ln.split("=", 1) for ln in g.split() if "=" in ln)
            return ids[0], tuple(int(vals[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
        if time.monotonic() > deadline:
            raise DisplayError(f"no window named like {name!r} appeared on {env['DISPLAY']} within {timeout_s} s")
        time.sleep(0.1)


class _XClientMessage(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]


class _XEvent(ctypes.Union):
    _fields_ = [("xclient", _XClientMessage), ("pad", ctypes.c_long * 24)]


def close_window(window: str | int, display: str | None = None) -> None:
    """Ask ``window`` to close, as a window manager's close button does (a WM_DELETE_WINDOW client message)."""
    name = check_display(display)
    lib = _xlib()
    lib.XInternAtom.restype = ctypes.c_ulong
    lib.XInternAtom.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.XSendEvent.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_long,
                               ctypes.POINTER(_XEvent)]
    lib.XFlush.argtypes = [ctypes.c_void_p]
    handle = lib.XOpenDisplay(name.encode())
    try:
        ev = _XEvent()
        ev.xclient.type = 33  # ClientMessage
        ev.xclient.window = int(window)
        ev.xclient.message_type = lib.XInternAtom(handle, b"WM_PROTOCOLS", 0)
        ev.xclient.format = 32
        ev.xclient.data[0] = lib.XInternAtom(handle, b"WM_DELETE_WINDOW", 0)
        lib.XSendEvent(handle, int(window), 0, 0, ctypes.byref(ev))
        lib.XFlush(handle)
    finally:
        lib.XCloseDisplay(handle)


def send_keys(window: str, *keys: str, display: str | None = None, delay_ms: int = 30) -> None:
    """Type X key names (``Return``, ``Right``, ``s``) into ``window`` with xdotool."""
    env = dict(os.environ, DISPLAY=display or os.environ.get("DISPLAY", ""))
    subprocess.run(["xdotool", "key", "--window", window, "--delay", str(delay_ms), *keys], check=True, env=env)


class VirtualDisplay:
    """An Xvfb server on a free display number, for tests and screenshots: ``with VirtualDisplay() as d: d.name``."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        self.size = (width, height)
        self.proc: subprocess.Popen | None = None
        self.name = ""

    def __enter__(self) -> "VirtualDisplay":
        if shutil.which("Xvfb") is None:
            raise DisplayError("Xvfb is missing: run tools/setup_xvfb.sh (as root; Debian: apt-get install -y "
                               "--no-install-recommends xvfb xdotool)")
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(w), "-screen", "0", f"{self.size[0]}x{self.size[1]}x24", "-nolisten", "tcp"],
            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            number = f.readline().strip()
        if not number:
            self.__exit__()
            raise DisplayError("Xvfb did not start")
        self.name = f":{number}"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
