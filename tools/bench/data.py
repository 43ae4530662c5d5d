#!/usr/bin/env python
"""Window sampling speed: in memory (robolearn's default) against slicing zarr per window (the baseline).

Builds two stores in a temporary folder -- 1M low-dim steps, and 84x84 images -- then times random batches
of windows (horizon 16, batch 256, 2 observation steps) both ways, in this one run. Writes JSON.

    .venv/bin/python tools/bench/data.py [--steps 1000000] [--image-steps 20000] [--out tools/bench/results/data.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from robolearn.data import EpisodeStore, KeySpec, SequenceDataset  # noqa: E402

HORIZON, BATCH, N_OBS, N_ACT = 16, 256, 2, 8


def build_lowdim(path: Path, steps: int, ep_len: int = 200) -> float:
    schema = {
        "state": KeySpec((20,), "float32", "obs"),
        "action": KeySpec((7,), "float32", "action"),
        "reward": KeySpec((), "float32", "reward"),
    }
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with EpisodeStore.create(path, schema, fps=10, task="bench") as s:
        per_batch = 500
        for start in range(0, steps, ep_len * per_batch):
            n_eps = min(per_batch, (steps - start) // ep_len)
            s.append_episodes([
                {"state": rng.standard_normal((ep_len, 20), dtype=np.float32),
                 "action": rng.standard_normal((ep_len, 7), dtype=np.float32),
                 "reward": np.zeros(ep_len, np.float32)}
                for _ in range(n_eps)
            ])
    return time.perf_counter() - t0


def build_images(path: Path, steps: int, ep_len: int = 100) -> float:
    schema = {
        "agentview_image": KeySpec((84, 84, 3), "uint8", "obs"),
        "state": KeySpec((9,), "float32", "obs"),
        "action": KeySpec((7,), "float32", "action"),
    }
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:84, 0:84]
    t0 = time.perf_counter()
    with EpisodeStore.create(path, schema, fps=20, task="bench") as s:
        for _ in range(steps // ep_len):
            # Smooth scenes with a moving blob and sensor noise: compresses like camera frames, not like noise.
            cx = rng.uniform(10, 74) + np.cumsum(rng.normal(0, 0.5, ep_len))
            blob = ((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - 42) ** 2) < 100
            img = np.stack([xx * 3, yy * 3, 128 + 0 * xx], -1)[None].repeat(ep_len, 0).astype(np.int16)
            img[blob] = [250, 30, 30]
            img = np.clip(img + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
            s.append_episode({
                "agentview_image": img,
                "state": rng.standard_normal((ep_len, 9), dtype=np.float32),
                "action": rng.standard_normal((ep_len, 7), dtype=np.float32),
            })
    return time.perf_counter() - t0


def time_batches(ds: SequenceDataset, seconds: float, batch: int, max_batches: int | None = None) -> dict:
    rng = np.random.default_rng(0)
    n = len(ds)
    ds.get_batch(rng.integers(0, n, batch))  # warm
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and (max_batches is None or done < max_batches):
        ds.get_batch(rng.integers(0, n, batch))
        done += 1
    dt = time.perf_counter() - t0
    return {"windows_per_s": round(done * batch / dt, 1), "windows": done * batch, "seconds": round(dt, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000, help="low-dim store size")
    ap.add_argument("--image-steps", type=int, default=20_000, help="image store size")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--out", type=Path, default=Path("tools/bench/results/data.json"))
    args = ap.parse_args()
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "horizon": HORIZON, "batch": BATCH, "n_obs_steps": N_OBS, "n_action_steps": N_ACT,
    }
    with tempfile.TemporaryDirectory() as tmp:
        low, img = Path(tmp) / "lowdim.zarr", Path(tmp) / "image.zarr"
        results["lowdim_build_s"] = round(build_lowdim(low, args.steps), 2)
        results["image_build_s"] = round(build_images(img, args.image_steps), 2)
        for name, path in (("lowdim", low), ("image", img)):
            store = EpisodeStore.open(path)
            kw = dict(horizon=HORIZON, n_obs_steps=N_OBS, n_action_steps=N_ACT)
            t0 = time.perf_counter()
            mem = SequenceDataset(store, **kw)
            load_s = time.perf_counter() - t0
            stream = SequenceDataset(store, in_memory=False, **kw)
            r_mem = time_batches(mem, args.seconds, BATCH)
            r_zarr = time_batches(stream, args.seconds, 16, max_batches=20)  # zarr per window: slow, fewer
            results[name] = {
                "steps": store.n_steps,
                "episodes": store.n_episodes,
                "size_on_disk_mb": round(store.size_bytes() / 2**20, 1),
                "load_into_memory_s": round(load_s, 2),
                "in_memory": r_mem,
                "zarr_per_window_baseline": r_zarr,
                "speedup": round(r_mem["windows_per_s"] / r_zarr["windows_per_s"], 1),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"{'store':<8} {'steps':>9} {'in memory (win/s)':>18} {'zarr/window (win/s)':>20} {'speedup':>8}")
    for name in ("lowdim", "image"):
        r = results[name]
        print(f"{name:<8} {r['steps']:>9,} {r['in_memory']['windows_per_s']:>18,.0f} "
              f"{r['zarr_per_window_baseline']['windows_per_s']:>20,.0f} {r['speedup']:>7}x")
    print(f"written to {args.out}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
