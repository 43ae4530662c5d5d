"""The residual policy of ResiP as a registered policy kind: a frozen chunk policy plus a per-step correction.

The base chunk policy runs exactly as it is deployed: the :class:`~robolearn.policies.executor.ChunkExecutor`
queues its chunks and re-plans every ``n_action_steps``. At every executed step a small Gaussian MLP (the
*residual*) looks at

- the newest observation, normalized with the base's own normalizer (its low-dimensional keys), and
- the base action for this step, normalized the same way,

and its output, times ``action_scale``, is added to the base action *in normalized action space*, then mapped
back to raw units. Why normalized space: one ``action_scale`` then means the same share of every action
dimension's range, whatever their units. Held (constant) action dimensions stay exactly as the base gives them.

Why per step and not per chunk: the correction reacts to the observation of the step it is executed in, which a
chunk planned ``n_action_steps`` ago could not (ResiP's point for precise insertion).

The actor's last layer starts at zero, so an untrained residual reproduces the base *exactly* (bit for bit: the
correction is computed as ``unnormalize(nb + 0) - unnormalize(nb) == 0`` and added to the base's own numbers).

Where it runs:

- everything built on the executor (``robolearn eval``, ``run``, ``teleop policy=``, ``collect policy=``, videos)
  picks up :meth:`ResidualPolicy.correct_actions` as its per-step hook automatically; ``predict_action`` returns
  the base's chunks unchanged, so nothing is corrected twice;
- the policy server hands clients chunks, not steps: :meth:`ResidualPolicy.for_chunk_clients` gives the view it
  serves, whose chunks carry the correction on the action for the *current* observation only (the later actions
  of a chunk have no observation yet to correct them with).

Checkpoints hold the actor only (mean MLP and log-std); ``config.yaml`` names the base by relative path and
content hash (:mod:`robolearn.policies.wrapper`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.distributions import Normal

from robolearn.policies.registry import register_policy
from robolearn.policies.wrapper import PolicyWrapper
from robolearn.rl.features import ObsFeatures


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, *, out_gain: float) -> nn.Sequential:
    """Tanh MLP with orthogonal initialisation (the usual PPO recipe); ``out_gain=0`` zeroes the last layer."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.Tanh()]
        width = int(h)
    layers.append(nn.Linear(width, out_dim))
    for m in layers:
        if isinstance(m, nn.Linear):
            gain = out_gain if m is layers[-1] else math.sqrt(2.0)
            if gain == 0.0:
                nn.init.zeros_(m.weight)
            else:
                nn.init.orthogonal_(m.weight, gain)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class GaussianActor(nn.Module):
    """A diagonal Gaussian over the residual: MLP mean (last layer zero: the residual starts at exactly 0) and a
    state-independent learned log-std."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], init_log_std: float) -> None:
        super().__init__()
        self.mean = mlp(in_dim, hidden, out_dim, out_gain=0.0)
        self.log_std = nn.Parameter(torch.full((out_dim,), float(init_log_std)))

    def forward(self, x: torch.Tensor) -> Normal:
        mean = self.mean(x)
        return Normal(mean, self.log_std.exp().expand_as(mean))


@register_policy("residual")
class ResidualPolicy(ObsFeatures, PolicyWrapper):
    """A frozen chunk policy whose executed actions a Gaussian MLP corrects step by step (see the module docstring).

    ``action_scale``: the residual's output is multiplied by this before it is added in normalized action space.
    ``hidden``: the actor MLP's widths. ``init_log_std``: the actor's initial exploration noise (training only).
    ``obs_keys``: the observation keys the residual reads (default: the base's one-dimensional keys).
    ``obs_norm``: ``"base"`` -- the residual reads observations normalized by the base's normalizer only;
    ``"running"`` -- and then standardized by running mean/std of the states fine-tuning visits (updated while
    training, frozen in the checkpoint; clipped to +-``OBS_CLIP``). Why: the base's min-max scale spans the whole
    workspace, so a millimetre that decides an insertion is ~0.01 of a normalized unit; the visited states'
    spread is much smaller (see the README's residual RL section for what it changed on peg_insert).
    ``squash``: the residual is ``tanh`` of the MLP's output, so a correction never exceeds ``action_scale`` (what
    the off-policy learner, ``learner=td3``, trains: a critic's gradient would otherwise push the mean without
    bound); ``tanh(0) = 0``, so it too starts exactly at the base.
    """

    def __init__(self, base: Any, action_scale: float = 0.1, hidden: Sequence[int] = (256, 256),
                 init_log_std: float = -1.0, obs_keys: Sequence[str] | None = None, obs_norm: str = "base",
                 squash: bool = False) -> None:
        super().__init__(base)
        if not float(action_scale) > 0:
            raise ValueError(f"action_scale must be > 0, got {action_scale}")
        self.action_scale = float(action_scale)
        self.hidden = [int(h) for h in hidden]
        self.init_log_std = float(init_log_std)
        self.squash = bool(squash)
        self.init_features(base, obs_keys, obs_norm, "the residual")
        self.actor = GaussianActor(self.obs_dim + self.action_dim, self.action_dim, self.hidden, self.init_log_std)
        self.to(base.device)

    def train(self, mode: bool = True) -> "ResidualPolicy":
        """Only the residual has a training mode: the base stays in eval mode (no dropout while it is rolled out,
        whatever a caller toggles)."""
        super().train(mode)
        self.base.eval()
        return self

    def wrapper_config(self) -> dict[str, Any]:
        return {"action_scale": self.action_scale, "hidden": list(self.hidden), "init_log_std": self.init_log_std,
                "obs_keys": list(self.feature_keys), "obs_norm": self.obs_norm, "squash": self.squash}

    # ------------------------------------------------------------------ features and the correction
    def features(self, obs: Mapping[str, Any], base_actions: Any, update_stats: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(normalized observation (n, obs_dim), normalized base action (n, action_dim))``."""
        base = torch.as_tensor(np.asarray(base_actions), device=self.device).float()
        return self.obs_features(obs, update_stats), self.normalizer.normalize(self.action_key, base).float()

    def actor_input(self, obs_features: torch.Tensor, base_norm: torch.Tensor) -> torch.Tensor:
        return torch.cat([obs_features, base_norm], dim=1)

    def apply_residual(self, base_actions: Any, residual: torch.Tensor) -> np.ndarray:
        """Raw actions: the base actions ``(n, A)`` moved by ``action_scale * residual`` in normalized action space.
        Computed as base + (unnormalize(nb + d) - unnormalize(nb)), so a zero residual returns the base's own
        numbers exactly (no round trip through the normalizer)."""
        base = torch.as_tensor(np.asarray(base_actions, dtype=np.float32), device=self.device)
        key, norm = self.action_key, self.normalizer
        nb = norm.normalize(key, base)
        shift = norm.unnormalize(key, nb + self.action_scale * residual.to(nb.dtype)) - norm.unnormalize(key, nb)
        return (base + shift).detach().cpu().numpy().astype(np.float32)

    def residual_mean(self, actor_input: torch.Tensor) -> torch.Tensor:
        """The residual the policy deploys (before ``action_scale``): the actor's mean, ``tanh``-bounded when
        ``squash``."""
        mean = self.actor.mean(actor_input)
        return torch.tanh(mean) if self.squash else mean

    @torch.no_grad()
    def correct_actions(self, obs: Mapping[str, Any], base_actions: np.ndarray, env_ids: Any = None) -> np.ndarray:
        """The executor's per-step hook (picked up automatically): base actions plus the residual's *mean* --
        deterministic, what evaluation and deployment run. ``env_ids`` is not needed: the residual keeps no
        per-environment state."""
        obs_features, base_norm = self.features(obs, base_actions)
        return self.apply_residual(base_actions, self.residual_mean(self.actor_input(obs_features, base_norm)))

    # ------------------------------------------------------------------ chunk clients (the policy server)
    def corrected_chunk(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        """The base's chunk with the action for the current (newest) observation corrected; the later actions are
        the base's (no observation exists yet to correct them with). What a client that receives chunks gets."""
        chunk = self.base.predict_action(obs_history, noise) if noise is not None \
            else self.base.predict_action(obs_history)
        now = int(self.n_obs_steps) - 1
        newest = self.newest_frame(obs_history)
        out = chunk.clone() if torch.is_tensor(chunk) else torch.as_tensor(np.array(chunk))
        fixed = self.correct_actions(newest, out[:, now].detach().float().cpu().numpy())
        out[:, now] = torch.as_tensor(fixed, dtype=out.dtype, device=out.device)
        return out

    def for_chunk_clients(self) -> "ChunkClientView":
        """This policy as the policy server should serve it (see :class:`ChunkClientView`)."""
        return ChunkClientView(self)


class ChunkClientView:
    """A residual policy for callers that receive whole chunks and have no per-step hook (the policy server):
    ``predict_action`` returns :meth:`ResidualPolicy.corrected_chunk` -- only the action for the current
    observation is corrected -- and there is no ``correct_actions``, so an executor driving this view (a remote
    client's runner) executes the chunk as sent. Everything else is the residual policy's."""

    def __init__(self, policy: ResidualPolicy) -> None:
        self.policy = policy

    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.policy.corrected_chunk(obs_history, noise)

    def __getattr__(self, name: str) -> Any:
        if name in ("policy", "correct_actions", "for_chunk_clients") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.policy, name)
