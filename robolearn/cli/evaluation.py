"""Evaluation wiring shared by ``robolearn train`` and ``robolearn eval``: the task's MuJoCo environments (in
``sim.vector`` worker processes) handed to the evaluation room, per-episode JSON and videos in the run folder."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from robolearn.policies.executor import NonFiniteObservationError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from robolearn.cli import CLIError

        raise CLIError(f"device={name} asked for, but torch sees no CUDA device (use device=cpu)")
    return torch.device(name)


class Evaluator:
    """Runs evaluation rounds of a policy in ``num_envs`` environments; keeps the environments between rounds.

    Episode ``k`` of every round starts from seed ``seed + k`` and draws its noise from ``(seed, k, chunk)``, so a
    round is repeatable and video ``k`` shows exactly episode ``k``. Each round writes ``eval/step_XXXXXXX.json``
    (per-episode results) and ``videos/step_XXXXXXX_epK.mp4`` in the run folder and returns the summary.

    Non-finite actions: an episode whose policy returned a chunk holding NaN or inf ends there as a failure
    (nothing of that chunk is executed, see :mod:`robolearn.evaluation.rollout`); the summary counts them in
    ``nonfinite_chunks`` and a ``warning:`` line on stderr says so (``robolearn train`` and ``robolearn eval`` both
    evaluate through here). An observation holding NaN or inf stops the round with a :class:`CLIError` naming the
    key.
    """

    def __init__(
        self, task: str, env_config: dict[str, Any], *, episodes: int, num_envs: int, workers: int, seed: int,
        videos: int, run_dir: Path, device: torch.device, progress: bool = True, n_action_steps: int | None = None,
        video_from_step: int = 0,
    ) -> None:
        """``video_from_step``: record videos only at evaluations of this step or later (training passes its last
        step: on a CPU, rendering every evaluation's episodes cost more than the evaluations themselves)."""
        self.task, self.env_config = task, dict(env_config)
        self.episodes, self.num_envs, self.workers, self.seed = episodes, max(1, num_envs), workers, seed
        self.videos, self.run_dir, self.device, self.progress = videos, Path(run_dir), device, progress
        self.n_action_steps = n_action_steps
        self.video_from_step = int(video_from_step)
        self._venv: Any = None

    def _vector_env(self) -> Any:
        if self._venv is None:
            from sim.vector import make_vector_env

            n = min(self.num_envs, self.episodes)
            self._venv = make_vector_env(self.task, num_envs=n, num_workers=min(self.workers, n), seed=self.seed,
                                         autoreset_mode="Disabled", **self.env_config)
        return self._venv

    def __call__(self, policy: torch.nn.Module, step: int) -> dict[str, Any]:
        from robolearn.accel import default_kernels, kernels_in_use, use_kernels
        from robolearn.evaluation import evaluate
        from robolearn.progress import progress_bar

        was_training = policy.training
        policy.eval()
        kernels = kernels_in_use(policy)
        if kernels == "gemm":  # the training path (train's EMA copy): the inference kernels while evaluating
            use_kernels(policy, default_kernels())
        bar = progress_bar(self.episodes, desc=f"eval @{step}", unit="ep", leave=False, disable=not self.progress)

        def tick(done: int, total: int) -> None:
            bar.update(done - bar.n)

        t0 = time.perf_counter()
        # Environment worker processes share the cores with inference: one torch thread while they run (beside
        # MuJoCo, 2 threads made a DDIM-10 chunk 4x slower here; tools/bench/threads.py). Training's own count
        # comes back afterwards.
        threads = torch.get_num_threads()
        if self.workers > 0 and torch.device(self.device).type == "cpu" and threads > 1:
            torch.set_num_threads(1)
        try:
            result = evaluate(policy, self._vector_env(), range(self.seed, self.seed + self.episodes),
                              noise_seed=self.seed, n_action_steps=self.n_action_steps, device=self.device,
                              progress=tick)
            videos = self._videos(policy, step) if step >= self.video_from_step else []
        except NonFiniteObservationError as e:
            from robolearn.cli import CLIError

            raise CLIError(f"evaluation @{step} in task {self.task}: {e}") from None
        finally:
            torch.set_num_threads(threads)
            bar.close()
            if kernels == "gemm":
                use_kernels(policy, "gemm")
            policy.train(was_training)
        summary = {
            "step": step,
            "success_rate": result["success_rate"],
            "mean_return": result["mean_return"],
            "mean_max_reward": result["mean_max_reward"],
            "mean_length": result["mean_length"],
            "score": result.get("score"),
            "episodes": result["episodes"],
            "eval_s": round(time.perf_counter() - t0, 2),
            "nonfinite_chunks": result["nonfinite_chunks"],
        }
        if result["nonfinite_chunks"]:
            hit = sum(1 for r in result["per_episode"] if r.get("nonfinite_chunks"))
            print(f"warning: eval @{step}: the policy returned {result['nonfinite_chunks']} non-finite action "
                  f"chunk(s) (NaN or inf); {hit} of {result['episodes']} episode(s) ended there as failures (none "
                  f"of those actions was executed): check the weights and the observations' scale",
                  file=sys.stderr, flush=True)
        out = self.run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:07d}.json").write_text(json.dumps({**result, "videos": videos}, indent=1))
        summary["videos"] = [v["path"] for v in videos]
        return summary

    def _videos(self, policy: torch.nn.Module, step: int) -> list[dict[str, Any]]:
        """Episodes ``0 .. videos-1`` again, in one rendering environment (the same actions, see the class)."""
        if self.videos <= 0:
            return []
        import sim

        from robolearn.evaluation import record_video

        env = sim.make(self.task, **self.env_config)
        try:
            fps = float(getattr(env.unwrapped, "fps", 10))
            return [record_video(policy, env, self.seed + k, str(self.run_dir / "videos" / f"step_{step:07d}_ep{k}.mp4"),
                                 episode=k, noise_seed=self.seed, n_action_steps=self.n_action_steps,
                                 device=self.device, fps=fps)
                    for k in range(min(self.videos, self.episodes))]
        finally:
            env.close()

    def close(self) -> None:
        if self._venv is not None:
            self._venv.close()
            self._venv = None
