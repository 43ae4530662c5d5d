#!/usr/bin/env python
"""The runner's target with a trained checkpoint: async at 10 Hz with inference padded to 2.5 control periods
keeps every deadline and the success of offline evaluation; sync shows the misses.

All three measurements are made in this one run on the same seeds:
  offline  ``robolearn eval``  (vectorized, no clock)
  async    ``robolearn run mode=async realtime=true latency_s=0.25``
  sync     ``robolearn run mode=sync  realtime=true latency_s=0.25``

    .venv/bin/python tools/bench/runtime_checkpoint.py --checkpoint runs/table/push_t-diffusion_unet/checkpoints/latest
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
EXE = str(Path(sys.executable).with_name("robolearn"))


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def call(args: list[str]) -> dict:
    r = subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"robolearn {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return last_json(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=100000)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--latency", type=float, default=0.25, help="inference padded to at least this (seconds)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/runtime_checkpoint.json")
    args = ap.parse_args()
    load = os.getloadavg()
    offline = call(["eval", f"checkpoint={args.checkpoint}", f"episodes={args.episodes}", f"seed={args.seed}",
                    "num_envs=1", "workers=0", f"run_dir={ROOT / 'runs/bench_runtime/offline'}"])
    rows = {"offline": {"success_rate": offline["success_rate"], "episodes": offline["episodes"]}}
    for mode in ("async", "sync"):
        s = call(["run", f"checkpoint={args.checkpoint}", f"mode={mode}", f"rate_hz={args.rate}",
                  f"latency_s={args.latency}", f"episodes={args.episodes}", f"seed={args.seed}", "status=false",
                  f"run_dir={ROOT / 'runs/bench_runtime' / mode}"])
        rows[mode] = {k: s.get(k) for k in ("success_rate", "episodes", "deadline_misses", "actions_dropped",
                                             "latency_ms_p50", "latency_ms_p99", "jitter_ms_p99")}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "loadavg_start": load, "loadavg_end": os.getloadavg(),
        "checkpoint": args.checkpoint, "rate_hz": args.rate, "latency_s": args.latency, **rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'':8} {'success':>8} {'misses':>7} {'dropped':>8} {'lat p50':>8} {'jitter p99':>10}")
    for k in ("offline", "async", "sync"):
        r = rows[k]
        print(f"{k:8} {r['success_rate']:>8.2f} {r.get('deadline_misses', '-')!s:>7} "
              f"{r.get('actions_dropped', '-')!s:>8} {r.get('latency_ms_p50', '-')!s:>8} "
              f"{r.get('jitter_ms_p99', '-')!s:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
