"""Flow-matching chunk policy (Lipman et al. 2023; rectified flow, Liu et al. 2023).

Convention: time runs from noise to data, ``x_t = (1 - t) * noise + t * action`` for t in [0, 1]
(t = 0 is pure noise, t = 1 the clean, normalized chunk). The backbone regresses the constant velocity of
that straight path, ``v = action - noise``, and sampling integrates ``dx/dt = v(x, t)`` from the initial
noise at t = 0 to t = 1 with Euler or midpoint (RK2) steps. The map noise -> chunk is an ODE solution, so
it is deterministic given the noise. (pi0 and openpi write the same path with t reversed, 1 = noise.)

The backbone sees ``t * time_scale`` (default 100) so its sinusoidal timestep embedding covers the same
range as for a 100-step diffusion model.

Training times:

- ``uniform``: t ~ U(0, 1).
- ``logit_normal``: t = sigmoid(n), n ~ N(mean, std) — Esser et al. 2024 (Stable Diffusion 3), which
  found it better than uniform for images; it favours the middle of the path.
- ``beta``: pi0's schedule (Black et al. 2024, "pi0: A Vision-Language-Action Flow Model", Sec. IV /
  appendix): in their notation tau ~ Beta((s - tau) / s; 1.5, 1) with s = 0.999, which emphasises the noisier
  times (they argue predicting actions from a given observation is a far more constrained problem than image
  generation, so the low-noise end needs less training) and never samples times above s. In our
  convention (t = 0 noise) that is ``t = s * (1 - u)``, ``u ~ Beta(alpha=1.5, beta=1)``.
"""
from __future__ import annotations

from typing import Any

import torch

from robolearn.policies.base import ChunkPolicy, Solver, weighted_mse
from robolearn.policies.config import FlowConfig
from robolearn.policies.registry import register_policy


@register_policy("flow")
class FlowPolicy(ChunkPolicy):
    """Chunk policy whose backbone predicts the velocity of a straight noise-to-action path.

    Settings (``cfg.flow``, :class:`~robolearn.policies.config.FlowSettings`): the training-time schedule
    (``uniform``, ``logit_normal`` or pi0's ``beta``), ``time_scale`` between t in [0, 1] and the timestep the
    backbone embeds, ``clip_sample`` (clip the final chunk to [-1, 1]). Samplers: ``euler`` (one backbone call
    per step) and ``midpoint`` (two).
    """

    config_class = FlowConfig

    def __init__(self, cfg: FlowConfig, **parts: Any) -> None:
        super().__init__(cfg, **parts)
        f = cfg.flow
        self.time_sampling = f.time_sampling
        self.logit_mean, self.logit_std = float(f.logit_mean), float(f.logit_std)
        self.beta_alpha, self.beta_beta, self.beta_s = float(f.beta_alpha), float(f.beta_beta), float(f.beta_s)
        self.time_scale = float(f.time_scale)
        self.clip_sample = bool(f.clip_sample)

    # ------------------------------------------------------------------ sampling
    def solver(self, noise: torch.Tensor, kind: str, steps: int, generator: Any) -> tuple[Solver, int]:
        calls = steps * (2 if kind == "midpoint" else 1)
        return self._integrate(noise, kind, steps, first=0), calls

    def warm_solver(self, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> tuple[Solver, int, int, str]:
        """Start on the straight path at t0 = 1 - steps/n, between the noise and the guessed chunk, and
        integrate only the last ``steps`` of the configured ``n`` steps (RTI-DP's warm start, for flows)."""
        kind, n = self.cfg.sampler.kind, self.cfg.sampler.steps
        k = max(1, min(int(steps), n))
        t0 = 1.0 - k / n
        x = (1.0 - t0) * noise + t0 * guess
        per = 2 if kind == "midpoint" else 1
        return self._integrate(x, kind, n, first=n - k), k * per, (n - k) * per, f"{kind}-{n}"

    def _integrate(self, x: torch.Tensor, kind: str, n: int, first: int) -> Solver:
        """Euler or midpoint steps ``first .. n-1`` of an ``n``-step integration from t=0 (noise) to t=1."""
        dt = 1.0 / n
        # backbone timesteps for every evaluation, computed once (t and, for midpoint, t + dt/2)
        grid = torch.arange(n, dtype=torch.float32, device=x.device) * dt
        t_start = grid * self.time_scale
        t_mid = (grid + 0.5 * dt) * self.time_scale
        for i in range(first, n):
            v = yield x, t_start[i]
            if kind == "midpoint":
                v = yield x + (0.5 * dt) * v, t_mid[i]
            x = x + dt * v
        return x.clamp(-1.0, 1.0) if self.clip_sample else x

    # ------------------------------------------------------------------ training
    def sample_time(self, batch: int, device: torch.device) -> torch.Tensor:
        """Training times t in [0, 1] (0 = noise) drawn from the configured schedule."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, device=device)
        if self.time_sampling == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(batch, device=device))
        dist = torch.distributions.Beta(
            torch.tensor(self.beta_alpha, device=device), torch.tensor(self.beta_beta, device=device)
        )
        return self.beta_s * (1.0 - dist.sample((batch,)))

    def loss(self, cond: torch.Tensor, action: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        B = action.shape[0]
        noise = torch.randn_like(action)
        t = self.sample_time(B, action.device)
        tb = t[:, None, None]
        x_t = (1.0 - tb) * noise + tb * action
        pred = self.backbone(x_t, t * self.time_scale, cond)
        return weighted_mse(pred, action - noise, weight)
