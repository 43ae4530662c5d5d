"""Run by tests/data/test_lerobot.py in an interpreter that has LeRobot's own dataset code (the standalone
``lerobot-dataset`` package, module ``ledataset``, or ``lerobot``) -- not robolearn's venv, whose CPU torch
cannot load torchvision (see the README). Nothing here imports robolearn: each side is checked by the other.

``read DIR EXPECTED.npz OUT.json``: load DIR with ``LeRobotDataset`` as LeRobot users do, read every frame,
and report how far each feature is from EXPECTED (frames as uint8 H x W x C; everything else as the parquet
rows LeRobot returns): max abs difference per feature, PSNR per video feature, tasks, episode lengths.

``write DIR EXPECTED.npz``: record a small dataset with LeRobot's own writer (``LeRobotDataset.create``,
``add_frame``, ``save_episode``; h264 video) and save the arrays it was given.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np

try:
    from ledataset.datasets.lerobot_dataset import LeRobotDataset
except ImportError:  # the full LeRobot package
    from lerobot.datasets.lerobot_dataset import LeRobotDataset


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def read(root: str, expected_path: str, out_path: str) -> None:
    expected = dict(np.load(expected_path))
    ds = LeRobotDataset("robolearn/export", root=root)
    got: dict[str, list[np.ndarray]] = {}
    tasks = []
    for i in range(len(ds)):
        item = ds[i]
        tasks.append(item["task"])
        for k, v in item.items():
            if k in expected:
                a = v.numpy()
                if k in ds.meta.video_keys:  # float CHW in [0, 1] -> uint8 HWC
                    a = np.clip(np.round(a.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
                got.setdefault(k, []).append(a)
    report: dict = {"frames": len(ds), "episodes": ds.num_episodes, "fps": ds.fps, "tasks": sorted(set(tasks)),
                    "video_keys": list(ds.meta.video_keys), "backend": ds.video_backend, "diff": {}, "psnr": {},
                    "missing": sorted(set(expected) - set(got)), "dtypes": {}}
    for k, frames in got.items():
        a = np.stack(frames)
        want = expected[k].reshape(a.shape) if expected[k].size == a.size else expected[k]
        report["dtypes"][k] = str(a.dtype)
        if a.shape != want.shape:
            report["diff"][k] = f"shape {list(a.shape)} vs {list(want.shape)}"
        elif k in ds.meta.video_keys:
            report["psnr"][k] = _psnr(a, want)
        else:
            report["diff"][k] = float(np.max(np.abs(a.astype(np.float64) - want.astype(np.float64)))) if a.size else 0.0
    report["episode_lengths"] = [int(ds.meta.episodes[e]["length"]) for e in range(ds.meta.total_episodes)]
    with open(out_path, "w") as f:
        json.dump(report, f)


def write(root: str, expected_path: str) -> None:
    fps, lengths = 10, (20, 16, 24)
    features = {
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["x", "y", "z"]},
        "observation.images.cam": {"dtype": "video", "shape": (16, 16, 3), "names": ["height", "width", "channels"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["a0", "a1"]},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.done": {"dtype": "bool", "shape": (1,), "names": None},
    }
    ds = LeRobotDataset.create("robolearn/written", fps=fps, features=features, root=root, use_videos=True,
                               vcodec="h264")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64)
    arrays: dict[str, list] = {k: [] for k in features}
    for e, n in enumerate(lengths):
        for t in range(n):
            img = np.stack([96 + 80 * np.sin((xx + t + 3 * e) / 6), 96 + 80 * np.cos((yy - t) / 7),
                            np.full_like(xx, 40.0 * e + 20)], -1).astype(np.uint8)
            frame = {"observation.state": rng.standard_normal(3).astype(np.float32),
                     "observation.images.cam": img,
                     "action": rng.standard_normal(2).astype(np.float32),
                     "next.reward": np.array([t / n], np.float32),
                     "next.done": np.array([t == n - 1], bool),
                     "task": "push the block" if e != 1 else "pull the block"}
            for k in features:
                arrays[k].append(frame[k])
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    np.savez(expected_path, **{k: np.stack(v) for k, v in arrays.items()},
             lengths=np.array(lengths), fps=np.array(fps))


if __name__ == "__main__":
    if sys.argv[1] == "read":
        read(*sys.argv[2:5])
    elif sys.argv[1] == "write":
        write(*sys.argv[2:4])
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
