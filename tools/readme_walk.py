"""Walk the README's commands, with small numbers, on a fresh clone, and print each one's time and exit status.

    python tools/readme_walk.py                      # clone HEAD into a temporary folder, make .venv there, walk
    python tools/readme_walk.py --keep --dir /tmp/w  # ... in a folder of your choice, kept afterwards
    python tools/readme_walk.py --out tools/bench/results/readme_walk.json

What a newcomer does after reading the README: create the environment (`make venv`, the first half of `make demo`
and `make test`), run the quickstart, collect demonstrations, look at and edit the store, train, evaluate (a run
folder as the checkpoint), fine-tune with both methods, calibrate block caching and time it, run a policy on the
virtual clock and through the policy server, benchmark an environment, and run the README's Python snippets. The
numbers are small (episodes, steps) so the walk takes minutes; the commands are the README's. Every command must
exit 0; the table is the last thing printed (and JSON with --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The README's Python snippets ("The episode store", "Loading a checkpoint from Python"), with small arrays.
SNIPPET = textwrap.dedent('''
    import numpy as np
    import sim
    from robolearn.data import EpisodeStore, KeySpec, SequenceDataset, Normalizer
    from robolearn.evaluation import PolicyActor, evaluate
    from robolearn.policies import load_policy
    from sim.vector import make_vector_env


    def main() -> None:
        schema = {"agent_pos": KeySpec((2,), "float32", "obs"), "action": KeySpec((2,), "float32", "action")}
        with EpisodeStore.create("data/mine.zarr", schema, fps=10, task="push_t") as store:
            for n in (30, 40):
                store.append_episode({"agent_pos": np.random.rand(n, 2).astype("float32"),
                                      "action": np.random.rand(n, 2).astype("float32")})
        ds = SequenceDataset("data/mine.zarr", horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=0.1, seed=0)
        batch = next(iter(ds.batches(8, epochs=None)))
        norm = Normalizer.from_stats(ds.stats(), {"agent_pos": "minmax", "action": "minmax"})

        policy = load_policy("runs/walk/peg")      # a run folder: its latest checkpoint
        obs = {k: np.zeros((1, policy.n_obs_steps, *shape), np.float32) for k, shape in policy.obs_shapes.items()}
        chunk = policy.predict_action(obs)
        print("chunk", tuple(chunk.shape))
        env = sim.make("peg_insert")
        actor = PolicyActor(policy, noise_seed=0)
        obs, info = env.reset(seed=0)
        actor.reset(env)
        while True:
            obs, reward, terminated, truncated, info = env.step(actor.act(obs))
            if terminated or truncated:
                break
        venv = make_vector_env("peg_insert", num_envs=2, num_workers=2)
        print(evaluate(policy, venv, seeds=range(2))["success_rate"])


    if __name__ == "__main__":
        main()
''')



def steps(python: str) -> list[tuple[str, str]]:
    """(label, shell command) in README order; ``rl`` is the clone's robolearn command."""
    rl = ".venv/bin/robolearn"
    small_train = "training.steps=200 training.progress=false eval.episodes=4"
    return [
        ("make venv (fresh .venv: pip, torch CPU build)", "make venv"),
        ("robolearn quickstart (small: 20 demos, 300 steps)",
         f"{rl} quickstart episodes=20 train_steps=300 eval_episodes=5 progress=false"),
        ("collect push_t", f"{rl} collect task=push_t episodes=10 out=data/push_t.zarr progress=false"),
        ("collect lift, 2 workers, noisy expert",
         f"{rl} collect task=lift episodes=6 workers=2 expert.noise=0.3 out=data/lift_noisy.zarr progress=false"),
        ("collect push_t again (appends)", f"{rl} collect task=push_t episodes=2 out=data/push_t.zarr progress=false"),
        ("data info", f"{rl} data info data/push_t.zarr"),
        ("data info --json", f"{rl} data info data/push_t.zarr --json"),
        ("data validate", f"{rl} data validate data/push_t.zarr"),
        ("data drop", f"{rl} data drop data/push_t.zarr --episodes 3,5"),
        ("data merge", f"{rl} data merge data/push_t.zarr data/push_t.zarr --out data/pt2.zarr"),
        ("bench env", f"{rl} bench env task=peg_insert steps=2000"),
        ("collect peg_insert", f"{rl} collect task=peg_insert episodes=20 out=data/peg_insert.zarr progress=false"),
        ("train peg_insert diffusion_unet (defaults, 200 steps)",
         f"{rl} train task=peg_insert policy=diffusion_unet {small_train} run_dir=runs/walk/peg"),
        ("train --cfg job", f"{rl} train task=can policy=flow_unet --cfg job"),
        ("eval a run folder", f"{rl} eval checkpoint=runs/walk/peg episodes=4 sampler.steps=4 video=true "
                              f"run_dir=runs/walk/eval"),
        ("train push_t diffusion_transformer",
         f"{rl} train task=push_t policy=diffusion_transformer {small_train} run_dir=runs/walk/pt_dt"),
        ("accel calibrate (BAC)", f"{rl} accel calibrate checkpoint=runs/walk/pt_dt/checkpoints/latest "
                                  "sampler=ddim steps=10 updates=4 observations=32 progress=false"),
        ("bench latency", f"{rl} bench latency checkpoint=runs/walk/pt_dt/checkpoints/latest-bac-ddim-10-k4 "
                          "repeats=5 progress=false"),
        ("eval cache=uniform", f"{rl} eval checkpoint=runs/walk/pt_dt cache=uniform cache_updates=4 "
                               "sampler.kind=ddim sampler.steps=10 episodes=2 run_dir=runs/walk/eval_cache"),
        ("finetune method=residual", f"{rl} finetune method=residual checkpoint=runs/walk/peg env_steps=4096 "
                                     "num_envs=4 workers=0 eval.episodes=4 eval.every=0 progress=false "
                                     "run_dir=runs/walk/residual"),
        ("finetune method=steer", f"{rl} finetune method=steer checkpoint=runs/walk/peg env_steps=2000 "
                                  "num_envs=4 workers=0 eval.episodes=4 eval.every=0 progress=false "
                                  "run_dir=runs/walk/steer"),
        ("eval the residual", f"{rl} eval checkpoint=runs/walk/residual episodes=4 run_dir=runs/walk/eval_res"),
        ("collect policy=", f"{rl} collect task=peg_insert policy=runs/walk/residual episodes=1 keep_failures=true "
                            "out=data/peg_rl.zarr progress=false"),
        ("run, virtual clock", f"{rl} run checkpoint=runs/walk/peg realtime=false latency_s=0.25 episodes=1 "
                               "status=false video=true run_dir=runs/walk/run"),
        ("run, real time, async", f"{rl} run checkpoint=runs/walk/peg mode=async duration_s=5 status=false "
                                  "run_dir=runs/walk/run_rt"),
        ("serve + run policy=ws://", f"bash -c '{rl} serve checkpoint=runs/walk/peg port=8765 token=secret & "
                                     "pid=$!; sleep 8; "
                                     f"{rl} run policy=ws://127.0.0.1:8765 token=secret task=peg_insert mode=async "
                                     "duration_s=5 status=false run_dir=runs/walk/run_ws; code=$?; kill $pid; "
                                     "wait $pid; exit $code'"),
        ("README Python snippets", f"{python} walk_snippet.py"),
    ]


def walk(root: Path, only: list[str] | None) -> list[dict]:
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    (root / "walk_snippet.py").write_text(SNIPPET)
    logs = root / "walk-logs"
    logs.mkdir(exist_ok=True)
    rows = []
    for i, (label, cmd) in enumerate(steps(".venv/bin/python")):
        if only and not any(o in label for o in only):
            continue
        log = logs / f"{i:02d}.log"
        print(f"[{i:02d}] {label}: {cmd}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, shell=True, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = -9
        seconds = time.perf_counter() - t0
        rows.append({"step": i, "command": label, "shell": cmd, "seconds": round(seconds, 1), "exit": code,
                     "log": str(log)})
        print(f"     exit {code} in {seconds:.1f} s", flush=True)
        if code != 0:
            print(textwrap.indent("\n".join(log.read_text().splitlines()[-15:]), "     | "), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="clone here (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the clone afterwards")
    ap.add_argument("--only", nargs="*", help="walk only the steps whose label contains one of these words")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = ap.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="robolearn-walk-"))
    if not (root / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    t0 = time.perf_counter()
    try:
        rows = walk(root, args.only)
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    total = time.perf_counter() - t0
    print(f"\nREADME walk, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  {'seconds':>8}  exit")
    for r in rows:
        print(f"{r['command']:<{width}}  {r['seconds']:>8.1f}  {r['exit']}")
    failed = [r for r in rows if r["exit"] != 0]
    print(f"{'total':<{width}}  {total:>8.1f}  {len(failed)} failed")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"commit": commit, "date": time.strftime("%Y-%m-%d"), "total_s": round(total, 1),
                                        "cores": os.cpu_count(), "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
