"""What an RL head over a frozen chunk policy reads: the newest low-dimensional observation, normalized.

Shared by the residual policy (ResiP) and the steered policy (DSRL). Two steps:

1. the base's own normalizer (min-max over the demonstrations) on each one-dimensional observation key --
   :meth:`ObsFeatures.base_features`;
2. with ``obs_norm="running"``, a standardization by the running mean/std of the states fine-tuning visits
   (updated while training, frozen in the checkpoint; clipped to +-``OBS_CLIP``) -- :meth:`ObsFeatures.standardize`.
   Why: the base's min-max scale spans the whole workspace, so a millimetre that decides an insertion is ~0.01 of
   a normalized unit; the visited states' spread is much smaller.

The statistics are buffers of the policy module (``obs_mean``, ``obs_var``, ``obs_count``), so they travel in its
checkpoint with the head's weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

OBS_NORMS = ("base", "running")


def low_dim_keys(base: Any) -> list[str]:
    """The base's observation keys an RL head can read: one-dimensional ones (images are left to the base)."""
    return [k for k, shape in base.obs_shapes.items() if len(tuple(shape)) == 1]


class ObsFeatures:
    """Mixin for a :class:`~robolearn.policies.wrapper.PolicyWrapper` (an ``nn.Module``): call
    :meth:`init_features` in ``__init__``; then :meth:`obs_features` maps batched newest observations to the
    head's input."""

    OBS_CLIP = 10.0

    def init_features(self, base: Any, obs_keys: Sequence[str] | None, obs_norm: str, what: str) -> None:
        """``what`` names the head in error messages ("the residual")."""
        keys = list(obs_keys) if obs_keys is not None else low_dim_keys(base)
        shapes = dict(base.obs_shapes)
        wrong = [k for k in keys if k not in shapes or len(tuple(shapes[k])) != 1]
        if wrong:
            raise ValueError(f"{what} reads one-dimensional observation keys of its base; {wrong} are not "
                             f"(the base's keys and shapes: {shapes})")
        if not keys:
            raise ValueError(f"the base policy has no one-dimensional observation key for {what} to read "
                             f"(its keys and shapes: {shapes}); fine-tuning needs state observations")
        if obs_norm not in OBS_NORMS:
            raise ValueError(f"obs_norm must be 'base' or 'running', got {obs_norm!r}")
        self.feature_keys = keys
        self.obs_dim = int(sum(int(np.prod(shapes[k])) for k in keys))
        self.obs_norm = obs_norm
        # count 0: no statistics yet (features pass through unchanged)
        self.register_buffer("obs_mean", torch.zeros(self.obs_dim, dtype=torch.float64))  # type: ignore[attr-defined]
        self.register_buffer("obs_var", torch.ones(self.obs_dim, dtype=torch.float64))  # type: ignore[attr-defined]
        self.register_buffer("obs_count", torch.zeros((), dtype=torch.float64))  # type: ignore[attr-defined]

    def newest_frame(self, obs_history: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The newest frame ``{key: (n, ...)}`` of a batched history ``{key: (n, n_obs_steps, ...)}``, for the
        keys the head reads (what a caller that holds histories, not steps, feeds :meth:`obs_features`)."""
        return {k: torch.as_tensor(obs_history[k])[:, -1].cpu().numpy() for k in self.feature_keys}

    def base_features(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """Step 1 only: ``(n, obs_dim)`` float32 on the policy's device, from ``{key: (n, ...)}`` (other keys
        ignored). What a replay buffer stores (the standardization moves while training)."""
        parts = []
        for k in self.feature_keys:
            x = torch.as_tensor(np.asarray(obs[k]), device=self.device).float()  # type: ignore[attr-defined]
            parts.append(self.normalizer.normalize(k, x).reshape(x.shape[0], -1).float())  # type: ignore[attr-defined]
        return torch.cat(parts, dim=1)

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        """Step 2 (identity for ``obs_norm="base"`` or before any statistics)."""
        if self.obs_norm != "running" or float(self.obs_count) == 0:
            return feats
        std = torch.sqrt(self.obs_var + 1e-8)
        return ((feats.double() - self.obs_mean) / std).clamp(-self.OBS_CLIP, self.OBS_CLIP).float()

    def obs_features(self, obs: Mapping[str, Any], update_stats: bool = False) -> torch.Tensor:
        """Both steps. ``update_stats`` (training rollouts only): fold these observations into the running
        statistics first."""
        feats = self.base_features(obs)
        if update_stats and self.obs_norm == "running":
            self.update_obs_stats(feats)
        return self.standardize(feats)

    @torch.no_grad()
    def update_obs_stats(self, feats: torch.Tensor) -> None:
        """Merge a batch into the running mean/variance (Chan et al.'s parallel update)."""
        x = feats.detach().double()
        n = float(x.shape[0])
        if n == 0:
            return
        b_mean, b_var = x.mean(0), x.var(0, unbiased=False)
        count = float(self.obs_count)
        total = count + n
        delta = b_mean - self.obs_mean
        m2 = self.obs_var * count + b_var * n + delta ** 2 * count * n / total
        self.obs_mean += delta * n / total
        self.obs_var.copy_(m2 / total)
        self.obs_count.fill_(total)
