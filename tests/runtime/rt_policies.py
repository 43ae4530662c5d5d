"""Small real chunk policies and a tiny environment for the runtime tests and the runtime benchmark.

- :class:`TickPolicy` predicts, for every chunk step, the control tick that step is meant for (read from the
  observation ``t``), so the action executed at tick ``k`` shows exactly which prediction the runner used.
- :class:`TickEnv` is a minimal gymnasium-style environment whose observation is its step counter and which records
  every action it receives.
- :class:`ExpertChunkPolicy` replays the push_t scripted expert: it places the pusher and the block of a private
  copy of the environment where the newest observation says, and rolls the expert out for a chunk.
All can sleep ``sleep_s`` per call to emulate slow inference.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch


class TickPolicy:
    """chunk[j] = (t_obs + j - (n_obs_steps - 1), j, offset): action component 0 is the tick the step is for."""

    def __init__(self, horizon: int = 8, n_obs_steps: int = 2, n_action_steps: int = 4, sleep_s: float = 0.0,
                 offset: float = 0.0, fail_after: int | None = None) -> None:
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim = 3
        self.obs_keys = ["t"]
        self.obs_shapes = {"t": (1,)}
        self.sleep_s = sleep_s
        self.offset = offset
        self.fail_after = fail_after
        self.calls = 0
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def predict_action(self, obs_history: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None
                       ) -> torch.Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated policy failure")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        t = obs_history["t"]  # (B, n_obs, 1)
        assert t.shape[1:] == (self.n_obs_steps, 1), t.shape
        now = t[:, -1, 0].to(torch.float64)  # (B,)
        j = torch.arange(self.horizon, dtype=torch.float64)
        chunk = torch.zeros(t.shape[0], self.horizon, 3, dtype=torch.float64)
        chunk[:, :, 0] = now[:, None] + j[None] - (self.n_obs_steps - 1)
        chunk[:, :, 1] = j[None]
        chunk[:, :, 2] = self.offset
        return chunk.float()


class TickEnv:
    """Observation ``{"t": [steps taken]}``; records actions; truncates after ``max_steps``."""

    fps = 10.0

    def __init__(self, max_steps: int = 40) -> None:
        self.max_steps = max_steps
        self.t = 0
        self.actions: list[np.ndarray] = []
        self.resets = 0

    @property
    def unwrapped(self) -> "TickEnv":
        return self

    def _obs(self) -> dict[str, np.ndarray]:
        return {"t": np.array([self.t], dtype=np.float32)}

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self.t = 0
        self.actions = []
        self.resets += 1
        return self._obs(), {"success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self.actions.append(np.array(action, dtype=np.float64))
        self.t += 1
        return self._obs(), 0.0, False, self.t >= self.max_steps, {"success": self.t >= self.max_steps}


class ExpertChunkPolicy:
    """push_t chunk policy that replays the scripted expert from the newest observed state.

    The private environment is placed at rest where the observation says (the real pusher may still be moving
    toward its last target), the expert replans from there and is rolled out for ``horizon - n_obs_steps + 1``
    steps; the history part of the chunk repeats the current pusher position.
    """

    def __init__(self, horizon: int = 16, n_obs_steps: int = 2, n_action_steps: int = 8, sleep_s: float = 0.0
                 ) -> None:
        import sim  # the tests and the benchmark may import sim; robolearn.runtime never does

        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.action_dim = 2
        self.obs_keys = ["agent_pos", "block_pose"]
        self.obs_shapes = {"agent_pos": (2,), "block_pose": (3,)}
        self.sleep_s = sleep_s
        self._env = sim.make("push_t")
        self._env.reset(seed=0)
        self._expert = sim.make_expert("push_t", noise=0, seed=0)

    def reset(self) -> None:
        pass

    def predict_action(self, obs_history: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None
                       ) -> torch.Tensor:
        t0 = time.perf_counter()
        out = []
        for b in range(obs_history["agent_pos"].shape[0]):
            agent = obs_history["agent_pos"][b, -1].double().numpy()
            block = obs_history["block_pose"][b, -1].double().numpy()
            env = self._env.unwrapped
            env.set_state(agent, block)
            self._expert.reset(self._env)
            start = self.n_obs_steps - 1
            chunk = np.zeros((self.horizon, 2), dtype=np.float32)
            chunk[:start] = agent
            obs = env._obs()
            for i in range(start, self.horizon):
                a = self._expert.act(obs)
                chunk[i] = a
                obs, *_ = self._env.step(a)
            out.append(chunk)
        if self.sleep_s:
            time.sleep(max(0.0, self.sleep_s - (time.perf_counter() - t0)))
        return torch.from_numpy(np.stack(out))
