#!/usr/bin/env python
"""How long ``robolearn data audit`` takes on a 1M-step store (the issue asks for "within minutes").

The big store is real peg_insert data made large: the episodes of a source store (default: the mixed clean/noisy
store of tools/bench/audit_experiment.py, else 200 freshly collected peg_insert demonstrations) appended again and
again, each copy with a little Gaussian jitter (std 1e-3 of each key's spread) so no two episodes are identical,
until the store holds ``--steps`` steps. Then ``robolearn data audit`` runs on it as a user would run it (default
options, no videos), timed from the outside, and its own per-stage timings are kept.

    .venv/bin/python tools/bench/audit_speed.py --steps 1000000
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

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("robolearn"))


def build(source: Path, out: Path, steps: int) -> None:
    from robolearn.data import EpisodeStore

    if out.exists():
        with EpisodeStore.open(out) as s:
            if s.n_steps >= steps:
                return
        import shutil

        shutil.rmtree(out)
    rng = np.random.default_rng(0)
    with EpisodeStore.open(source) as src:
        eps = [src.get_episode(i) for i in range(src.n_episodes)]
        attrs = src.all_episode_attrs()
        spread = {k: np.asarray(v) for k, v in ((k, src.stats()[k]["std"]) for k in src.schema
                                                if src.schema[k].dtype.startswith("float"))}
        with EpisodeStore.create(out, src.schema, fps=src.fps, task=src.task, env_config=src.env_config) as dst:
            copy = 0
            while dst.n_steps < steps:
                batch = []
                for ep in eps:
                    e = {k: (v + rng.normal(0, 1e-3, v.shape) * spread[k]).astype(v.dtype) if k in spread else v
                         for k, v in ep.items()}
                    batch.append(e)
                dst.append_episodes(batch, [{"seed": a.get("seed"), "copy": copy} for a in attrs])
                copy += 1
                print(f"\rbuilding {out}: {dst.n_steps:,} steps", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--source", type=Path, default=ROOT / "runs/audit_experiment/peg_insert/mixed.zarr")
    ap.add_argument("--store", type=Path, default=ROOT / "runs/audit_speed/big.zarr")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/audit_speed.json")
    args = ap.parse_args()
    if not args.source.exists():
        args.source = ROOT / "runs/audit_speed/peg.zarr"
        if not args.source.exists():
            subprocess.run([EXE, "collect", "task=peg_insert", "episodes=200", f"out={args.source}", "workers=2",
                            "progress=false"], check=True, cwd=ROOT)
    build(args.source, args.store, args.steps)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([EXE, "data", "audit", str(args.store), f"out={args.store.parent / 'audit'}", "videos=0",
                        "progress=false"], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_average_before": round(load, 2),
        "store_steps": summary["steps"], "store_episodes": summary["episodes"], "wall_s": round(wall, 1),
        "stages_s": summary["timings_s"], "options": "defaults (folds=5, fit_steps=1500, max_queries=40000), videos=0",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
