#!/usr/bin/env python
"""Camera-frame appends, this checkout against an older one, interleaved in the same run.

Commit d0d0367 names each one-frame chunk of a zarr 3 camera array ``c.<i>.0.0.0`` in the array's folder instead
of zarr's default ``c/<i>/0/0/0`` (three folders a frame). This times appending two 84x84 cameras (2,000 steps in
episodes of 50, through ``EpisodeStore.append_episode``) with the code of ``--old`` (a checkout of the commit
before, e.g. ``git worktree add /tmp/wt_old d0d0367~1``) and of this checkout, alternating ``--rounds`` times, one
thread each, and writes the steps per second of every run.

    .venv/bin/python tools/bench/frame_layout_ab.py --old /tmp/wt_old
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, shutil, sys, tempfile, time
import numpy as np
from robolearn.data import EpisodeStore, KeySpec
rng = np.random.default_rng(0)
frames = rng.integers(0, 255, (2000, 84, 84, 3), dtype=np.uint8)
frames[:, :40] = 0  # partly flat, as rendered frames are
out = []
for r in range(3):
    d = tempfile.mkdtemp(dir=sys.argv[1])
    schema = {"a": KeySpec((84, 84, 3), "uint8", "obs"), "b": KeySpec((84, 84, 3), "uint8", "obs"),
              "act": KeySpec((7,), "float32", "action")}
    s = EpisodeStore.create(d + "/x.zarr", schema, fps=20)
    t = time.perf_counter()
    for i in range(0, 2000, 50):
        s.append_episode({"a": frames[i:i + 50], "b": frames[i:i + 50], "act": np.zeros((50, 7), np.float32)})
    out.append(2000 / (time.perf_counter() - t))
    s.close()
    shutil.rmtree(d)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the commit before d0d0367")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/frame_layout_ab.json")
    args = ap.parse_args()
    scratch = ROOT / "runs" / "frame_layout_ab"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[float]] = {"old": [], "new": []}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, root in (("old", args.old), ("new", ROOT)):
            env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-c", CHILD, str(scratch)], capture_output=True, text=True,
                               env=env, cwd="/", check=True)
            runs[name] += [round(x, 1) for x in json.loads(r.stdout.strip().splitlines()[-1])]
            print(name, runs[name][-3:], flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": round(load, 2),
              "what": "two 84x84 cameras, 2,000 steps appended in episodes of 50, steps/s per run",
              "runs": runs, "median": med, "speedup": round(med["new"] / med["old"], 2)}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
