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
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from robolearn.policies.base import ChunkPolicy, Solver, weighted_mse
from robolearn.policies.config import DiffusionConfig
from robolearn.policies.registry import register_policy


@register_policy("diffusion")
class DiffusionPolicy(ChunkPolicy):
    """Chunk policy whose backbone predicts the noise (or the clean chunk) of a diffused action chunk.

    Settings (``cfg.diffusion``, :class:`~robolearn.policies.config.DiffusionSettings`): the DDPM training
    config; ``ddpm_seed`` is mixed into DDPM's per-step noise when ``predict_action`` is given its initial noise (each
    row's generator is seeded by that row's noise and ``ddpm_seed``).
    """

    config_class = DiffusionConfig
    stochastic_samplers = ("ddpm",)

    def __init__(self, cfg: DiffusionConfig, **parts: Any) -> None:
        super().__init__(cfg, **parts)
        d = cfg.diffusion
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=d.num_train_timesteps,
            beta_schedule=d.beta_schedule,
            prediction_type=d.prediction_type,
            clip_sample=bool(d.clip_sample),
            clip_sample_range=1.0,
            variance_type="fixed_small",
        )
        self.num_train_timesteps = d.num_train_timesteps
        self.prediction_type = d.prediction_type
        self._samplers: dict[tuple[str, int], tuple[Any, list[int]]] = {}
        self._t_tensors: dict[tuple[str, int, str], torch.Tensor] = {}

    def _scheduler(self, kind: str, steps: int) -> tuple[Any, list[int]]:
        """A scheduler with its timesteps set, cached per (kind, steps): ``set_timesteps`` and the config
        copy are not free and the sampling loop should only pay for ``step()``."""
        key = (kind, steps)
        if key not in self._samplers:
            self.cfg.check_sampler(kind, steps)
            if kind == "ddim":
                sched = DDIMScheduler.from_config(self.noise_scheduler.config, set_alpha_to_one=True, steps_offset=0)
            else:
                sched = DDPMScheduler.from_config(self.noise_scheduler.config)
            sched.set_timesteps(steps)
            timesteps = [int(t) for t in sched.timesteps]
            if kind == "ddpm" and DDPMUpdate.handles(sched):
                sched = DDPMUpdate(sched)
            elif kind == "ddim" and DDIMUpdate.handles(sched):
                sched = DDIMUpdate(sched)
            self._samplers[key] = (sched, timesteps)
        return self._samplers[key]

    # ------------------------------------------------------------------ sampling
    def noise_generator(self, noise: torch.Tensor, salt: int = 0) -> list[torch.Generator]:
        return super().noise_generator(noise, salt=self.cfg.diffusion.ddpm_seed + salt)

    def solver(self, noise: torch.Tensor, kind: str, steps: int, generator: Any) -> tuple[Solver, int]:
        sched, timesteps = self._scheduler(kind, steps)
        step_kw: dict[str, Any] = {"return_dict": False}
        if kind == "ddim":
            step_kw["eta"] = 0.0
        elif generator is not None:
            step_kw["generator"] = generator
        return self._steps(sched, timesteps, noise, step_kw, self._timestep_tensor(kind, steps, noise.device)), \
            len(timesteps)

    def _timestep_tensor(self, kind: str, steps: int, device: torch.device) -> torch.Tensor:
        """The sampler's timesteps as a float32 tensor on ``device``, made once per (sampler, device): a chunk
        then copies nothing from the host, which CUDA-graph capture of the whole loop needs."""
        key = (kind, steps, str(device))
        cached = self._t_tensors.get(key)
        if cached is None:
            with torch.inference_mode(False):  # kept across calls: a normal tensor, usable with autograd too
                cached = self._t_tensors[key] = torch.tensor(self._scheduler(kind, steps)[1], dtype=torch.float32,
                                                             device=device)
        return cached

    def warm_solver(self, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> tuple[Solver, int, int, str]:
        """Noise the guessed chunk to the DDIM timestep ``steps`` from the end of the configured schedule (DDIM
        with the configured step count, whatever the default sampler) and run only those last steps (RTI-DP's
        warm start; deterministic given ``noise``)."""
        sched, timesteps = self._scheduler("ddim", self.cfg.sampler.steps)
        k = max(1, min(int(steps), len(timesteps)))
        tail = timesteps[-k:]
        x = self.noise_scheduler.add_noise(guess, noise, torch.full((noise.shape[0],), tail[0], dtype=torch.long))
        name = f"ddim-{self.cfg.sampler.steps}"
        t_tail = self._timestep_tensor("ddim", self.cfg.sampler.steps, x.device)[len(timesteps) - k:]
        return self._steps(sched, tail, x, {"return_dict": False, "eta": 0.0}, t_tail), k, len(timesteps) - k, name

    @staticmethod
    def _steps(sched: Any, timesteps: list[int], x: torch.Tensor, step_kw: dict[str, Any],
               t_all: torch.Tensor) -> Solver:
        """``timesteps`` run by ``sched.step``; ``t_all``: the same timesteps as the backbone's float32 input."""
        for i, t in enumerate(timesteps):
            out = yield x, t_all[i]
            x = sched.step(out, t, x, **step_kw)[0]
        return x

    # ------------------------------------------------------------------ training
    def loss(self, cond: torch.Tensor, action: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        B = action.shape[0]
        noise = torch.randn_like(action)
        t = torch.randint(0, self.num_train_timesteps, (B,), device=action.device)
        noisy = self.noise_scheduler.add_noise(action, noise, t)
        pred = self.backbone(noisy, t.float(), cond)
        target = noise if self.prediction_type == "epsilon" else action
        return weighted_mse(pred, target, weight)


class _PrecomputedUpdate:
    """What :class:`DDPMUpdate` and :class:`DDIMUpdate` share: the scheduler they stand in for (``.scheduler``),
    each timestep's coefficients (``coef``, filled by the subclass) and the predicted clean chunk."""

    def __init__(self, sched: Any) -> None:
        self.scheduler = sched
        cfg = sched.config
        self.epsilon = cfg.prediction_type == "epsilon"
        self.clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
        self.coef: dict[int, tuple[torch.Tensor | None, ...]] = {}

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_b: torch.Tensor,
            sqrt_a: torch.Tensor) -> torch.Tensor:
        """The clean chunk the model predicts (clipped when the scheduler clips), as ``step()`` computes it."""
        x0 = (sample - sqrt_b * model_output) / sqrt_a if self.epsilon else model_output
        return x0.clamp(-self.clip, self.clip) if self.clip is not None else x0


class DDPMUpdate(_PrecomputedUpdate):
    """diffusers' ``DDPMScheduler.step`` for this policy's settings (``fixed_small`` variance, epsilon or sample
    prediction, optional clipping, no thresholding), with each timestep's coefficients computed once.

    The coefficients are the same 0-dim float32 tensors ``step()`` builds on every call, from the same
    expressions, and the update applies them in the same order, so the result is bitwise the same (tested); the
    variance noise comes from diffusers' own ``randn_tensor`` with the caller's generator(s). What it saves per
    step is ``step()``'s scalar arithmetic and lookups (``previous_timestep`` twice, ``_get_variance``), which
    weigh most in a block-cached chunk, whose steps are otherwise cheap.
    """

    def __init__(self, sched: DDPMScheduler) -> None:
        super().__init__(sched)
        for t in (int(v) for v in sched.timesteps):
            prev_t = sched.previous_timestep(t)
            a_t = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.one
            b_t, b_prev = 1 - a_t, 1 - a_prev
            cur_a = a_t / a_prev
            cur_b = 1 - cur_a
            std = sched._get_variance(t) ** 0.5 if t > 0 else None
            self.coef[t] = (b_t ** (0.5), a_t ** (0.5), (a_prev ** (0.5) * cur_b) / b_t,
                            cur_a ** (0.5) * b_prev / b_t, std)

    @staticmethod
    def handles(sched: DDPMScheduler) -> bool:
        cfg = sched.config
        return (cfg.variance_type == "fixed_small" and not cfg.thresholding
                and cfg.prediction_type in ("epsilon", "sample") and hasattr(sched, "_get_variance"))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: Any = None, return_dict: bool = False) -> tuple[torch.Tensor]:
        if return_dict:
            raise ValueError("DDPMUpdate.step returns a tuple only (return_dict=False)")
        sqrt_b, sqrt_a, c_x0, c_x, std = self.coef[int(timestep)]
        prev = c_x0 * self._x0(model_output, sample, sqrt_b, sqrt_a) + c_x * sample
        if std is not None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
            prev = prev + std * noise
        return (prev,)


class DDIMUpdate(_PrecomputedUpdate):
    """diffusers' ``DDIMScheduler.step`` at ``eta=0`` (how this policy samples DDIM) for epsilon or sample
    prediction, optional clipping, no thresholding, with each timestep's coefficients computed once.

    The coefficients are the same 0-dim float32 tensors ``step()`` builds on every call, from the same expressions
    (``std_dev_t = 0 * variance ** 0.5`` included), and the update applies them in the same order, so the result
    is bitwise the same (tested). What it saves is ``step()``'s per-call scalar arithmetic and lookups: about 48 µs
    of the 60 µs a step took here at batch 1 (one thread), 0.5 ms per DDIM-10 chunk -- a few percent of a
    block-cached chunk on a CPU, and host time that a GPU's graphed denoiser calls otherwise wait on.
    """

    def __init__(self, sched: DDIMScheduler) -> None:
        super().__init__(sched)
        step = sched.config.num_train_timesteps // sched.num_inference_steps
        for t in (int(v) for v in sched.timesteps):
            prev_t = t - step
            a_t = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
            b_t = 1 - a_t
            std = 0.0 * sched._get_variance(t, prev_t) ** (0.5)
            self.coef[t] = (b_t ** (0.5), a_t ** (0.5), (1 - a_prev - std ** 2) ** (0.5), a_prev ** (0.5))

    @staticmethod
    def handles(sched: Any) -> bool:
        cfg = sched.config
        return (isinstance(sched, DDIMScheduler) and not cfg.thresholding
                and cfg.prediction_type in ("epsilon", "sample") and hasattr(sched, "_get_variance")
                and sched.num_inference_steps is not None)

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        if return_dict or eta != 0.0:
            raise ValueError("DDIMUpdate.step is DDIM at eta=0 returning a tuple (return_dict=False)")
        sqrt_b, sqrt_a, c_dir, sqrt_a_prev = self.coef[int(timestep)]
        eps = model_output if self.epsilon else (sample - sqrt_a * model_output) / sqrt_b  # before clipping
        return (sqrt_a_prev * self._x0(model_output, sample, sqrt_b, sqrt_a) + c_dir * eps,)
