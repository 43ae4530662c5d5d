"""``robolearn teleop``'s help and its messages for bad devices and missing displays (exit 1, no traceback)."""
from __future__ import annotations

import subprocess

import pytest

from robolearn.cli import main


def test_help_lists_the_controls_of_every_device(capsys):
    with pytest.raises(SystemExit) as e:
        main(["teleop", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("Enter", "start recording", "Delete", "discard", "Escape", "K / L", "take over",
                   "PageUp / PageDown", "Space", "gripper", "spacemouse (3Dconnexion", "gamepad (/dev/input/js*)",
                   "replay:FILE", "record_events"):
        assert needle in text, needle


def run_cli(exe: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "teleop", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("device", ["foo", "keyboard:2"])
def test_bad_device_name_lists_the_valid_ones(device, robolearn_exe, headless_env):
    r = run_cli(robolearn_exe, headless_env, "task=push_t", f"device={device}")
    assert r.returncode == 1
    assert r.stderr.startswith(f"robolearn: error: unknown device {device!r}; valid devices: keyboard, spacemouse, "
                               f"gamepad")
    assert "Traceback" not in r.stderr


def test_no_display_says_to_set_it_or_use_xvfb(robolearn_exe, headless_env, tmp_path):
    r = run_cli(robolearn_exe, headless_env, "task=push_t", f"out={tmp_path / 's.zarr'}")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("robolearn: error: no display")
    assert "DISPLAY" in r.stderr and "xvfb-run -a robolearn teleop" in r.stderr
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was created


def test_display_nobody_answers(robolearn_exe, headless_env):
    r = run_cli(robolearn_exe, {**headless_env, "DISPLAY": ":817"}, "task=push_t")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "cannot open display ':817': no X server answers there" in r.stderr


def test_missing_hardware_devices_say_what_to_do(robolearn_exe, headless_env, tmp_path):
    # No display needed to learn that the device is missing: the replay path is not taken, so give one.
    from robolearn.teleop.display import VirtualDisplay

    try:
        display = VirtualDisplay(320, 240).__enter__()
    except Exception as e:  # Xvfb missing: tools/setup_xvfb.sh installs it (make test runs it)
        pytest.fail(f"this test needs Xvfb: run tools/setup_xvfb.sh ({e})")
    try:
        env = {**headless_env, "DISPLAY": display.name}
        r = run_cli(robolearn_exe, env, "task=push_t", f"device=gamepad:{tmp_path / 'js9'}")
        assert r.returncode == 1 and "cannot open gamepad" in r.stderr and "Traceback" not in r.stderr
        r = run_cli(robolearn_exe, env, "task=push_t", "device=spacemouse")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "pip install hidapi" in r.stderr or "no SpaceMouse found" in r.stderr
    finally:
        display.__exit__()


@pytest.mark.parametrize("args, message", [
    (["device=replay:{tmp}/none.jsonl"], "replay log {tmp}/none.jsonl does not exist"),
    (["task=push_t", "device=keyboard", "viewer=false"], "needs the viewer window"),
    (["task=nope", "device=replay:{log}"], "was recorded on task 'push_t', not 'nope'"),
    (["device=replay:{log}", "record_events={tmp}/x.jsonl"], "a replay already is such a log"),
    (["device=replay:{log}", "episodes=0"], "episodes must be >= 1"),
    (["device=replay:{log}", "colour=red"], "unknown config key 'colour'"),
])
def test_bad_settings(args, message, tmp_path, capsys, write_log):
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter"]}, end=2)
    fill = {"tmp": str(tmp_path), "log": str(log)}
    assert main(["teleop", *[a.format(**fill) for a in args]]) == 1
    assert message.format(**fill) in capsys.readouterr().err
