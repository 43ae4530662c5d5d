"""Timestep embeddings shared by the denoiser backbones.

Both policies hand the backbone a float timestep per sample: the diffusion policy passes its discrete step
(0..num_train_timesteps-1), the flow policy its time t in [0, 1] multiplied by ``time_scale`` (100 by default),
so the same sinusoidal frequencies see the same range in both cases (a sinusoid of t in [0, 1] would barely
move at the low frequencies and waste most of the embedding).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoidal features of a scalar (Vaswani et al. 2017; Ho et al. 2020 use it for steps).

    The frequencies are computed once per device and kept as a plain float32 attribute, not a buffer, so
    that casting the model to bfloat16 for inference does not round them (t * freq reaches ~100 rad, where
    bf16's 3 significant digits would be off by a fraction of a turn). The result is float32; callers cast
    it to their weights' dtype.
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
        self.dim, self.max_period = dim, max_period
        self._freqs: dict[torch.device, torch.Tensor] = {}

    def freqs(self, device: torch.device) -> torch.Tensor:
        if device not in self._freqs:
            half = self.dim // 2
            f = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
            self._freqs[device] = f.to(device)
        return self._freqs[device]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t``: (B,) float -> (B, dim) float32."""
        args = t.float()[:, None] * self.freqs(t.device)[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class TimestepMLP(nn.Module):
    """Sinusoid -> Linear -> Mish -> Linear: the learned step encoder Diffusion Policy puts before FiLM."""

    def __init__(self, dim: int, hidden_mult: int = 4, out_dim: int | None = None) -> None:
        super().__init__()
        self.sinusoid = SinusoidalEmbedding(dim)
        self.fc1 = nn.Linear(dim, dim * hidden_mult)
        self.act = nn.Mish()
        self.fc2 = nn.Linear(dim * hidden_mult, out_dim or dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.sinusoid(t).to(self.fc1.weight.dtype))))


def as_timesteps(t: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or (B,) timestep to a (B,) float tensor on ``device``."""
    if not torch.is_tensor(t):
        return torch.full((batch,), float(t), device=device)
    t = t.to(device=device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t
