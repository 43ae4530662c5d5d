#!/usr/bin/env python
"""robomimic import speed, this checkout against an older one, interleaved in the same run.

Runs ``tools/bench/import_robomimic.py --no-cli`` (low-dim, two-camera and one-camera 84x84 files of 200 Lift-like
demos) with the code of ``--old`` (a checkout, e.g. ``git worktree add /tmp/wt_old 6e18a64``) and of this
checkout, alternating ``--rounds`` times, and writes every run's medians and the new/old ratios of the medians
of all runs. Absolute steps/s on this shared 2-core machine vary between hours (the disk above all), so the
ratio measured in one run is the number to compare.

    .venv/bin/python tools/bench/import_robomimic_ab.py --old /tmp/wt_old [--rounds 2] [--repeats 2]
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("low_dim", "image", "image_one_camera")


def run_one(code: Path, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="import_ab_") as tmp:
        out = Path(tmp) / "r.json"
        env = {**os.environ, "PYTHONPATH": str(code)}
        subprocess.run([sys.executable, str(ROOT / "tools/bench/import_robomimic.py"), "--no-cli", "--repeats",
                        str(repeats), "--out", str(out)], env=env, check=True, capture_output=True, text=True)
        result = json.loads(out.read_text())
    return {k: result[k]["median_steps_per_s"] for k in KINDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the baseline commit")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="imports of each file per run (median kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/import_robomimic_ab.json")
    args = ap.parse_args()
    if not (args.old / "robolearn" / "data" / "store.py").exists():
        ap.error(f"--old {args.old} is not a robolearn checkout (no robolearn/data/store.py)")
    old_rev = subprocess.run(["git", "-C", str(args.old), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    new_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    load = list(os.getloadavg())
    for r in range(args.rounds):
        for name, code in (("old", args.old), ("new", ROOT)):
            runs[name].append(run_one(code, args.repeats))
            print(f"round {r} {name}: {runs[name][-1]}", flush=True)
    medians = {name: {k: float(np.median([x[k] for x in v])) for k in KINDS} for name, v in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "cpus": os.cpu_count(),
              "load_before": load, "load_after": list(os.getloadavg()), "old": str(args.old), "old_rev": old_rev,
              "new_rev": new_rev + ("+changes" if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet"]).returncode
                                    else ""),
              "rounds": args.rounds, "repeats": args.repeats, "runs": runs, "medians": medians,
              "ratio_new_over_old": {k: round(medians["new"][k] / medians["old"][k], 2) for k in KINDS}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"medians": medians, "ratio_new_over_old": result["ratio_new_over_old"]}))


if __name__ == "__main__":
    main()
