#!/usr/bin/env python
"""What reading one camera frame costs in a store of 16-frame chunks: ``EpisodeStore.read_rows`` of one random
frame (checks + zarr + decode), zarr's slice alone, and blosc's decode of a 16-frame chunk against a one-frame one;
also the ``os.path.exists`` per chunk file that ``check_chunks`` pays.

Frames are Lift-like 84x84x3 (a moving blob plus noise, as ``import_robomimic.py`` makes them), zstd level 1.

    .venv/bin/python tools/bench/frame_read.py [--reads 400] [--out tools/bench/results/frame_read.json]
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

import numcodecs  # noqa: E402
import numpy as np  # noqa: E402

from robolearn.data import EpisodeStore, KeySpec  # noqa: E402
from robolearn.data.store import IMAGE_CLEVEL  # noqa: E402


def per_call_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=320)
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--out", type=Path, default=Path("tools/bench/results/frame_read.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.frames
    yy, xx = np.mgrid[0:84, 0:84]
    cx = 20 + np.arange(n)[:, None, None] * 0.2
    blob = 120 + 80 * np.exp(-((xx[None] - cx) ** 2 + (yy[None] - 42) ** 2) / 200.0)
    frames = np.clip(blob[..., None] + rng.normal(0, 3, (n, 84, 84, 3)), 0, 255).astype(np.uint8)
    schema = {"cam": KeySpec((84, 84, 3), "uint8", "obs"), "action": KeySpec((2,), "float32", "action")}
    with tempfile.TemporaryDirectory(prefix="frame_read_") as tmp:
        path = Path(tmp) / "s.zarr"
        with EpisodeStore.create(path, schema) as s:
            s.append_episode({"cam": frames, "action": np.zeros((n, 2), np.float32)})
        store = EpisodeStore.open(path)
        arr = store.array("cam")
        rows = iter(rng.integers(0, n, 10 * args.reads).tolist())
        per_call_ms(lambda: store.read_rows("cam", (i := next(rows)), i + 1, array=arr), 20)  # warm up
        read_rows = per_call_ms(lambda: store.read_rows("cam", (i := next(rows)), i + 1, array=arr), args.reads)
        zarr_slice = per_call_ms(lambda: arr[(i := next(rows)):i + 1], args.reads)
        blosc = numcodecs.Blosc(cname="zstd", clevel=IMAGE_CLEVEL, shuffle=numcodecs.Blosc.NOSHUFFLE)
        k = int(arr.chunks[0])
        chunk, one = blosc.encode(frames[:k]), blosc.encode(frames[0])
        decode_chunk = per_call_ms(lambda: blosc.decode(chunk), args.reads)
        decode_one = per_call_ms(lambda: blosc.decode(one), args.reads)
        files = [str(f) for f in (path / "data" / "cam").iterdir()]
        exists_us = per_call_ms(lambda: [os.path.exists(f) for f in files], 200) / len(files) * 1e3
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
              "cpus": os.cpu_count(), "frame": [84, 84, 3], "frames_per_chunk": k, "reads": args.reads,
              "read_rows_one_frame_ms": round(read_rows, 3), "zarr_slice_one_frame_ms": round(zarr_slice, 3),
              "blosc_decode_chunk_ms": round(decode_chunk, 3), "blosc_decode_one_frame_ms": round(decode_one, 4),
              "exists_per_chunk_file_us": round(exists_us, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
