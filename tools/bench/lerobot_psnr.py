"""How much a LeRobot export's video loses: PSNR of rendered frames after export -> import, per h264 crf.

Collects a few scripted episodes with camera images (Push-T ``obs_mode=image`` 96x96 top view; Lift's 84x84
``agentview``), exports each store with ``robolearn data export lerobot`` at several crf values (gop 2, as
LeRobot records), imports it back, and compares the frames: PSNR over all frames (from the mean squared error
of every pixel), the worst frame's PSNR, the mp4 bytes per frame, and the time to export and import. Every
array other than the images must come back bit for bit (checked). Writes
``tools/bench/results/lerobot_psnr.json``.

    MUJOCO_GL=egl OMP_NUM_THREADS=1 .venv/bin/python tools/bench/lerobot_psnr.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from robolearn.data import EpisodeStore
from robolearn.data.formats.lerobot import psnr

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("robolearn"))
STORES = {  # name -> (collect overrides, image key)
    "push_t_96": (["task=push_t", "episodes=3", "env.obs_mode=image"], "image"),
    "lift_84": (["task=lift", "episodes=2", "env.camera_names=[agentview]"], "agentview_image"),
}


def _run(args: list[str]) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crf", type=int, nargs="+", default=[0, 12, 18, 23, 30])
    ap.add_argument("--stores", nargs="+", default=list(STORES))
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/lerobot_psnr.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.stores:
            overrides, key = STORES[name]
            store_path = Path(tmp) / f"{name}.zarr"
            t0 = time.perf_counter()
            _run([EXE, "collect", *overrides, f"out={store_path}", "progress=false"])
            collect_s = time.perf_counter() - t0
            src = EpisodeStore.open(store_path)
            original = src.load()
            for crf in args.crf:
                le, back = Path(tmp) / f"{name}_crf{crf}", Path(tmp) / f"{name}_crf{crf}.zarr"
                t0 = time.perf_counter()
                _run([EXE, "data", "export", "lerobot", str(store_path), "--out", str(le), "--crf", str(crf)])
                export_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                _run([EXE, "data", "import", "lerobot", str(le), "--out", str(back)])
                import_s = time.perf_counter() - t0
                got = EpisodeStore.open(back).load()
                for k in original:
                    if k != key and not np.array_equal(original[k], got[k]):
                        raise SystemExit(f"{name}: key {k!r} changed in the round trip")
                a, b = original[key], got[key]
                per_frame = [psnr(x, y) for x, y in zip(a, b)]
                mp4_bytes = sum(f.stat().st_size for f in (le / "videos").rglob("*.mp4"))
                row = {"store": name, "key": key, "shape": list(a.shape[1:]), "frames": int(len(a)),
                       "episodes": src.n_episodes, "crf": crf, "gop": 2,
                       "psnr_db": round(psnr(a, b), 2), "worst_frame_psnr_db": round(min(per_frame), 2),
                       "max_abs_error": int(np.max(np.abs(a.astype(np.int16) - b.astype(np.int16)))),
                       "mp4_bytes_per_frame": round(mp4_bytes / len(a), 1),
                       "raw_bytes_per_frame": int(np.prod(a.shape[1:])),
                       "export_s": round(export_s, 2), "import_s": round(import_s, 2),
                       "collect_s": round(collect_s, 1), "other_keys_exact": True}
                print(json.dumps(row), flush=True)
                rows.append(row)
    args.out.write_text(json.dumps({"what": "PSNR of camera frames after robolearn data export lerobot -> "
                                            "import (h264, yuv420p, libx264 via PyAV)",
                                    "machine": os.uname().machine, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
