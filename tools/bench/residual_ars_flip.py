"""How rugged is a task's success for a residual? One random-search iteration per perturbation size, no step.

For a base checkpoint, runs ``robolearn finetune finetune.learner=ars`` for one iteration at each ``--noise`` (the
step size ``ars_lr`` is 1e-12, so nothing is learned) and reports, per size, the perturbed episodes' success and
``pair_flip_rate``: the share of (direction, scene) pairs whose sparse outcome differs between ``theta + nu d`` and
``theta - nu d`` on the same seeded scene with the same chunk noise, and ``residual_abs``, the perturbed corrections'
mean size in normalized action units (``action_scale x |tanh(...)|``; the first iteration standardizes nothing yet,
so its inputs are the base-normalized observations). A flip rate near 0 means opposite small
corrections end the same way (a smooth landscape a gradient estimate can follow); a high one at sizes that barely
move the actions means the outcome is decided by details far below the scale of any correction worth learning.

    python tools/bench/residual_ars_flip.py --checkpoint runs/rl/peg_base/checkpoints/latest \\
        --noise 1e-7 0.001 0.003 0.01 0.03 --out tools/bench/results/residual_ars_flip_peg_insert.json

Writes JSON (one row per size) and prints a table; run it alone (each row is ~30 s of 64 environments here).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_eval import cli  # noqa: E402 -- robolearn in a fresh process, one thread


def one_iteration(checkpoint: str, noise: float, args: argparse.Namespace) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="ars_flip_"))
    try:
        cli("finetune", "method=residual", f"checkpoint={checkpoint}", "finetune.learner=ars",
            f"finetune.ars_noise={noise}", "finetune.ars_lr=1e-12", f"finetune.ars_directions={args.directions}",
            f"finetune.ars_top={args.directions}", f"finetune.ars_states={args.states}", "env_steps=1",
            f"num_envs={args.num_envs}", "workers=0", "eval.episodes=0", f"seed={args.seed}", f"run_dir={run_dir}",
            "progress=false", "threads=1", threads=1)
        rec = next(json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "iteration" in ln)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"noise": noise, **{k: rec[k] for k in ("episodes", "train_success_rate", "return_plus", "return_minus",
                                                     "pair_flip_rate", "residual_abs", "rollout_s")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the base chunk policy's checkpoint folder")
    ap.add_argument("--noise", type=float, nargs="+", default=[1e-7, 0.001, 0.003, 0.01, 0.03])
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--states", type=int, default=8, help="seeded scenes; every direction and sign runs each")
    ap.add_argument("--num-envs", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for nu in args.noise:
        rows.append(one_iteration(args.checkpoint, nu, args))
        print(json.dumps(rows[-1]), flush=True)
    out = {"bench": "random-search flip rate by perturbation size (tools/bench/residual_ars_flip.py)",
           "checkpoint": args.checkpoint, "directions": args.directions, "states": args.states, "seed": args.seed,
           "rows": rows, "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"{'noise':>8} {'|correction|':>12} {'success':>8} {'flip rate':>9}")
    for r in rows:
        print(f"{r['noise']:>8g} {r['residual_abs']:>12.2e} {r['train_success_rate']:>8.3f} {r['pair_flip_rate']:>9.3f}")


if __name__ == "__main__":
    main()
