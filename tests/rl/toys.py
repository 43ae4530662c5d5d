"""A tiny task that needs a constant correction, and a fixed chunk policy that misses it by a constant offset.

``ReachEnv``: each episode draws a goal point in [-1, 1]^2 (the observation ``goal``); every step pays
``-|action - goal|^2``; 16 steps, then truncated; ``info["success"]`` when the last action was within 0.05 of the
goal. ``OffsetBase``: a chunk policy (horizon 4, 1 observation, 2 executed actions) that always outputs
``goal + OFFSET`` -- right up to a constant, which is what a residual can learn. ``NoiseBase``: the same, moved by
its initial noise (what steering can learn). ``toy_base``: one of them saved and loaded back. ``fixture_base``: a copy of one of tests/fixtures' tiny push_t
checkpoints, loaded; ``reach_evaluator``: held-out evaluation on ``ReachEnv``.
"""
from __future__ import annotations

from typing import Any, Mapping

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from robolearn.data.normalizer import Normalizer
from robolearn.policies import register_policy

OFFSET = np.array([0.2, -0.2], dtype=np.float32)
EPISODE = 16


class ReachEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, episode_steps: int = EPISODE, reward_scale: float = 1.0, terminate: bool = False) -> None:
        """``reward_scale=0``: every reward is 0 (to see the bootstrap alone); ``terminate``: episodes end as
        terminated instead of truncated."""
        self.observation_space = gym.spaces.Dict({"goal": gym.spaces.Box(-1.0, 1.0, (2,), np.float32)})
        self.action_space = gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.episode_steps = episode_steps
        self.reward_scale, self.terminate = reward_scale, terminate
        self.goal = np.zeros(2, np.float32)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.goal = self.np_random.uniform(-1.0, 1.0, 2).astype(np.float32)
        self.t = 0
        return {"goal": self.goal.copy()}, {}

    def step(self, action):
        err = float(np.sum((np.asarray(action, np.float32) - self.goal) ** 2))
        self.t += 1
        info = {"success": err < 0.05 ** 2}
        end = self.t >= self.episode_steps
        obs = {"goal": self.goal.copy()}
        return obs, -err * self.reward_scale, end and self.terminate, end and not self.terminate, info


@register_policy("test_reach_base")
class OffsetBase(nn.Module):
    """A fixed chunk policy with the members the executor and the residual wrapper read; a registered kind, so it
    saves and loads as a checkpoint folder like a trained policy (a residual names its base by folder)."""

    wraps_base = False

    horizon, n_obs_steps, n_action_steps, action_dim = 4, 1, 2, 2
    obs_keys = ["goal"]
    obs_shapes = {"goal": (2,)}
    action_key = "action"

    def __init__(self) -> None:
        super().__init__()
        self.normalizer = Normalizer()
        self.normalizer.add("goal", "minmax", {"min": [-1.0, -1.0], "max": [1.0, 1.0]})
        self.normalizer.add("action", "minmax", {"min": [-2.0, -2.0], "max": [2.0, 2.0]})

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def checkpoint_config(self) -> dict[str, Any]:
        return {"type": self.policy_type}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(state))

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any], *, normalizer: Any = None, base: Any = None) -> "OffsetBase":
        return cls()

    def reset(self) -> None:
        pass

    def noise_shape(self, batch_size: int) -> tuple[int, int, int]:
        return (batch_size, self.horizon, self.action_dim)

    def predict_action(self, obs_history: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None):
        goal = torch.as_tensor(obs_history["goal"])[:, -1].float()
        return (goal + torch.from_numpy(OFFSET))[:, None].repeat(1, self.horizon, 1)


NOISE_GAIN = 0.5


@register_policy("test_noise_base")
class NoiseBase(OffsetBase):
    """``OffsetBase`` whose chunk also moves with its initial noise: ``goal + OFFSET + NOISE_GAIN * noise`` (noise
    of shape ``(B, horizon, action_dim)``; zeros when None). Deterministic and smooth in the noise, like DDIM or a
    flow ODE, so steering can find the noise that cancels the offset (``-OFFSET / NOISE_GAIN``, inside the 1.5
    bound)."""

    def predict_action(self, obs_history: Mapping[str, torch.Tensor], noise: torch.Tensor | None = None):
        chunk = super().predict_action(obs_history)
        if noise is not None:
            chunk = chunk + NOISE_GAIN * torch.as_tensor(noise, dtype=torch.float32)
        return chunk


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"


def toy_base(tmp_path: Path, kind: type = OffsetBase):
    """A ``kind`` (``OffsetBase`` or ``NoiseBase``) saved as ``tmp_path/base`` and loaded back, as a fine-tuning run
    loads its base (a wrapper names its base by folder)."""
    from robolearn.policies import load_policy, save_policy

    save_policy(kind(), tmp_path / "base")
    return load_policy(tmp_path / "base")


def fixture_base(tmp_path: Path, name: str):
    """tests/fixtures' checkpoint ``name`` copied under ``tmp_path`` (a wrapper names its base by folder) and
    loaded as the CLI loads it."""
    from robolearn.cli.runtime import load_checkpoint

    shutil.copytree(FIXTURES / name, tmp_path / name)
    return load_checkpoint(tmp_path / name)


def reach_evaluator():
    """``evaluate(policy, env_steps)`` for a fine-tuning run on ``ReachEnv``: 32 held-out seeds (10000..), success
    rate and mean return."""
    from robolearn.evaluation import evaluate
    from sim.vector import make_vector_env

    eval_envs = make_vector_env(ReachEnv, num_envs=4, num_workers=0, autoreset_mode="Disabled")

    def held_out(policy, env_steps):
        r = evaluate(policy, eval_envs, range(10_000, 10_032))
        return {"success_rate": r["success_rate"], "mean_return": r["mean_return"]}

    return held_out
