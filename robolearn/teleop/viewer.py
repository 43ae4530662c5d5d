"""MuJoCo's interactive viewer as the teleop window: keys in, overlay text out, and a clean shutdown.

The passive viewer (``mujoco.viewer.launch_passive``) renders on a thread of its own; the session steps the
simulation and calls :meth:`TeleopViewer.update` once per control tick to copy the state and set the overlay.

Overlay: see :meth:`TeleopViewer.update` for why the text is refreshed at most four times a second.

Shutdown: the viewer's thread is a daemon that ``launch_passive`` does not hand back. Left running at interpreter
exit, it races GLFW's ``atexit`` terminate and Mesa's thread teardown: on this machine (mujoco 3.9.0, Xvfb, Mesa
llvmpipe) such exits hung in ``pthread_join`` inside swrast_dri, crashed with an X error (GLXBadDrawable) or a
segfault, or aborted on a pthread assertion. :meth:`close` therefore asks the viewer to exit and *joins* its
thread (found by diffing ``threading.enumerate()`` around the launch) while the interpreter is still whole; an
``atexit`` hook does the same if a caller forgot.
"""
from __future__ import annotations

import atexit
import threading
import time
from typing import Any, Callable, Sequence

from robolearn.teleop.display import check_display
from robolearn.teleop.tasks import View


def mujoco_handles(env: Any) -> tuple[Any, Any]:
    """``(MjModel, MjData)`` behind an environment: the project's own tasks, or robosuite's ``MjSim``."""
    u = getattr(env, "unwrapped", env)
    if hasattr(u, "model") and hasattr(u, "data") and type(u.model).__name__ == "MjModel":
        return u.model, u.data
    sim = getattr(u, "sim", None)
    if sim is not None and hasattr(sim.model, "_model"):
        return sim.model._model, sim.data._data
    raise TypeError(f"{type(u).__name__} exposes no MuJoCo model/data for the viewer")


class TeleopViewer:
    """One viewer window on ``(model, data)``; key presses go to ``on_key`` (called on the viewer's thread)."""

    def __init__(self, model: Any, data: Any, on_key: Callable[[int], None], view: View) -> None:
        self.model, self.data = model, data
        self.on_key = on_key
        self.view = view
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.text_interval_s = 0.25
        self._shown: list[tuple[str, str, str]] = []
        self._shown_at = float("-inf")

    def open(self) -> "TeleopViewer":
        check_display()
        import mujoco
        import mujoco.viewer

        before = set(threading.enumerate())
        self._handle = mujoco.viewer.launch_passive(self.model, self.data, key_callback=self.on_key,
                                                    show_left_ui=False, show_right_ui=False)
        started = [t for t in threading.enumerate() if t not in before]
        self._thread = started[0] if started else None
        atexit.register(self.close)
        self._set_camera()
        return self

    def _set_camera(self) -> None:
        import mujoco

        v, cam = self.view, self._handle.cam
        with self._handle.lock():
            if v.fixed is not None:
                cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
                cam.fixedcamid = self.model.camera(v.fixed).id
            else:
                cam.type = mujoco.mjtCamera.mjCAMERA_FREE
                cam.lookat[:] = v.lookat
                cam.distance, cam.azimuth, cam.elevation = v.distance, v.azimuth, v.elevation
            for group in v.hidden_groups:
                self._handle.opt.geomgroup[group] = 0

    def is_running(self) -> bool:
        return self._handle is not None and not self._closed and self._handle.is_running()

    def update(self, texts: Sequence[tuple[str, str, str]]) -> None:
        """Copy the simulation state to the window and show ``texts``: (corner, left column, right column).

        The overlay changes at most every ``text_interval_s``: ``set_texts`` blocks until the render thread has
        taken the previous texts, i.e. up to a frame. With software GL (Mesa llvmpipe under Xvfb) a robosuite frame
        takes 100-200 ms, so setting texts on every 20 Hz tick held lift's control loop to about 5 Hz.
        """
        if not self.is_running():
            return
        import mujoco

        texts = list(texts)
        now = time.monotonic()
        if texts != self._shown and now - self._shown_at >= self.text_interval_s:
            grid = {"topleft": mujoco.mjtGridPos.mjGRID_TOPLEFT, "topright": mujoco.mjtGridPos.mjGRID_TOPRIGHT,
                    "bottomleft": mujoco.mjtGridPos.mjGRID_BOTTOMLEFT,
                    "bottomright": mujoco.mjtGridPos.mjGRID_BOTTOMRIGHT}
            font = mujoco.mjtFontScale.mjFONTSCALE_150
            self._handle.set_texts([(font, grid[corner], left, right) for corner, left, right in texts])
            self._shown, self._shown_at = texts, now
        self._handle.sync()

    def reload(self, model: Any, data: Any) -> None:
        """The environment rebuilt its model (robosuite's hard_reset): reopen the window on the new one."""
        if model is self.model and data is self.data:
            return
        self.close()
        self._closed = False
        self.model, self.data = model, data
        self.open()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10.0)
        self._thread = None
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
