"""``robolearn teleop``'s help and its messages for bad devices and missing displays (exit 1, no traceback)."""
from __future__ import annotations

import subprocess

import pytest

from robolearn.cli import main
from robolearn.data import EpisodeStore


def test_help_lists_the_controls_of_every_device(capsys):
    with pytest.raises(SystemExit) as e:
        main(["teleop", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("Enter", "start recording", "Delete", "discard", "Escape", "F9 / F10", "take over",
                   "Home / End", "F8 ", "PageDown, Backspace", "Insert", "Space", "gripper",
                   "spacemouse (3Dconnexion", "gamepad (/dev/input/js*)", "replay:FILE", "record_events",
                   "not bit-identical trajectories", "mouse"):
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
        # A device that fails once the session runs (as an unplugged pad does: its reads fail): a directory opens,
        # then every read fails. The window opens, the first tick meets the error; the store stays valid.
        out = tmp_path / "s.zarr"
        r = run_cli(robolearn_exe, env, "task=push_t", f"device=gamepad:{tmp_path}", f"out={out}")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"robolearn: error: gamepad {tmp_path} stopped answering: Is a directory (0 saved episodes are kept " \
               f"in {out})" in r.stderr
        assert EpisodeStore.open(out).n_episodes == 0
    finally:
        display.__exit__()


@pytest.mark.parametrize("args, message", [
    (["device=replay:{tmp}/none.jsonl"], "replay log {tmp}/none.jsonl does not exist"),
    (["task=push_t", "device=keyboard", "viewer=false"], "needs the viewer window"),
    (["task=nope", "device=replay:{log}"], "was recorded on task 'push_t', not 'nope'"),
    (["device=replay:{log}", "record_events={tmp}/x.jsonl"], "a replay already is such a log"),
    (["device=replay:{log}", "episodes=0"], "episodes must be >= 1"),
    (["device=replay:{log}", "colour=red"], "unknown config key 'colour'"),
    (["device=replay:{log}", "mode=fast"], "mode must be sync or async, not 'fast'"),
    (["device=replay:{log}", "rate_hz=1e-300"], "rate_hz must be in [0.01, 10000] Hz, got 1e-300"),
    (["device=replay:{log}", "rate_hz=20000"], "rate_hz must be in [0.01, 10000] Hz, got 20000"),
    (["device=replay:{policy_log}"], "was recorded in intervention mode with policy runs/x: give policy=CHECKPOINT"),
])
def test_bad_settings(args, message, tmp_path, capsys, write_log):
    log = write_log(tmp_path / "e.jsonl", {0: ["Enter"]}, end=2)
    policy_log = write_log(tmp_path / "p.jsonl", {0: ["F9"]}, end=2, header={"policy": "runs/x", "mode": "sync"})
    fill = {"tmp": str(tmp_path), "log": str(log), "policy_log": str(policy_log)}
    assert main(["teleop", *[a.format(**fill) for a in args]]) == 1
    assert message.format(**fill) in capsys.readouterr().err


HEADER = '{"format": "robolearn-teleop-events", "version": 2, "task": "push_t", "sources": ["keyboard"]}'


# (file contents, line reported, words the message must hold). Blank lines count: files are numbered as editors do.
MALFORMED = {
    "header not an object": ('["robolearn-teleop-events", 2]\n', 1, "header must be a JSON object"),
    "bad version": ('{"format": "robolearn-teleop-events", "version": "2"}\n', 1, "version must be a positive"),
    "bad env_config": (HEADER[:-1] + ', "env_config": [1]}\n', 1, "env_config must be an object"),
    "bare number": (HEADER + '\n\n42\n', 3, "must be a JSON object, not a number (42)"),
    "string t": (HEADER + '\n{"t": "3", "keyboard": {"keys": ["Enter"]}}\n', 2, "'t' must be a non-negative"),
    "unknown key": (HEADER + '\n{"t": 0, "keyboard": {"keys": ["Enter", "Hyper", "S"]}}\n', 2,
                    "unknown key name(s) ['Hyper', 'S']"),
    "keys not a list": (HEADER + '\n{"t": 0, "keyboard": {"keys": "Enter"}}\n', 2, "must be a list of key names"),
    "decreasing t": (HEADER + '\n{"t": 5, "keyboard": {"keys": ["Up"]}}\n\n{"t": 3, "keyboard": {"keys": '
                     '["Up"]}}\n', 4, "tick 3 does not come after the previous record's tick 5"),
    "duplicate t": (HEADER + '\n{"t": 5, "keyboard": {"keys": ["Up"]}}\n{"t": 5, "keyboard": {"keys": '
                    '["Up"]}}\n', 3, "tick 5 does not come after"),
    "binary": (HEADER + '\n{"t": 0, "keyboard": {"keys": ["Up"]}}\n', 3, "not UTF-8 text"),
    "axes not numbers": ('{"format": "robolearn-teleop-events", "version": 2, "sources": ["gamepad"]}\n{"t": 1, '
                         '"gamepad": {"axes": [0.5, "up"], "buttons": [1]}}\n', 2,
                         "gamepad axes must be a list of numbers"),
    "NaN axis": ('{"format": "robolearn-teleop-events", "version": 2, "sources": ["gamepad"]}\n{"t": 1, '
                 '"gamepad": {"axes": [NaN], "buttons": []}}\n', 2, "not JSON"),
    "end before input": (HEADER + '\n{"t": 4, "keyboard": {"keys": ["Up"]}}\n{"end": 4}\n', 3,
                         "the end (tick 4) is not after"),
    "tiny rate_hz": (HEADER[:-1] + ', "rate_hz": 1e-300}\n', 1,
                     "the header's rate_hz must be a number in [0.01, 10000] (Hz), not a number (1e-300)"),
    "huge rate_hz": (HEADER[:-1] + ', "rate_hz": 100000.0}\n', 1, "rate_hz must be a number in [0.01, 10000]"),
    "huge seed": (HEADER[:-1] + ', "seed": 4294967296}\n', 1,
                  "the header's seed must be an integer in [0, 4294967295], not a number (4294967296)"),
    "huge tick": (HEADER + '\n{"t": 1000000000000, "keyboard": {"keys": ["Up"]}}\n', 2,
                  "'t' must be a non-negative integer tick below 100000000, not a number (1000000000000)"),
    "huge end": (HEADER + '\n{"t": 4, "keyboard": {"keys": ["Up"]}}\n{"end": 100000000}\n', 3,
                 "'end' must be a non-negative integer tick below 100000000"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_replay_logs_name_the_file_and_line(case, tmp_path, capsys):
    text, line, words = MALFORMED[case]
    path = tmp_path / "bad log.jsonl"
    data = text.encode()
    if case == "binary":
        data += bytes([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0xFF])  # a PNG's first bytes
    path.write_bytes(data)
    assert main(["teleop", f"device=replay:{path}", f"out={tmp_path / 's.zarr'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"robolearn: error: replay log {path}, line {line}: "), err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was created


def test_record_events_never_overwrites_a_file(tmp_path, capsys):
    log = tmp_path / "events.jsonl"
    log.write_text("an earlier session\n")
    # Refused at once: no display needed, nothing created.
    assert main(["teleop", "task=push_t", f"record_events={log}", f"out={tmp_path / 's.zarr'}"]) == 1
    err = capsys.readouterr().err
    assert f"record_events={log} already exists" in err and "never overwritten" in err
    assert log.read_text() == "an earlier session\n" and not (tmp_path / "s.zarr").exists()
