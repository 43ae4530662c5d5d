#!/usr/bin/env python
"""The runner's target with a trained checkpoint: async at 10 Hz with inference padded to 2.5 control periods
keeps every deadline and the success of offline evaluation; sync shows the misses.

All three measurements are made in this one run on the same seeds (``--seed``, ``--seed + 1``, ...):
  offline  ``robolearn eval``  (episode k starts from seed + k and draws the noise of (seed, k, chunk) exactly as
           the runner's episode k does, for any number of environments; no clock: the simulation waits)
  async    ``robolearn run mode=async realtime=true latency_s=0.25``
  sync     ``robolearn run mode=sync  realtime=true latency_s=0.25``

A real-time push_t episode lasts up to 30 s of wall-clock time, so ``--parallel K`` runs the episodes in K
``robolearn run`` processes at once (disjoint seed ranges; each process mostly sleeps while its padded inference
"thinks"). Counts (misses, dropped actions, episodes, successes) are summed over the processes; latency and
jitter percentiles are the worst process's.

    .venv/bin/python tools/bench/runtime_checkpoint.py --checkpoint runs/table/push_t-flow_unet/checkpoints/latest \
        --episodes 50 --parallel 5
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


def split(episodes: int, parts: int, seed: int) -> list[tuple[int, int]]:
    """(seed, episodes) per process: contiguous, disjoint seed ranges covering seed .. seed + episodes - 1."""
    parts = max(1, min(parts, episodes))
    out, start = [], seed
    for k in range(parts):
        n = episodes // parts + (1 if k < episodes % parts else 0)
        out.append((start, n))
        start += n
    return out


def run_parallel(args: argparse.Namespace, mode: str) -> dict:
    procs = []
    for k, (seed, n) in enumerate(split(args.episodes, args.parallel, args.seed)):
        cmd = [EXE, "run", f"checkpoint={args.checkpoint}", f"mode={mode}", f"rate_hz={args.rate}",
               f"latency_s={args.latency}", f"episodes={n}", f"seed={seed}", "status=false",
               f"run_dir={ROOT / 'runs/bench_runtime' / mode / f'part{k}'}"]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            cwd=ROOT)))
    parts = []
    for cmd, p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{err[-2000:]}")
        parts.append(last_json(out))
    episodes = sum(s["episodes"] for s in parts)
    successes = sum(round(s["success_rate"] * s["episodes"]) for s in parts)
    return {
        "success_rate": round(successes / max(episodes, 1), 4), "episodes": episodes, "processes": len(parts),
        "deadline_misses": sum(s["deadline_misses"] for s in parts),
        "actions_dropped": sum(s["actions_dropped"] for s in parts),
        "latency_ms_p50": max(s["latency_ms_p50"] for s in parts),
        "latency_ms_p99": max(s["latency_ms_p99"] for s in parts),
        "jitter_ms_p99": max(s["jitter_ms_p99"] for s in parts),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=100000)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--latency", type=float, default=0.25, help="inference padded to at least this (seconds)")
    ap.add_argument("--parallel", type=int, default=1, help="robolearn run processes per mode")
    ap.add_argument("--modes", nargs="+", default=["offline", "async", "sync"], choices=["offline", "async", "sync"])
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/runtime_checkpoint.json")
    args = ap.parse_args()
    load = os.getloadavg()
    t0 = time.time()
    rows: dict[str, dict] = {}
    if "offline" in args.modes:
        offline = call(["eval", f"checkpoint={args.checkpoint}", f"episodes={args.episodes}", f"seed={args.seed}",
                        f"num_envs={args.episodes}", "workers=2", "videos=0",
                        f"run_dir={ROOT / 'runs/bench_runtime/offline'}"])
        rows["offline"] = {"success_rate": offline["success_rate"], "episodes": offline["episodes"],
                           "mean_max_reward": offline.get("mean_max_reward")}
    for mode in ("async", "sync"):
        if mode in args.modes:
            rows[mode] = run_parallel(args, mode)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": load, "loadavg_end": os.getloadavg(),
        "checkpoint": args.checkpoint, "rate_hz": args.rate, "latency_s": args.latency, "seed": args.seed,
        "parallel": args.parallel, "seconds": round(time.time() - t0, 1), **rows,
    }
    if "async" in rows and "offline" in rows:
        result["async_minus_offline"] = round(rows["async"]["success_rate"] - rows["offline"]["success_rate"], 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{'':8} {'success':>8} {'episodes':>8} {'misses':>7} {'dropped':>8} {'lat p50':>8} {'jitter p99':>10}")
    for k in rows:
        r = rows[k]
        print(f"{k:8} {r['success_rate']:>8.2f} {r['episodes']:>8} {r.get('deadline_misses', '-')!s:>7} "
              f"{r.get('actions_dropped', '-')!s:>8} {r.get('latency_ms_p50', '-')!s:>8} "
              f"{r.get('jitter_ms_p99', '-')!s:>10}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
