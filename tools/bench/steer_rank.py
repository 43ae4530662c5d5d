#!/usr/bin/env python
"""Deploy ranking of a steered policy: success and inference cost against the number of ranked noises.

For each checkpoint (a steered policy of ``variant=na``, which holds its run's action critic) and each ``--ranks``
K, runs ``robolearn eval checkpoint=... rank=K`` on the same held-out seeds (from ``--seed``; every K sees the same
initial states, and each episode's chunk noise, which seeds its extra draws, is the same) and times
``predict_action`` at batch 1 on one training-like observation (the median of ``--timing-calls`` calls, one
thread). ``--base`` adds the base itself (its own N(0, I) noise rule) through the same command. K=1 is the actor's
own choice. Writes JSON and a PNG (success against K, one line per checkpoint, the base as a dashed line).

    .venv/bin/python tools/bench/steer_rank.py --checkpoints runs/steer_pt/na_mc/checkpoints/step_0000150000 \\
        --base runs/steer_pt/base/checkpoints/latest --ranks 1 2 4 8 16 32 --episodes 100 \\
        --out tools/bench/results/steer_rank_push_t.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
ROOT = Path(__file__).resolve().parents[2]


def eval_cli(checkpoint: Path, episodes: int, run_dir: Path, rank: int | None, seed: int = 100000
             ) -> dict[str, Any]:
    """``robolearn eval`` as a user runs it; its last line is the result JSON."""
    cmd = [str(Path(sys.executable).with_name("robolearn")), "eval", f"checkpoint={checkpoint}",
           f"episodes={episodes}", "num_envs=10", "workers=0", f"seed={seed}", "threads=1", f"run_dir={run_dir}"]
    if rank is not None:
        cmd.append(f"rank={rank}")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def latency_ms(checkpoint: Path, rank: int | None, calls: int) -> float:
    """Median ``predict_action`` time at batch 1 (one thread) on an observation from the base's training data."""
    import torch

    from robolearn.cli.accel import calibration_observations
    from robolearn.cli.runtime import load_checkpoint

    torch.set_num_threads(1)
    policy = load_checkpoint(checkpoint)
    if rank is not None:
        policy.set_rank(rank)
    base_ckpt = Path(policy.base.checkpoint_path) if getattr(policy, "wraps_base", False) else checkpoint
    obs = calibration_observations(getattr(policy, "base", policy), base_ckpt, 1, 1, seed=0)[0]
    gen = torch.Generator().manual_seed(0)
    times = []
    with torch.no_grad():
        for i in range(calls + 3):
            noise = torch.randn(policy.noise_shape(1), generator=gen)
            t0 = time.perf_counter()
            policy.predict_action(obs, noise)
            if i >= 3:  # warm-up calls excluded
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ckpt, rows in doc["checkpoints"].items():
        ax.plot([r["rank"] for r in rows], [r["success_rate"] for r in rows], "o-", label=Path(ckpt).name)
    if doc.get("base"):
        ax.axhline(doc["base"]["success_rate"], ls="--", color="grey", label="base (its own noise)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("noises ranked per decision (rank; 1 = the actor's choice)")
    ax.set_ylabel(f"success rate ({doc['episodes']} held-out seeds from {doc['seed']})")
    ax.set_title(f"deploy ranking by the action critic, {doc['task']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True, help="steered checkpoints of variant=na")
    p.add_argument("--base", type=Path, default=None, help="also evaluate the base checkpoint itself")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=100000, help="first held-out seed (fine-tuning evaluates from 100000; "
                                                             "another start gives initial states no run has seen)")
    p.add_argument("--timing-calls", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("runs/bench/steer_rank"), help="eval run folders")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t0 = time.time()
    doc: dict[str, Any] = {"bench": "steer_rank (tools/bench/steer_rank.py)", "episodes": args.episodes,
                           "seed": args.seed,
                           "ranks": args.ranks, "checkpoints": {}, "base": None,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, Python "
                                      f"{platform.python_version()}", "threads": 1,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.base is not None:
        folder = args.work / f"base_{args.base.parent.parent.name}_s{args.seed}"
        r = eval_cli(args.base, args.episodes, folder, None, args.seed)
        doc["base"] = {"checkpoint": str(args.base), "success_rate": r["success_rate"], "score": r.get("score"),
                       "latency_ms": round(latency_ms(args.base, None, args.timing_calls), 2)}
        doc["task"] = r["task"]
        print(f"base: success {r['success_rate']:.2f}, {doc['base']['latency_ms']:.1f} ms per chunk", flush=True)
    for ckpt in args.checkpoints:
        rows = []
        for k in args.ranks:
            folder = args.work / f"{ckpt.parent.parent.name}_{ckpt.name}_r{k}_s{args.seed}"
            r = eval_cli(ckpt, args.episodes, folder, k, args.seed)
            doc["task"] = r["task"]
            row = {"rank": k, "success_rate": r["success_rate"], "score": r.get("score"),
                   "mean_length": r.get("mean_length"), "eval_s": r.get("eval_s"),
                   "latency_ms": round(latency_ms(ckpt, k, args.timing_calls), 2)}
            rows.append(row)
            print(f"{ckpt} rank {k:3d}: success {row['success_rate']:.2f}, {row['latency_ms']:.1f} ms per chunk "
                  f"({time.time() - t0:.0f} s)", flush=True)
        doc["checkpoints"][str(ckpt)] = rows
    doc["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(doc, args.out.with_suffix(".png"))
    print(json.dumps({"bench": "steer_rank", "out": str(args.out), "wall_s": doc["wall_s"]}))


if __name__ == "__main__":
    main()
