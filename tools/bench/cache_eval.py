"""Block-wise adaptive caching against uniform caching and no caching, on one trained transformer checkpoint:
batch-1 latency (same run) and success in the task (same seeds), through the CLI a user would run.

For a base checkpoint and a sampler (default: the checkpoint's), this script

1. calibrates BAC with ``--updates`` update steps per branch (``robolearn accel calibrate``);
2. makes the uniform baseline at the same compute: every branch updated at ``round(f * steps)`` evenly spaced
   steps, ``f`` BAC's fraction of branch computations after Bubbling Union (``--uniform-updates`` overrides);
3. times each against the uncached base in the same process, alternating call by call (``robolearn bench
   latency``: speedup, latency, relative action error on observations from the training data);
4. evaluates uncached, BAC and uniform on the same ``--episodes`` seeds (``robolearn eval``).

``--shared`` adds a row for ``method=shared`` at the uniform baseline's update count: the same dynamic program
on the branches' mean similarity, one set of update steps for every branch (BAC's scheduler without per-branch
steps; at equal compute it runs faster than BAC, whose staggered steps leave a few branches to compute at most
steps). ``--step-weights`` adds a row for BAC calibrated with ``step_weights=true`` at BAC's update count: the
same scheduler with each step's lost similarity weighed by how much an error at that step moves the chunk (our
extension).

    python tools/bench/cache_eval.py --checkpoint runs/accel/push_t_dt/checkpoints/latest --label push_t_ddpm100 \\
        --episodes 50 --out tools/bench/results/cache_push_t_ddpm100.json

Prints a table; the JSON (and a PNG beside it) hold every number. Run it alone: the latencies are only
comparable within one quiet run.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, threads: int | None = None) -> dict[str, Any]:
    """``robolearn ARGS`` in a fresh process; its last-line JSON (stderr passes through)."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("MUJOCO_GL", "egl")
    cmd = [sys.executable, "-m", "robolearn.cli", *args]
    print("$ robolearn " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"robolearn {' '.join(args)} failed with status {proc.returncode}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def eval_episodes(run_dir: str | Path) -> dict[int, bool]:
    """Seed -> success of each episode of a ``robolearn eval`` run folder (its ``eval/*.json``)."""
    (report,) = sorted((ROOT / run_dir / "eval").glob("*.json"))[-1:]
    return {int(e["seed"]): bool(e["success"]) for e in json.loads(report.read_text())["per_episode"]}


def lost_won(ref: dict[int, bool], other: dict[int, bool]) -> list[int]:
    """[episodes ``ref`` succeeded and ``other`` failed, the reverse], over the same seeds."""
    if set(ref) != set(other):
        raise SystemExit("paired evaluations saw different seeds")
    return [sum(ref[s] and not other[s] for s in ref), sum(other[s] and not ref[s] for s in ref)]


def reused_eval(path: Path, checkpoint: Path, sampler: str, seed: int, episodes: int) -> dict[str, Any]:
    """An earlier ``robolearn eval`` result, checked to be the evaluation this run would make."""
    ev = json.loads(Path(path).read_text())
    if ev.get("dtype", "float32") not in ("float32", "fp32") or ev.get("graph"):
        raise SystemExit(f"--uncached-eval {path}: it sampled with dtype={ev.get('dtype')} graph={ev.get('graph')}; "
                         f"the uncached baseline must be the float32 policy")
    extra = ROOT / checkpoint / "extra.json"  # the training step: `latest` may point elsewhere since
    step = json.loads(extra.read_text()).get("step") if extra.exists() else None
    got = ((ROOT / ev["checkpoint"]).resolve(), ev.get("step"), f"{ev['sampler']['kind']}-{ev['sampler']['steps']}",
           ev["seed"], ev["episodes"])
    want = ((ROOT / checkpoint).resolve(), step, sampler, seed, episodes)
    if got != want:
        raise SystemExit(f"--uncached-eval {path}: it evaluated (checkpoint, step, sampler, seed, episodes) "
                         f"{got}, this run needs {want}")
    return ev


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="a diffusion/flow transformer checkpoint")
    p.add_argument("--label", required=True, help="names the cached checkpoints' folder and the rows")
    p.add_argument("--updates", type=int, default=None, help="BAC update steps per branch (default: steps/4)")
    p.add_argument("--uniform-updates", type=int, default=None,
                   help="uniform baseline's update steps (default: BAC's compute fraction x steps)")
    p.add_argument("--bubble", type=int, default=4)
    p.add_argument("--metric", default="cosine", choices=["cosine", "l1"])
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--observations", type=int, default=256, help="calibration observations")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--num-envs", type=int, default=10)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=100000)
    p.add_argument("--repeats", type=int, default=20, help="timed predict_action calls of each")
    p.add_argument("--threads", type=int, default=2, help="torch threads for latency (evaluations use them too)")
    p.add_argument("--skip-eval", action="store_true", help="latency and action error only")
    p.add_argument("--step-weights", action="store_true",
                   help="also BAC with step_weights=true (each step's lost similarity weighed by how much an error "
                        "there moves the chunk; our extension) at BAC's update count")
    p.add_argument("--shared", action="store_true",
                   help="also method=shared (one adaptive set of steps for every branch) at uniform's update count")
    p.add_argument("--uncached-eval", type=Path, default=None,
                   help="the result.json of an earlier uncached evaluation of this checkpoint, sampler, seeds and "
                        "episode count (e.g. another --updates on the same base): reused instead of evaluating again")
    p.add_argument("--work-dir", type=Path, default=Path("runs/accel"))
    p.add_argument("--out", type=Path, required=True, help="JSON results (a PNG is written beside it)")
    args = p.parse_args(argv)

    t_start = time.time()
    work = args.work_dir / args.label
    sampler = [f"sampler={args.sampler}"] if args.sampler else []
    sampler += [f"steps={args.steps}"] if args.steps else []
    common = [f"checkpoint={args.checkpoint}", *sampler, "progress=false"]
    def calibrate_bac(folder: str, *extra: str) -> dict[str, Any]:
        return cli("accel", "calibrate", *common, "method=bac", f"bubble={args.bubble}", f"metric={args.metric}",
                   f"observations={args.observations}", f"out={work / folder}", *extra, threads=args.threads)

    def bac_row(summary: dict[str, Any]) -> dict[str, Any]:
        return {"method": "bac", "updates": summary["updates"], "compute_fraction": summary["compute_fraction"],
                "bubbled": summary["bubbled"], "checkpoint": summary["checkpoint"]}

    bac = calibrate_bac("bac", *([f"updates={args.updates}"] if args.updates else []))
    k_uni = args.uniform_updates or max(1, round(bac["compute_fraction"] * bac["steps"]))
    uni = cli("accel", "calibrate", *common, "method=uniform", f"updates={k_uni}", f"out={work / 'uniform'}",
              threads=args.threads)
    rows: dict[str, dict[str, Any]] = {
        "uncached": {"method": "none", "compute_fraction": 1.0},
        "bac": bac_row(bac),
        "uniform": {"method": "uniform", "updates": k_uni, "compute_fraction": uni["compute_fraction"],
                    "checkpoint": uni["checkpoint"]},
    }
    if args.step_weights:
        bw = calibrate_bac("bac_weighted", "step_weights=true", f"updates={bac['updates']}")
        rows["bac_weighted"] = {**bac_row(bw), "step_weights": bw["step_weights"]}
    if args.shared:
        sh = cli("accel", "calibrate", *common, "method=shared", f"metric={args.metric}", f"updates={k_uni}",
                 f"observations={args.observations}", f"out={work / 'shared'}", threads=args.threads)
        rows["shared"] = {"method": "shared", "updates": k_uni, "compute_fraction": sh["compute_fraction"],
                          "checkpoint": sh["checkpoint"]}
    cached = [name for name in rows if name != "uncached"]
    for name in cached:
        lat = cli("bench", "latency", f"checkpoint={rows[name]['checkpoint']}", f"repeats={args.repeats}",
                  f"threads={args.threads}", "observations=32", "progress=false", threads=args.threads)
        rows[name].update({k: lat[k] for k in ("speedup", "latency_ms_cached", "latency_ms_uncached",
                                               "action_rel_error", "action_rel_error_max",
                                               "measured_compute_fraction", "load_avg", "latency_ms_memo_only",
                                               "speedup_memo_only")})
    if not args.skip_eval:
        episodes: dict[str, dict[int, bool]] = {}
        ev_common = [f"episodes={args.episodes}", f"num_envs={args.num_envs}", f"workers={args.workers}",
                     f"seed={args.seed}"]
        for name in rows:
            ckpt = rows[name].get("checkpoint", str(args.checkpoint))
            extra = []
            if name == "uncached":
                kind, _, steps = bac["sampler"].rpartition("-")
                extra = [f"sampler.kind={kind}", f"sampler.steps={steps}"]
            if name == "uncached" and args.uncached_eval:
                ev = reused_eval(args.uncached_eval, args.checkpoint, bac["sampler"], args.seed, args.episodes)
                rows[name]["eval_reused_from"] = str(args.uncached_eval)
                wall = float(ev["eval_s"])  # its own evaluation's time
            else:
                t0 = time.time()
                ev = cli("eval", f"checkpoint={ckpt}", *ev_common, *extra,
                         f"run_dir={work / ('eval_' + name)}", threads=args.threads)
                wall = time.time() - t0
            rows[name].update(success_rate=ev["success_rate"], mean_return=ev.get("mean_return"),
                              eval_episodes=ev["episodes"], eval_wall_s=round(wall, 1),
                              mean_max_reward=ev.get("mean_max_reward"))
            episodes[name] = eval_episodes(ev["run_dir"])
        for name in cached:  # paired: the same seeds and initial noise as the uncached evaluation
            rows[name]["lost_won_vs_uncached"] = lost_won(episodes["uncached"], episodes[name])
    result = {
        "bench": "block-wise adaptive caching vs uniform caching vs none (tools/bench/cache_eval.py)",
        "label": args.label, "checkpoint": str(args.checkpoint), "sampler": bac["sampler"], "steps": bac["steps"],
        "calibration": {"observations": bac["observations"], "metric": args.metric, "bubble": args.bubble},
        "episodes": None if args.skip_eval else args.episodes, "seed": args.seed, "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "wall_s": round(time.time() - t_start),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({"out": str(args.out), **{f"{k}_success": v.get("success_rate") for k, v in rows.items()},
                      **{f"{k}_speedup": v.get("speedup") for k, v in rows.items() if "speedup" in v}}))
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['label']}: {result['sampler']}, {result['episodes']} episodes")
    print(f"{'':<12} {'compute':>8} {'speedup':>8} {'cached ms':>10} {'uncached ms':>12} {'action err':>11} "
          f"{'success':>8} {'max reward':>10}")
    for name, r in result["rows"].items():
        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"
        print(f"{name:<12} {f('compute_fraction', '.0%'):>8} {f('speedup', '.2f'):>8} "
              f"{f('latency_ms_cached', '.1f'):>10} {f('latency_ms_uncached', '.1f'):>12} "
              f"{f('action_rel_error', '.2e'):>11} {f('success_rate', '.2f'):>8} {f('mean_max_reward', '.3f'):>10}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    speed = [rows[n].get("speedup", 1.0) for n in names]
    err = [rows[n].get("action_rel_error", 0.0) for n in names]
    succ = [rows[n].get("success_rate") for n in names]
    colors = ["0.6", "tab:blue", "tab:orange", "tab:green", "tab:red"][:len(names)]
    axes[0].bar(names, speed, color=colors)
    axes[0].set_ylabel("speedup over uncached (batch 1)")
    axes[1].bar(names, err, color=colors)
    axes[1].set_ylabel("relative action error vs uncached")
    if all(s is not None for s in succ):
        axes[2].bar(names, succ, color=colors)
        axes[2].set_ylim(0, 1)
        axes[2].set_ylabel(f"success ({result['episodes']} episodes, same seeds)")
    else:
        axes[2].axis("off")
    fig.suptitle(f"{result['label']}: caching over {result['sampler']} "
                 f"(BAC {rows['bac']['compute_fraction']:.0%} / uniform {rows['uniform']['compute_fraction']:.0%} "
                 f"of branch computations)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
