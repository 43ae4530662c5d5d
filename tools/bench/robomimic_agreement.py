#!/usr/bin/env python
"""Agreement of the robomimic import with direct collection: the same scripted Lift demonstrations, once as
collected and once written into robomimic's layout (h5py) and imported, train policies that succeed alike.

Steps (each skipped when its output exists, so a stopped run continues):

1. ``robolearn collect task=lift episodes=200 workers=2 out=DIR/lift.zarr``;
2. write ``DIR/lift_robomimic.hdf5`` from it as robomimic's ``dataset_states_to_obs.py`` would (observations,
   actions and rewards as float64, ``dones`` 1 from success on, ``env_args`` with robosuite 1.4's OSC_POSE config,
   ``mask/train``), then ``robolearn data import robomimic`` it into ``DIR/lift_imported.zarr``;
3. train both with the defaults (``training.steps=1500 threads=1``), each evaluated once at the end on the same
   50 seeds (``eval.episodes=50``, ``training.eval_every=0``: evaluation does not change training);
4. write JSON with both success rates to ``tools/bench/results/robomimic_agreement.json``.

    OMP_NUM_THREADS=1 .venv/bin/python tools/bench/robomimic_agreement.py [--dir /tmp/agree] [--episodes 200]
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

import h5py
import numpy as np

from robolearn.data import EpisodeStore

# robosuite 1.4's OSC_POSE controller config, as robomimic's v1.4.1 Lift datasets record it.
OSC_POSE_14 = {"type": "OSC_POSE", "input_max": 1, "input_min": -1,
               "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5], "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
               "kp": 150, "damping_ratio": 1, "impedance_mode": "fixed", "kp_limits": [0, 300],
               "damping_ratio_limits": [0, 10], "position_limits": None, "orientation_limits": None,
               "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2}


def robolearn(*args: str, log: Path) -> dict:
    """Run a robolearn command, its output into ``log``; returns its last-line JSON summary."""
    exe = Path(sys.executable).with_name("robolearn")
    with open(log, "w") as fh:
        subprocess.run([str(exe), *args], stdout=fh, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"})
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def write_robomimic(store_path: Path, out: Path) -> int:
    """The collected store in robomimic's layout; returns the number of demos."""
    store = EpisodeStore.open(store_path)
    cfg = store.env_config
    env_args = {"env_name": "Lift", "env_version": "1.4.1", "type": 1,
                "env_kwargs": {"has_renderer": False, "has_offscreen_renderer": False, "ignore_done": True,
                               "use_object_obs": True, "use_camera_obs": False, "control_freq": cfg["control_freq"],
                               "controller_configs": OSC_POSE_14, "robots": [cfg["robots"]],
                               "camera_depths": False, "camera_heights": 84, "camera_widths": 84,
                               "reward_shaping": cfg["reward_type"] == "dense"}}
    obs_keys = [k for k, s in store.schema.items() if s.role == "obs"]
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(env_args, indent=4)
        data.attrs["total"] = store.n_steps
        for i in range(store.n_episodes):
            ep = store.get_episode(i)
            g = data.create_group(f"demo_{i}")
            n = len(ep["action"])
            g.attrs["num_samples"] = n
            for k in obs_keys:
                g.create_dataset(f"obs/{k}", data=ep[k].astype(np.float64))
            g.create_dataset("actions", data=ep["action"].astype(np.float64))
            g.create_dataset("rewards", data=ep["reward"].astype(np.float64))
            done = np.maximum.accumulate(ep["reward"] > 0)
            done[-1] = True
            g.create_dataset("dones", data=done.astype(np.int64))
        f["mask/train"] = np.array([f"demo_{i}".encode() for i in range(store.n_episodes)], dtype="S")
    return store.n_episodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/agree"))
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("tools/bench/results/robomimic_agreement.json"))
    args = ap.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
                    "cpus": os.cpu_count(), "load_before": list(os.getloadavg()), "episodes": args.episodes,
                    "training_steps": args.steps, "eval_episodes": args.eval_episodes}
    collected, h5, imported = d / "lift.zarr", d / "lift_robomimic.hdf5", d / "lift_imported.zarr"
    if not collected.exists():
        robolearn("collect", "task=lift", f"episodes={args.episodes}", "workers=2", f"out={collected}",
                  "progress=false", log=d / "collect.log")
    if not imported.exists():
        result["demos_written"] = write_robomimic(collected, h5)
        result["import"] = robolearn("data", "import", "robomimic", str(h5), "--out", str(imported), "--filter",
                                     "train", "--no-progress", log=d / "import.log")
    a, b = EpisodeStore.open(collected), EpisodeStore.open(imported)
    result["same_arrays"] = all(np.array_equal(a.load([k])[k], b.load([k])[k]) for k in a.schema)
    result["same_episode_ends"] = bool(np.array_equal(a.episode_ends, b.episode_ends))
    result["same_env_config"] = a.env_config == b.env_config
    print({k: result[k] for k in ("same_arrays", "same_episode_ends", "same_env_config")}, flush=True)
    for name, store in (("collected", collected), ("imported", imported)):
        run_dir = d / f"train_{name}"
        summary_file = d / f"train_{name}.json"
        if not summary_file.exists():
            summary = robolearn("train", "task=lift", f"dataset={store}", f"training.steps={args.steps}",
                                "threads=1", "training.eval_every=0", f"eval.episodes={args.eval_episodes}",
                                "eval.videos=0", "training.progress=false", f"run_dir={run_dir}",
                                log=d / f"train_{name}.log")
            summary_file.write_text(json.dumps(summary))
        summary = json.loads(summary_file.read_text())
        result[name] = {"success_rate": summary.get("success_rate"), "summary": summary}
        print(name, summary.get("success_rate"), flush=True)
    sa, sb = result["collected"]["success_rate"], result["imported"]["success_rate"]
    result["difference_points"] = round(100 * abs(sa - sb), 1) if sa is not None and sb is not None else None
    result["agree_within_5_points"] = result["difference_points"] is not None and result["difference_points"] <= 5
    result["seconds"] = round(time.time() - t0, 1)
    result["load_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("difference_points", "agree_within_5_points")}))


if __name__ == "__main__":
    main()
