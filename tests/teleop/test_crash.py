"""A teleop session killed (SIGKILL) or interrupted (Ctrl-C) after saving N episodes leaves exactly N valid ones."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from robolearn.data import EpisodeStore

# Three saved episodes of 5 steps, then a fourth being recorded when the signal comes (the log runs on for
# minutes at 50 Hz in real time).
SESSION = {0: ["Enter", "Right"], 5: ["F8"], 6: ["Enter", "Up"], 11: ["F8"], 12: ["Enter"], 17: ["F8"], 18: ["Enter"]}


def _wait_for_episodes(out, n: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"teleop exited early: {proc.communicate()}"
        try:
            if EpisodeStore.open(out, validate=False).n_episodes >= n:
                return
        except Exception:  # not created yet
            pass
        assert time.monotonic() < deadline, f"{n} episodes never appeared in {out}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_or_interrupted_session_keeps_every_saved_episode(tmp_path, sig, write_log, robolearn_exe,
                                                                 headless_env):
    log = write_log(tmp_path / "events.jsonl", SESSION, seed=0, end=100_000)
    out = tmp_path / "store.zarr"
    # Ctrl-C must reach teleop even when the tests run as a shell's background job (SIGINT ignored there, and
    # a child inherits that).
    proc = subprocess.Popen([robolearn_exe, "teleop", f"device=replay:{log}", f"out={out}", "realtime=true",
                             "rate_hz=50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=headless_env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for_episodes(out, 3, proc)
        time.sleep(0.3)  # into the fourth, unsaved episode
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # Ctrl-C ends the session normally: summary JSON, exit status 0
        assert proc.returncode == 0, stderr
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["interrupted"] is True and summary["episodes_saved"] == 3
        assert "dropped the unsaved episode" in stderr and "Traceback" not in stderr
    store = EpisodeStore.open(out, mode="a")  # validates, takes the lock the dead writer held, trims leftovers
    assert store.n_episodes == 3
    np.testing.assert_array_equal(store.episode_lengths, [5, 5, 5])
    assert [a["seed"] for a in store.all_episode_attrs()] == [0, 1, 2]
    assert store.attrs["teleop"]["next_seed"] == 3
    assert store.get_episode(2)["intervention"].all()
    store.close()
