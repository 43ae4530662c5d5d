"""Success rate of the scripted experts: run each task's expert for N seeded episodes.

Why: the experts make the demonstration datasets, so their success rate bounds what imitation can reach; this
script measures it the same way for every task (any name ``sim.make`` and ``sim.make_expert`` know, including the
robosuite tasks), one JSON line per task, and writes all of them to ``--out``.

    python tools/bench/expert_success.py --tasks push_t peg_insert --episodes 50 \
        --out tools/bench/results/expert_success.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runnable from a checkout without installing

import sim  # noqa: E402


def run_task(task: str, episodes: int, seed0: int, noise: float, overrides: dict[str, Any]) -> dict[str, Any]:
    """Episodes with seeds seed0..seed0+episodes-1 (env and expert seeded alike); returns a summary dict."""
    env = sim.make(task, **overrides)
    successes, lengths, failed = 0, [], []
    start = time.perf_counter()
    for i in range(episodes):
        seed = seed0 + i
        expert = sim.make_expert(task, noise=noise, seed=seed)
        obs, info = env.reset(seed=seed)
        expert.reset(env)
        # The registry documents act(obs, env); this project's own experts also take act(obs).
        takes_env = len(inspect.signature(expert.act).parameters) >= 2
        steps, success = 0, bool(info.get("success", False))
        while True:
            action = expert.act(obs, env) if takes_env else expert.act(obs)
            obs, _, terminated, truncated, info = env.step(action)
            steps += 1
            success = success or bool(info.get("success", False))
            if terminated or truncated or success:
                break
        successes += success
        lengths.append(steps)
        if not success:
            failed.append(seed)
    wall = time.perf_counter() - start
    env.close()
    return {
        "task": task,
        "episodes": episodes,
        "success_rate": successes / episodes,
        "mean_steps": sum(lengths) / episodes,
        "wall_s": round(wall, 3),
        "noise": noise,
        "seeds": [seed0, seed0 + episodes - 1],
        "failed_seeds": failed,
        "overrides": overrides,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["push_t", "peg_insert"])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="env override applied to every task, e.g. --override clearance=0.002")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {}
    for item in args.override:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value

    results = []
    for task in args.tasks:
        result = run_task(task, args.episodes, args.seed, args.noise, overrides)
        results.append(result)
        print(json.dumps(result), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version(),
            "results": results,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
