"""Block caching over the warm start (RTI-DP), through the commands a user would run: is the cached warm start
faster than the warm start alone, at the same success?

For a transformer diffusion checkpoint and a warm start of ``--warm-steps`` W (the last W of the sampler's steps,
run from the previous chunk), this script

1. calibrates a schedule for the warm start's own steps (``robolearn accel calibrate warm_steps=W
   updates=K``: BAC's scheduler on the last W steps; ``--method`` picks bac, shared or uniform);
2. times the cached warm start against the plain one, alternating call by call in one process (``robolearn
   bench latency warm_steps=W``: speedup, relative action error);
3. runs the real-time runner (``robolearn run blend=warmstart warm_steps=W mode=sync realtime=false``, which
   charges each inference's measured time against the control tick) with the plain and the cached checkpoint
   on the same seeds, one block of ``--episodes`` per ``--seeds`` entry, and counts the episodes each won and
   lost against the other.

    python tools/bench/cache_warm_eval.py --checkpoint runs/accel/lift_dt3/checkpoints/latest --label lift_dt3 \\
        --warm-steps 2 --updates 1 --out tools/bench/results/cache_lift_warm2_window.json

Prints a table; the JSON holds every number. Run it alone, or give it one thread beside one other job: the
runner's deadlines are charged with measured inference time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_eval import ROOT, cli, lost_won  # noqa: E402  (the same subprocess and pairing helpers)


def per_episode(run: dict[str, Any]) -> dict[int, bool]:
    report = json.loads((ROOT / run["report_path"]).read_text())
    return {int(e["seed"]): bool(e["success"]) for e in report["per_episode"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a diffusion/flow transformer checkpoint")
    p.add_argument("--label", required=True, help="names the cached checkpoint's folder")
    p.add_argument("--warm-steps", type=int, default=2, help="the warm start's steps (the runner's default: 2)")
    p.add_argument("--updates", type=int, default=1, help="update steps per branch within the warm start's steps")
    p.add_argument("--method", default="bac", choices=["bac", "shared", "uniform"])
    p.add_argument("--bubble", type=int, default=0)
    p.add_argument("--episodes", type=int, default=200, help="runner episodes per seed block")
    p.add_argument("--seeds", type=int, nargs="+", default=[100000], help="first seed of each block")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/accel"), help="where the cached checkpoint goes")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)

    t0 = time.time()
    W, th = int(a.warm_steps), f"threads={a.threads}"
    cached = a.runs / f"{a.label}_warm{W}" / f"{a.method}_k{a.updates}"
    cal = cli("accel", "calibrate", f"checkpoint={a.checkpoint}", f"method={a.method}", f"warm_steps={W}",
              f"updates={a.updates}", f"bubble={a.bubble}", f"out={cached}", "progress=false", th,
              threads=a.threads)
    lat = cli("bench", "latency", f"checkpoint={cached}", f"warm_steps={W}", "repeats=30", "observations=16",
              "progress=false", th, threads=a.threads)
    runs: dict[str, list[dict[str, Any]]] = {"warm_start": [], "cached": []}
    for seed in a.seeds:
        for name, ckpt in (("warm_start", a.checkpoint), ("cached", cached)):
            runs[name].append(cli("run", f"checkpoint={ckpt}", "blend=warmstart", f"warm_steps={W}", "mode=sync",
                                  "realtime=false", f"episodes={a.episodes}", f"seed={seed}", "status=false", th,
                                  threads=a.threads))
    base_ep: dict[int, bool] = {}
    cached_ep: dict[int, bool] = {}
    for r in runs["warm_start"]:
        base_ep.update(per_episode(r))
    for r in runs["cached"]:
        cached_ep.update(per_episode(r))
    lost, won = lost_won(base_ep, cached_ep)
    n = len(base_ep)

    def summary(name: str) -> dict[str, Any]:
        rs = runs[name]
        ep = base_ep if name == "warm_start" else cached_ep
        return {"success": round(sum(ep.values()) / n, 4),
                "success_per_block": [r["success_rate"] for r in rs],
                "latency_ms_p50_per_block": [r["latency_ms_p50"] for r in rs],
                "deadline_misses": sum(int(r["deadline_misses"]) for r in rs),
                "wall_s": round(sum(float(r["wall_s"]) for r in rs), 1)}

    result = {
        "bench": f"{a.method} caching scheduled for the warm start's last {W} steps (accel calibrate warm_steps={W} "
                 f"updates={a.updates}) against the warm start alone: bench latency and the runner on {n} seeds",
        "base": str(a.checkpoint), "cached": str(cached), "warm_steps": W, "updates": a.updates,
        "method": a.method, "bubble": a.bubble, "threads": a.threads, "seeds": a.seeds, "episodes": n,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "calibration": cal, "latency": lat,
        "warm_start": summary("warm_start"), "cached_warm_start": summary("cached"),
        "lost": lost, "won": won,
        "runs": runs, "wall_s": round(time.time() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    ws, cw = result["warm_start"], result["cached_warm_start"]
    print(f"\n| {W}-step warm start, {n} seeds | speedup (bench latency) | runner p50 ms | success | deadline misses |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| alone | 1.00x | {'/'.join(f'{v:.1f}' for v in ws['latency_ms_p50_per_block'])} | {ws['success']:.3f} | "
          f"{ws['deadline_misses']} |")
    print(f"| {a.method} k={a.updates} of {W} | {lat['speedup']:.2f}x (error {lat['action_rel_error']:.3f}) | "
          f"{'/'.join(f'{v:.1f}' for v in cw['latency_ms_p50_per_block'])} | {cw['success']:.3f} | "
          f"{cw['deadline_misses']} |")
    print(f"episodes lost / won by the cached warm start: {result['lost']} / {result['won']}; JSON: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
