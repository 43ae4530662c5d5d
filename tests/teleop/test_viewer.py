"""The real viewer on a virtual display (Xvfb): keys typed into the window drive a push_t session, screenshots show
the scene and the overlay, closing the window ends the process cleanly (exit 0, no abort), and the session's
event log replays headless into the very same episode.

Needs Xvfb and xdotool (Debian packages); ``make test`` installs them with tools/setup_xvfb.sh. Without them this
test fails, saying so: it never passes silently.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest

from robolearn.cli import main
from robolearn.data import EpisodeStore
from robolearn.teleop.display import VirtualDisplay, close_window, find_window, grab, send_keys


def _require_x_tools() -> None:
    missing = [t for t in ("Xvfb", "xdotool") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run tools/setup_xvfb.sh as root (make test does; it needs "
                    f"apt-get: apt-get install -y --no-install-recommends xvfb xdotool)")


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _episodes(path) -> int:
    try:
        return EpisodeStore.open(path, validate=False).n_episodes
    except Exception:
        return 0


def _blue_centroid(img: np.ndarray) -> np.ndarray:
    """Where the pusher (a blue sphere) is on the screen."""
    r, g, b = (img[..., c].astype(int) for c in range(3))
    ys, xs = np.nonzero((b > 150) & (r < 120) & (g < 150))
    assert len(xs) > 30, "the pusher is not on the screen"
    return np.array([xs.mean(), ys.mean()])


def test_viewer_on_xvfb_keys_overlay_screenshot_and_clean_exit(tmp_path, robolearn_exe, headless_env):
    _require_x_tools()
    out, log = tmp_path / "live.zarr", tmp_path / "live.jsonl"
    with VirtualDisplay(1200, 750) as display:  # an 800 x 500 window
        env = {**headless_env, "DISPLAY": display.name}  # MUJOCO_GL stays egl, as sim sets it: the viewer uses GLFW
        proc = subprocess.Popen([robolearn_exe, "teleop", "task=push_t", f"out={out}", f"record_events={log}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            window, (x, y, w, h) = find_window("MuJoCo", display.name, timeout_s=60)
            time.sleep(1.0)  # a few ticks: the overlay shows READY
            ready = grab(display.name, (x, y, w, h))
            send_keys(window, "Return", "Left", "Left", display=display.name)
            time.sleep(1.5)  # ~15 ticks at 10 Hz, 2/3 speed to the left: 1 cm per tick
            recording = grab(display.name, (x, y, w, h))
            send_keys(window, "F8", display=display.name)
            _wait(lambda: _episodes(out) == 1, 20, "the saved episode")
            close_window(window, display.name)
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "ready.png", ready)
    iio.imwrite(tmp_path / "recording.png", recording)
    # A clean exit: status 0, no abort, no X error, no traceback; the summary says why it quit.
    assert proc.returncode == 0, stderr
    for bad in ("Assertion", "Aborted", "X Error", "Segmentation", "Traceback"):
        assert bad not in stderr, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["quit_reason"] == "window closed" and summary["episodes_saved"] == 1 and summary["viewer"]

    # The scene: the light table fills the middle, the green goal T and the blue pusher are on it.
    assert ready.shape == (h, w, 3) and ready.std() > 20
    mid = recording[:, w // 2 - h // 2: w // 2 + h // 2]
    light = (mid.min(axis=2) > 190) & (mid.max(axis=2) < 235)
    assert light.mean() > 0.5, "no table in the middle of the window"
    r, g, b = (recording[..., c].astype(int) for c in range(3))
    assert ((g > 150) & (r < 150) & (b < 150)).sum() > 300, "no goal T"
    # Keys reached the session: the pusher moved left on the screen between the two screenshots.
    moved = _blue_centroid(recording) - _blue_centroid(ready)
    assert moved[0] < -20 and abs(moved[1]) < 5, moved
    # The overlay: light text in the top-left block and the key list at the bottom left, on the black margin;
    # its state line changed from READY to RECORDING.
    def text(img: np.ndarray) -> np.ndarray:
        return img.min(axis=2) > 120

    top, bottom = (slice(0, 170), slice(0, 110)), (slice(h - 200, h), slice(0, 110))
    assert text(recording)[top].sum() > 300 and text(recording)[bottom].sum() > 300
    assert text(recording)[190:h - 200, :60].sum() == 0  # margin between the blocks: black
    assert text(ready)[top].sum() > 300  # the overlay is there from the start
    state_line = (slice(0, 28), slice(100, w // 2))
    changed = np.abs(ready[state_line].astype(int) - recording[state_line].astype(int)).max(axis=2) > 30
    assert changed.sum() > 50, "the state line did not change"

    # The event log of the live session, replayed headless, gives the same episode. The closed window is in it: the
    # session quit at that tick without polling the keyboard.
    records = [json.loads(ln) for ln in log.read_text().splitlines()]
    assert records[-2:] == [{"t": summary["ticks"] - 1, "quit": "window closed"}, {"end": summary["ticks"]}]
    store = EpisodeStore.open(out)
    assert store.episode_attrs(0)["device"] == "keyboard" and store.get_episode(0)["intervention"].all()
    actions = store.get_episode(0)["action"]
    np.testing.assert_allclose(np.diff(actions[:, 0])[-5:], -0.01, atol=1e-6)  # 2 presses: 1 cm per tick
    assert main(["teleop", f"device=replay:{log}", f"out={tmp_path / 'replayed.zarr'}"]) == 0
    replayed = EpisodeStore.open(tmp_path / "replayed.zarr")
    assert replayed.n_episodes == 1
    for k, v in store.get_episode(0).items():
        np.testing.assert_array_equal(replayed.get_episode(0)[k], v)
