"""Diffusion Policy (Chi et al., RSS 2023): denoise an action chunk conditioned on the observation history.

Training uses diffusers' ``DDPMScheduler`` (Ho et al. 2020) with Diffusion Policy's settings: 100 training
steps, the ``squaredcos_cap_v2`` (cosine, Nichol & Dhariwal 2021) beta schedule, epsilon prediction (or
``sample``), and ``clip_sample`` — the predicted clean chunk is clipped to [-1, 1], the range of min-max
normalized actions. Sampling uses either ``DDPMScheduler`` (stochastic) or a ``DDIMScheduler`` built from the
same config (``DDIMScheduler.from_config``) with eta = 0 (Song et al. 2021), which makes the chunk a
deterministic function of the initial noise, at any number of steps.

How diffusers behaves here (read from diffusers 0.42's source): ``set_timesteps(k)`` with the default
"leading" spacing gives timesteps ``(arange(k) * (100 // k))[::-1]`` (k=10: 90, 80, ..., 0); DDIM's step goes
from ``t`` to ``t - 100 // k`` and, with ``set_alpha_to_one=True``, the last step lands on alpha_bar = 1;
``step()`` clips the predicted x0 when ``clip_sample`` is set, for both schedulers; DDPM's ``step()`` adds
variance noise drawn from its ``generator`` argument.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from robolearn.policies.base import ChunkPolicy

SAMPLERS = ("ddim", "ddpm")


class DiffusionPolicy(ChunkPolicy):
    """Chunk policy whose backbone predicts the noise (or the clean chunk) of a diffused action chunk.

    Args (besides :class:`ChunkPolicy`'s):
        num_train_timesteps, beta_schedule, prediction_type, clip_sample: the DDPM training config.
        sampler: default sampler, ``"ddim"`` (deterministic) or ``"ddpm"``.
        num_inference_steps: default number of sampling steps (1..num_train_timesteps).
        ddpm_seed: seed of the per-step DDPM noise when ``predict_action`` is given its initial noise.
    """

    policy_type = "diffusion"

    def __init__(
        self,
        *,
        num_train_timesteps: int = 100,
        beta_schedule: str = "squaredcos_cap_v2",
        prediction_type: str = "epsilon",
        clip_sample: bool = True,
        sampler: str = "ddim",
        num_inference_steps: int = 10,
        ddpm_seed: int = 0,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'sample', got {prediction_type!r}")
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            clip_sample=clip_sample,
            clip_sample_range=1.0,
            variance_type="fixed_small",
        )
        self.num_train_timesteps = num_train_timesteps
        self.prediction_type = prediction_type
        self.ddpm_seed = ddpm_seed
        self._samplers: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        self._kind, self._steps = "ddim", num_inference_steps
        self.set_sampler(sampler, num_inference_steps)

    # ------------------------------------------------------------------ sampler selection
    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        kind = self._kind if kind is None else kind
        steps = self._steps if steps is None else int(steps)
        self._scheduler(kind, steps)  # validates
        self._kind, self._steps = kind, steps

    @property
    def sampler_config(self) -> dict[str, Any]:
        return {"kind": self._kind, "steps": self._steps}

    def _scheduler(self, kind: str, steps: int) -> tuple[Any, list[int]]:
        """A scheduler with its timesteps set, cached per (kind, steps): ``set_timesteps`` and the config
        copy are not free and the sampling loop should only pay for ``step()``."""
        key = (kind, steps)
        if key not in self._samplers:
            if kind not in SAMPLERS:
                raise ValueError(f"unknown diffusion sampler {kind!r}; choose one of {SAMPLERS}")
            if not 1 <= steps <= self.num_train_timesteps:
                raise ValueError(f"sampler steps must be in [1, {self.num_train_timesteps}], got {steps}")
            if kind == "ddim":
                sched = DDIMScheduler.from_config(self.noise_scheduler.config, set_alpha_to_one=True, steps_offset=0)
            else:
                sched = DDPMScheduler.from_config(self.noise_scheduler.config)
            sched.set_timesteps(steps)
            self._samplers[key] = (sched, [int(t) for t in sched.timesteps])
        return self._samplers[key]

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
        sched, timesteps = self._scheduler(kind, self._steps if steps is None else int(steps))
        B = noise.shape[0]
        prepared = self._prepare(cond)  # observation work once per chunk, not per step
        dtype = self.backbone_dtype
        t_all = torch.tensor(timesteps, dtype=torch.float32, device=noise.device)
        step_kw: dict[str, Any] = {"return_dict": False}
        if kind == "ddim":
            step_kw["eta"] = 0.0
        elif generator is not None:
            step_kw["generator"] = generator
        elif seeded:  # DDPM's per-step noise made a function of the initial noise (repeatable)
            step_kw["generator"] = torch.Generator().manual_seed(self.ddpm_seed)
        x = noise
        for i, t in enumerate(timesteps):
            out = self.backbone(x.to(dtype), t_all[i].expand(B), prepared).float()
            x = sched.step(out, t, x, **step_kw)[0]
        return x

    def sample_warm(self, cond: torch.Tensor, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Noise the guessed chunk to the DDIM timestep ``steps`` from the end of the configured schedule and
        run only those last steps (RTI-DP's warm start; deterministic given ``noise``)."""
        sched, timesteps = self._scheduler("ddim", self._steps)
        k = max(1, min(int(steps), len(timesteps)))
        tail = timesteps[-k:]
        B = noise.shape[0]
        x = self.noise_scheduler.add_noise(guess, noise, torch.full((B,), tail[0], dtype=torch.long))
        prepared = self._prepare(cond)
        dtype = self.backbone_dtype
        for t in tail:
            out = self.backbone(x.to(dtype), torch.full((B,), float(t), device=x.device), prepared).float()
            x = sched.step(out, t, x, eta=0.0, return_dict=False)[0]
        return x

    # ------------------------------------------------------------------ training
    def loss(self, cond: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        B = action.shape[0]
        noise = torch.randn_like(action)
        t = torch.randint(0, self.num_train_timesteps, (B,), device=action.device)
        noisy = self.noise_scheduler.add_noise(action, noise, t)
        pred = self.backbone(noisy, t.float(), cond)
        target = noise if self.prediction_type == "epsilon" else action
        return F.mse_loss(pred, target)
