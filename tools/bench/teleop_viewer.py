"""Teleop with the real viewer on a virtual display: the control rate it keeps, and the README's screenshots.

    python tools/bench/teleop_viewer.py --out tools/bench/results/teleop_viewer.json
    python tools/bench/teleop_viewer.py --screen 1440x810 --seconds 4 --screenshots docs   # the README's pictures

For each task (push_t at 10 Hz, lift at 20 Hz) it starts Xvfb (by default 1920x1080: the viewer opens a window of
2/3 the screen, 1280x720, as on a 1080p desktop), runs ``robolearn teleop task=... device=keyboard`` in it, types
keys with xdotool (start recording, move, grip), takes a screenshot of the window in the middle of the episode,
saves the episode (F8), keeps driving for ``--seconds``, then closes the window. The command's own summary gives
the achieved control rate and the per-tick work (device poll, physics step, recording, viewer sync). Rendering is
Mesa's software rasterizer (llvmpipe): a GPU desktop renders far faster. Needs Xvfb and xdotool
(tools/setup_xvfb.sh). Prints a table; the last line of output is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from robolearn.teleop.display import VirtualDisplay, close_window, find_window, grab, send_keys  # noqa: E402

# What the operator does before the screenshot: (X key names typed, seconds to wait after them).
SCRIPTS = {
    # start; move left at 2/3 speed and a little up
    "push_t": [(["Return", "Left", "Left", "Up"], 2.0)],
    # start; towards the viewer (the cube is in front of the hand); stop; down (End); stop: the open hand over the cube
    "lift": [(["Return", "Down"], 1.5), (["space", "End"], 1.6), (["space"], 0.6)],
}
PNG_MAX_BYTES = 300_000  # larger screenshots (textures: lift's floor and walls) get a 256-colour palette


def _save_png(path: Path, img: Any) -> None:
    from PIL import Image

    im = Image.fromarray(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, optimize=True)
    if path.stat().st_size > PNG_MAX_BYTES:
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def run_task(task: str, seconds: float, shot: Path | None, workdir: Path, screen: tuple[int, int]) -> dict[str, Any]:
    exe = str(Path(sys.executable).with_name("robolearn"))
    with VirtualDisplay(*screen) as display:
        env = dict(os.environ, DISPLAY=display.name)
        out = workdir / f"{task}.zarr"
        t0 = time.perf_counter()
        proc = subprocess.Popen([exe, "teleop", f"task={task}", f"out={out}"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            window, geom = find_window("MuJoCo", display.name, timeout_s=120)
            startup = time.perf_counter() - t0
            time.sleep(1.0)
            spent = 0.0
            for keys, wait in SCRIPTS[task]:
                send_keys(window, *keys, display=display.name)
                time.sleep(wait)
                spent += wait
            if shot is not None:
                _save_png(shot, grab(display.name, geom))
            send_keys(window, "F8", display=display.name)  # save; a new scene comes up, recording waits for Enter
            time.sleep(0.5)
            send_keys(window, "Return", "Right", display=display.name)
            time.sleep(max(0.0, seconds - spent - 0.5))
            close_window(window, display.name)
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"teleop {task} failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    keep = ("rate_hz", "hz_achieved", "tick_work_ms_p50", "tick_work_ms_p99", "skipped_ticks", "ticks",
            "episodes_saved", "quit_reason")
    return {"task": task, "window": list(geom[2:]), "startup_to_window_s": round(startup, 2),
            **{k: summary[k] for k in keep}, "screenshot": str(shot) if shot else None,
            "clean_exit": proc.returncode == 0 and "Assertion" not in stderr and "X Error" not in stderr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["push_t", "lift"])
    ap.add_argument("--seconds", type=float, default=20.0, help="driving time per task")
    ap.add_argument("--screenshots", type=Path, default=None, help="write <dir>/teleop_<task>.png")
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--screen", default="1920x1080", help="Xvfb screen WxH (the window is 2/3 of it)")
    args = ap.parse_args()
    screen = tuple(int(v) for v in args.screen.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            shot = args.screenshots / f"teleop_{task}.png" if args.screenshots else None
            rows.append(run_task(task, args.seconds, shot, Path(tmp), screen))
    print(f"{'task':8} {'rate':>6} {'achieved':>9} {'work p50':>9} {'work p99':>9} {'skipped':>8}")
    for r in rows:
        print(f"{r['task']:8} {r['rate_hz']:6.1f} {r['hz_achieved']:9.2f} {r['tick_work_ms_p50']:8.1f}ms "
              f"{r['tick_work_ms_p99']:8.1f}ms {r['skipped_ticks']:8d}")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.machine(),
              "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
              "display": f"Xvfb {args.screen}x24, Mesa llvmpipe (software GL)", "results": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
