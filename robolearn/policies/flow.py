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
import torch.nn.functional as F

from robolearn.policies.base import ChunkPolicy

INTEGRATORS = ("euler", "midpoint")
TIME_SAMPLINGS = ("uniform", "logit_normal", "beta")


class FlowPolicy(ChunkPolicy):
    """Chunk policy whose backbone predicts the velocity of a straight noise-to-action path.

    Args (besides :class:`ChunkPolicy`'s):
        integrator: default ODE integrator, ``"euler"`` (1 backbone call per step) or ``"midpoint"`` (2).
        num_steps: default number of integration steps (>= 1; 1..10 is the useful range).
        time_sampling: ``"uniform"``, ``"logit_normal"`` or ``"beta"`` (pi0's).
        logit_mean, logit_std: logit-normal parameters.
        beta_alpha, beta_beta, beta_s: pi0's Beta schedule parameters (1.5, 1, 0.999).
        time_scale: factor between t in [0, 1] and the timestep the backbone embeds.
        clip_sample: clip the final chunk to [-1, 1] (the range of min-max normalized actions).
    """

    policy_type = "flow"

    def __init__(
        self,
        *,
        integrator: str = "euler",
        num_steps: int = 10,
        time_sampling: str = "beta",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        beta_alpha: float = 1.5,
        beta_beta: float = 1.0,
        beta_s: float = 0.999,
        time_scale: float = 100.0,
        clip_sample: bool = True,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.beta_alpha, self.beta_beta, self.beta_s = float(beta_alpha), float(beta_beta), float(beta_s)
        self.time_scale = float(time_scale)
        self.clip_sample = bool(clip_sample)
        self._kind, self._steps = "euler", int(num_steps)
        self.set_sampler(integrator, num_steps)

    # ------------------------------------------------------------------ sampler selection
    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        kind = self._kind if kind is None else kind
        steps = self._steps if steps is None else int(steps)
        self._check(kind, steps)
        self._kind, self._steps = kind, steps

    @staticmethod
    def _check(kind: str, steps: int) -> None:
        if kind not in INTEGRATORS:
            raise ValueError(f"unknown flow integrator {kind!r}; choose one of {INTEGRATORS}")
        if steps < 1:
            raise ValueError(f"flow steps must be >= 1, got {steps}")

    @property
    def sampler_config(self) -> dict[str, Any]:
        return {"kind": self._kind, "steps": self._steps}

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        cond: torch.Tensor,
        noise: torch.Tensor,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        seeded: bool = False,
    ) -> torch.Tensor:
        kind = self._kind if sampler is None else sampler
        n = self._steps if steps is None else int(steps)
        self._check(kind, n)
        return self._integrate(noise, self._prepare(cond), kind, n, first=0)

    def sample_warm(self, cond: torch.Tensor, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Start on the straight path at t0 = 1 - steps/n, between the noise and the guessed chunk, and
        integrate only the last ``steps`` of the configured ``n`` steps (RTI-DP's warm start, for flows)."""
        n = self._steps
        k = max(1, min(int(steps), n))
        t0 = 1.0 - k / n
        x = (1.0 - t0) * noise + t0 * guess
        return self._integrate(x, self._prepare(cond), self._kind, n, first=n - k)

    def _integrate(self, x: torch.Tensor, prepared: Any, kind: str, n: int, first: int) -> torch.Tensor:
        """Euler or midpoint steps ``first .. n-1`` of an ``n``-step integration from t=0 (noise) to t=1."""
        noise = x
        B = x.shape[0]
        dtype = self.backbone_dtype
        dt = 1.0 / n
        # backbone timesteps for every evaluation, computed once (t and, for midpoint, t + dt/2)
        grid = torch.arange(n, dtype=torch.float32, device=noise.device) * dt
        t_start = (grid * self.time_scale)
        t_mid = ((grid + 0.5 * dt) * self.time_scale)
        for i in range(first, n):
            v = self.backbone(x.to(dtype), t_start[i].expand(B), prepared).float()
            if kind == "midpoint":
                v = self.backbone((x + (0.5 * dt) * v).to(dtype), t_mid[i].expand(B), prepared).float()
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

    def loss(self, cond: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        B = action.shape[0]
        noise = torch.randn_like(action)
        t = self.sample_time(B, action.device)
        tb = t[:, None, None]
        x_t = (1.0 - tb) * noise + tb * action
        pred = self.backbone(x_t, t * self.time_scale, cond)
        return F.mse_loss(pred, action - noise)
