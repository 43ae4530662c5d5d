"""Evaluation wiring shared by ``robolearn train`` and ``robolearn eval``: vectorized MuJoCo envs + videos."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from robolearn.cli import CLIError

        raise CLIError(f"device={name} asked for, but torch sees no CUDA device (use device=cpu)")
    return torch.device(name)


class Evaluator:
    """Runs evaluation rounds of a policy in ``num_envs`` environments; keeps the environments between rounds.

    Each round writes ``eval/step_XXXXXXX.json`` (per-episode results) and ``videos/step_XXXXXXX_epK.mp4``
    in the run folder and returns the summary.
    """

    def __init__(
        self, task: str, env_config: dict[str, Any], *, episodes: int, num_envs: int, workers: int, seed: int,
        videos: int, run_dir: Path, device: torch.device, progress: bool = True,
    ) -> None:
        self.task, self.env_config = task, dict(env_config)
        self.episodes, self.num_envs, self.workers, self.seed = episodes, max(1, num_envs), workers, seed
        self.videos, self.run_dir, self.device, self.progress = videos, Path(run_dir), device, progress
        self._venv: Any = None

    def _vector_env(self) -> Any:
        if self._venv is None:
            from sim.vector import make_vector_env

            n = min(self.num_envs, self.episodes)
            self._venv = make_vector_env(self.task, num_envs=n, num_workers=min(self.workers, n), seed=self.seed,
                                         **self.env_config)
        return self._venv

    def __call__(self, policy: torch.nn.Module, step: int) -> dict[str, Any]:
        from tqdm import tqdm

        from robolearn.policies.rollout import evaluate, record_video_episode

        was_training = policy.training
        policy.eval()
        bar = tqdm(total=self.episodes, desc=f"eval @{step}", unit="ep", leave=False, disable=not self.progress)

        def tick(done: int, total: int) -> None:
            bar.update(done - bar.n)

        t0 = time.perf_counter()
        result = evaluate(policy, self._vector_env(), self.episodes, seed=self.seed, device=self.device,
                          progress=tick)
        bar.close()
        videos: list[dict[str, Any]] = []
        if self.videos > 0:
            import sim

            env = sim.make(self.task, **self.env_config)
            (self.run_dir / "videos").mkdir(parents=True, exist_ok=True)
            fps = float(getattr(env.unwrapped, "fps", 10))
            for k in range(self.videos):
                path = self.run_dir / "videos" / f"step_{step:07d}_ep{k}.mp4"
                videos.append(record_video_episode(policy, env, self.seed + k, str(path), self.device, fps=fps))
            env.close()
        policy.train(was_training)
        summary = {
            "step": step,
            "success_rate": result["success_rate"],
            "mean_return": result["mean_return"],
            "mean_max_reward": result["mean_max_reward"],
            "mean_length": result["mean_length"],
            "episodes": result["episodes"],
            "eval_s": round(time.perf_counter() - t0, 2),
        }
        out = self.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:07d}.json").write_text(json.dumps({**result, "videos": videos}, indent=1))
        summary["videos"] = [v["path"] for v in videos]
        return summary

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None
