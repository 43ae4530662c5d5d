#!/usr/bin/env python
"""The README's results table: success rate per task x policy, trained on scripted demonstrations.

For each task: make sure ``data/<task>.zarr`` holds ``--demos`` clean scripted demonstrations (collecting the
missing ones), then for each policy run ``robolearn train`` with the same budget and evaluate the final EMA
weights on ``--episodes`` new seeds. Each (task, policy) result is appended to the JSON file as soon as it is
known, so an interrupted run keeps what it finished and ``--resume`` skips those.

    .venv/bin/python tools/bench/results_table.py --tasks lift peg_insert push_t can \
        --policies diffusion_unet flow_unet diffusion_transformer flow_transformer --steps 1500 --episodes 20
    # the README's longer-budget cells (one call per task/policy set; --resume keeps adding to one file)
    .venv/bin/python tools/bench/results_table.py --tasks can --policies flow_transformer diffusion_transformer \
        --steps 6000 --episodes 50 --runs-dir runs/long --out tools/bench/results/results_table_long.json --resume

Push-T's score is also reported as Diffusion Policy reports it: the mean over episodes of the episode's best
reward, clip(coverage / 0.95, 0, 1).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).with_name("robolearn"))
# The budget every policy gets (CPU-sized); backbone presets sized alike for U-Net and transformer.
COMMON = ["training.lr=1e-3", "training.warmup_steps=100", "training.batch_size=128", "training.val_every=0",
          "training.ckpt_every=100000", "training.progress=false", "eval.videos=0", "eval.num_envs=4"]
BACKBONE = {"unet": ["policy.backbone.down_dims=[32,64,128]"], "transformer": ["policy.backbone.preset=small"]}


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def ensure_demos(task: str, demos: int, workers: int) -> Path:
    """``data/<task>.zarr`` with at least ``demos`` episodes: collect appends the missing ones."""
    from robolearn.data import EpisodeStore

    out = ROOT / "data" / f"{task}.zarr"
    missing = demos - (EpisodeStore.open(out).n_episodes if out.exists() else 0)
    if missing > 0:
        r = subprocess.run([EXE, "collect", f"task={task}", f"episodes={missing}", f"out={out}",
                            f"workers={workers}", "progress=false"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"collecting {task} failed:\n{r.stderr[-2000:]}")
    return out


PUBLISHED = {"lift": "1.00", "can": "1.00", "push_t": "0.95 (coverage)", "peg_insert": "—", "square": "1.00 / 0.93"}


def markdown(done: dict) -> str:
    """Rows: tasks; columns: policies; each cell success rate (and Push-T's mean best coverage score)."""
    policies = list(dict.fromkeys(r["policy"] for r in done["rows"]))
    tasks = list(dict.fromkeys(r["task"] for r in done["rows"]))
    cell = {(r["task"], r["policy"]): r for r in done["rows"]}
    lines = ["| task | " + " | ".join(f"`{p}`" for p in policies) + " | Diffusion Policy (Chi et al., state) |",
             "| --- |" + " ---: |" * len(policies) + " ---: |"]
    for t in tasks:
        row = []
        for p in policies:
            r = cell.get((t, p))
            if r is None or "success_rate" not in r:
                row.append("—")
            elif t == "push_t":
                row.append(f"{r['success_rate']:.2f} (coverage {r['mean_max_reward']:.2f})")
            else:
                row.append(f"{r['success_rate']:.2f}")
        lines.append(f"| `{t}` | " + " | ".join(row) + f" | {PUBLISHED.get(t, '—')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["lift", "peg_insert", "push_t", "can"])
    ap.add_argument("--policies", nargs="+",
                    default=["diffusion_unet", "flow_unet", "diffusion_transformer", "flow_transformer"])
    ap.add_argument("--demos", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "tools/bench/results/results_table.json")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "table",
                    help="where each (task, policy) run folder goes")
    ap.add_argument("--resume", action="store_true", help="skip (task, policy) pairs already in --out")
    ap.add_argument("--markdown", action="store_true", help="print --out as the README's table and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return
    done = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {"rows": []}
    done.update({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "demos": args.demos, "steps": args.steps, "episodes": args.episodes,
        "budget": COMMON,
    })
    have = {(r["task"], r["policy"]) for r in done["rows"]}
    for task in args.tasks:
        data = ensure_demos(task, args.demos, args.workers)
        for policy in args.policies:
            if (task, policy) in have:
                continue
            backbone = "transformer" if "transformer" in policy else "unet"
            run_dir = args.runs_dir / f"{task}-{policy}"
            t0 = time.perf_counter()
            cmd = [EXE, "train", f"task={task}", f"policy={policy}", f"dataset={data}", f"run_dir={run_dir}",
                   f"training.steps={args.steps}", f"eval.episodes={args.episodes}",
                   f"eval.workers={args.workers}", *COMMON, *BACKBONE[backbone]]
            if run_dir.exists():
                shutil.rmtree(run_dir)
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                row = {"task": task, "policy": policy, "error": r.stderr.strip().splitlines()[-1:]}
            else:
                s = last_json(r.stdout)
                ev = json.loads(sorted((run_dir / "eval").glob("step_*.json"))[-1].read_text())
                row = {"task": task, "policy": policy, "success_rate": s["success_rate"],
                       "mean_max_reward": ev["mean_max_reward"], "episodes": s["eval_episodes"],
                       "final_loss": s["final_loss"], "parameters": s["parameters"],
                       "sampler": yaml.safe_load((run_dir / "config.yaml").read_text())["policy"]["sampler"],
                       "minutes": round((time.perf_counter() - t0) / 60, 1)}
            done["rows"].append(row)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(done, indent=1))
            print(json.dumps(row), flush=True)
    print(json.dumps({"rows": len(done["rows"]), "out": str(args.out)}))


if __name__ == "__main__":
    main()
