"""The similarity matrices behind BAC's schedules at DDIM-10 and at DDPM-100, side by side, for one transformer
checkpoint: how alike each branch's outputs are at neighbouring denoising steps, where BAC's dynamic program puts
its update steps because of that, and what those steps cost the chunk. No evaluation in the task.

For the checkpoint it calibrates BAC (``bubble=0``, cosine, 256 training observations drawn with seed 0) under
DDIM-10 with ``--ddim-updates`` update steps per branch and under DDPM-100 with ``--ddpm-updates``, measures each
DDIM step's chunk sensitivity (:func:`robolearn.accel.cache.step_sensitivity`, what ``step_weights=true`` uses),
and compares BAC's DDIM-10 schedule with uniform caching and with one shared set of steps by the chunk's relative
error against the uncached chunk (64 training observations drawn with seed 1, the same initial noise for both).

    python tools/bench/cache_similarity.py --checkpoint runs/accel/lift_dt6/checkpoints/latest \\
        --out tools/bench/results/cache_similarity_lift

writes ``OUT.json`` (per-step neighbour similarities, update counts, sensitivities, chunk errors) and ``OUT.png``
(the matrices and profiles). About 4 minutes on 2 threads here.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNIFORM_LIKE = (0, 2, 4, 6, 8)


def neighbour_profile(sim: dict[str, np.ndarray]) -> np.ndarray:
    """(branches, S - 1): each branch's similarity between step ``i`` and step ``i + 1``."""
    return np.stack([np.array([m[i, i + 1] for i in range(m.shape[0] - 1)]) for m in sim.values()])


def summary(sim: dict[str, np.ndarray], sched: Any) -> dict[str, Any]:
    prof = neighbour_profile(sim)
    S = prof.shape[1] + 1
    least = prof.argmin(axis=1)
    counts = np.zeros(S, dtype=int)
    for steps in sched.updates.values():
        counts[list(steps)] += 1
    return {
        "sampler": sched.sampler, "steps": S, "branches": len(sim),
        "neighbour_similarity_median": [round(float(v), 5) for v in np.median(prof, axis=0)],
        "neighbour_similarity_min": [round(float(v), 5) for v in prof.min(axis=0)],
        "neighbour_similarity_overall_median": round(float(np.median(prof)), 5),
        "least_similar_pair_counts": {f"{i}-{i + 1}": int((least == i).sum()) for i in range(S - 1) if (least == i).any()},
        "branches_updating_at_step": counts.tolist(),
        "updates": {k: list(v) for k, v in sched.updates.items()},
        "compute_fraction": round(sched.compute_fraction, 4),
        "mean_caching_error": round(float(np.mean(list(sched.info["error"].values()))), 6),
    }


def main(argv: list[str] | None = None) -> int:
    from robolearn.accel.cache import (CacheSchedule, branch_keys, calibrate, chunk_error, schedule_from_calibration,
                                       shared_schedule, uncached_references, uniform_schedule)
    from robolearn.cli.accel import calibration_observations
    from robolearn.policies import load_policy

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a diffusion transformer checkpoint folder")
    p.add_argument("--ddim-updates", type=int, default=5, help="BAC update steps per branch at DDIM-10")
    p.add_argument("--ddpm-updates", type=int, default=25, help="BAC update steps per branch at DDPM-100")
    p.add_argument("--observations", type=int, default=256, help="calibration observations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="path stem: writes OUT.json and OUT.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    policy = load_policy(args.checkpoint).eval()
    keys = branch_keys(policy.backbone)
    cal_obs = calibration_observations(policy, args.checkpoint, args.observations, 32, seed=0)
    test_obs = calibration_observations(policy, args.checkpoint, 64, 32, seed=1)

    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "observations": args.observations,
                              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    sims: dict[str, dict[str, np.ndarray]] = {}
    scheds: dict[str, Any] = {}
    for kind, steps, k in (("ddim", 10, args.ddim_updates), ("ddpm", 100, args.ddpm_updates)):
        policy.set_sampler(kind, steps)
        print(f"calibrating {kind}-{steps} on {args.observations} observations ...", flush=True)
        cal = calibrate(policy, cal_obs, seed=0, step_weights=(kind == "ddim"))
        sched = schedule_from_calibration(cal, "bac", k, bubble=0)
        sims[kind], scheds[kind] = cal.similarity, sched
        result[f"{kind}-{steps}"] = summary(cal.similarity, sched)
        if kind == "ddim":
            result["ddim-10"]["step_sensitivity"] = [round(float(v), 4) for v in cal.step_weights]
            refs = uncached_references(policy, test_obs, seed=1)
            rows = {"bac": sched, "uniform": uniform_schedule(keys, sched.sampler, 10, k),
                    "shared": shared_schedule(cal.similarity, sched.sampler, k, fingerprint=sched.fingerprint),
                    f"one set {UNIFORM_LIKE}": CacheSchedule("shared", sched.sampler, 10,
                                                              {kk: UNIFORM_LIKE for kk in keys}, sched.fingerprint)}
            errs = {}
            for name, s in rows.items():
                errs[name] = {"chunk_error": round(chunk_error(policy, s, refs), 5),
                              "compute_fraction": round(s.compute_fraction, 4)}
                if name == "shared":
                    errs[name]["steps"] = list(next(iter(s.updates.values())))
                print(f"  ddim-10 {name}: chunk error {errs[name]['chunk_error']:.4f} "
                      f"({errs[name]['compute_fraction']:.0%} computed)", flush=True)
            result["ddim-10"]["chunk_error_on_64_other_observations"] = errs
    result["wall_s"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(sims, scheds, result, args.out.with_suffix(".png"), str(args.checkpoint))
    d = result["ddim-10"]
    print(f"ddim-10 neighbour similarity, median over {d['branches']} branches, pair i-(i+1): "
          + " ".join(f"{v:.3f}" for v in d["neighbour_similarity_median"]))
    print(f"ddim-10 branches whose least similar neighbour pair is each pair: {d['least_similar_pair_counts']}")
    print(f"ddim-10 BAC k={args.ddim_updates}: branches updating at each step {d['branches_updating_at_step']}")
    print(f"ddpm-100 neighbour similarity: median {result['ddpm-100']['neighbour_similarity_overall_median']:.4f}, "
          f"least {min(result['ddpm-100']['neighbour_similarity_min']):.4f}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} ({result['wall_s']} s)")
    return 0


def plot(sims: dict[str, dict[str, np.ndarray]], scheds: dict[str, Any], result: dict[str, Any], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 9.5))
    for row, kind in enumerate(("ddim", "ddpm")):
        sim, sched = sims[kind], scheds[kind]
        S = next(iter(sim.values())).shape[0]
        mean = np.mean(np.stack(list(sim.values())), axis=0)
        a = ax[row, 0]
        im = a.imshow(mean, cmap="viridis", interpolation="nearest", vmin=min(0.5, float(mean.min())), vmax=1)
        a.set_title(f"{sched.sampler}: cosine similarity, mean over {len(sim)} branches\n(step i cached, step j "
                    f"stood in for)", fontsize=9)
        a.set_xlabel("step j")
        a.set_ylabel("step i")
        fig.colorbar(im, ax=a, fraction=0.046)
        errors = sched.info["error"]
        worst = max(errors, key=errors.get)
        a = ax[row, 1]
        im = a.imshow(sim[worst], cmap="viridis", interpolation="nearest", vmin=min(0.5, float(sim[worst].min())),
                      vmax=1)
        ups = list(sched.updates[worst])
        a.scatter(ups, ups, s=18 if S <= 10 else 5, c="red", marker="s")
        a.set_title(f"{sched.sampler}: branch {worst} (largest caching error)\nred: BAC's update steps, "
                    f"k={len(ups)}", fontsize=9)
        a.set_xlabel("step j")
        a.set_ylabel("step i")
        fig.colorbar(im, ax=a, fraction=0.046)
    # neighbour similarity on a common axis (fraction of the trajectory), with BAC's update counts at DDIM-10
    a = ax[0, 2]
    for kind, color in (("ddim", "C0"), ("ddpm", "C1")):
        prof = neighbour_profile(sims[kind])
        x = (np.arange(prof.shape[1]) + 0.5) / prof.shape[1]
        a.plot(x, np.median(prof, axis=0), color=color, marker="o" if kind == "ddim" else None,
               label=f"{scheds[kind].sampler}: median over branches")
        a.fill_between(x, np.percentile(prof, 10, axis=0), np.percentile(prof, 90, axis=0), color=color, alpha=0.2,
                       label=f"{scheds[kind].sampler}: 10-90% of branches")
    a.set_xlabel("position in the denoising trajectory (pair i, i+1)")
    a.set_ylabel("cosine similarity of a branch's outputs one step apart")
    a.set_title("neighbouring steps: alike except the last DDIM-10 pairs", fontsize=9)
    a.legend(fontsize=8, loc="lower left")
    d = result["ddim-10"]
    a = ax[1, 2]
    steps = np.arange(len(d["branches_updating_at_step"]))
    a.bar(steps - 0.2, d["branches_updating_at_step"], width=0.4, color="C3",
          label=f"branches BAC updates at the step (of {d['branches']}, k={len(next(iter(d['updates'].values())))})")
    a.set_xlabel("DDIM-10 step")
    a.set_ylabel("branches")
    a.set_xticks(steps)
    b = a.twinx()
    b.bar(steps + 0.2, d["step_sensitivity"], width=0.4, color="C2", label="chunk sensitivity to the step (mean 1)")
    b.set_ylabel("chunk sensitivity (mean 1)")
    errs = d["chunk_error_on_64_other_observations"]
    a.set_title("DDIM-10: where BAC updates vs what the chunk depends on\nchunk error: "
                + ", ".join(f"{n} {e['chunk_error']:.3f}" for n, e in errs.items()), fontsize=8)
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = b.get_legend_handles_labels()
    a.set_ylim(0, d["branches"] * 1.45)  # head room for the legend above the bars
    b.set_ylim(0, max(d["step_sensitivity"]) * 1.45)
    a.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center")
    fig.suptitle(f"BAC's similarity matrices at DDIM-10 and DDPM-100: {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
