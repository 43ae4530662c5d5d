"""The chunk-policy contract every consumer (training, evaluation, RL wrappers, caching, the runner) relies on.

A chunk policy maps an observation history ``{key: (B, n_obs_steps, ...)}`` to an action chunk
``(B, horizon, action_dim)`` in the environment's (unnormalized) units. Normalization lives inside the policy
(``policy.normalizer``, a buffer-holding module saved with the weights), so callers always speak raw units.

Determinism: the chunk is a deterministic function of the observation and the initial noise ``noise`` (shape
:meth:`ChunkPolicy.noise_shape`, standard normal, in the *normalized* action space) when the sampler is
deterministic — DDIM with eta 0 or the flow ODE. Latent-noise steering (DSRL, Wagenmaker et al. 2025) treats
the policy as exactly such a function of its noise. DDPM draws fresh noise at every step; given ``noise`` it
draws it from a fixed-seed generator so that it too is repeatable.

Executable part: following Diffusion Policy (Chi et al. 2023, Sec. 3.1 "closed-loop action-sequence
prediction"), the chunk's step ``n_obs_steps - 1`` is aligned with the latest observation; the first
``n_obs_steps - 1`` steps are the (already executed) past, and the robot executes ``n_action_steps`` actions
from the current step: ``chunk[:, n_obs_steps-1 : n_obs_steps-1+n_action_steps]`` (:meth:`executable`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from robolearn.data.normalizer import Normalizer


class ChunkPolicy(nn.Module, ABC):
    """Abstract chunk policy: an observation encoder, a denoiser backbone and a normalizer.

    Subclasses implement :meth:`sample` (normalized condition + initial noise -> normalized chunk),
    :meth:`loss` (training objective in normalized space) and :meth:`set_sampler`.

    Attributes:
        horizon, n_obs_steps, n_action_steps, action_dim: chunk geometry.
        obs_shapes: per-step shape of each observation key (``obs_keys`` is their order).
        action_key: the store key the actions come from (its normalizer entry).
        config: the resolved plain-dict configuration this policy was built from (what checkpoints save).
    """

    policy_type: ClassVar[str] = "abstract"

    def __init__(
        self,
        *,
        obs_encoder: nn.Module,
        backbone: nn.Module,
        normalizer: Normalizer,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        action_dim: int,
        obs_shapes: Mapping[str, tuple[int, ...]],
        action_key: str = "action",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps must be in [1, horizon={horizon}], got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps must be in [1, horizon - n_obs_steps + 1 = {horizon - n_obs_steps + 1}], "
                f"got {n_action_steps}"
            )
        self.obs_encoder = obs_encoder
        self.backbone = backbone
        self.normalizer = normalizer
        self.horizon, self.n_obs_steps, self.n_action_steps = int(horizon), int(n_obs_steps), int(n_action_steps)
        self.action_dim = int(action_dim)
        self.obs_shapes = {k: tuple(int(s) for s in v) for k, v in obs_shapes.items()}
        self.action_key = action_key
        self.config: dict[str, Any] = dict(config or {})

    # ------------------------------------------------------------------ geometry
    @property
    def obs_keys(self) -> list[str]:
        return list(self.obs_shapes)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def noise_shape(self, batch_size: int) -> tuple[int, int, int]:
        """Shape of the initial noise for ``batch_size`` chunks (normalized action space)."""
        return (int(batch_size), self.horizon, self.action_dim)

    def make_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal initial noise on the policy's device (drawn on CPU when a CPU generator is given)."""
        dev = self.device if generator is None else generator.device
        return torch.randn(self.noise_shape(batch_size), generator=generator, device=dev).to(self.device)

    def executable(self, chunk: torch.Tensor) -> torch.Tensor:
        """The actions to execute now: ``chunk[:, n_obs_steps-1 : n_obs_steps-1+n_action_steps]``."""
        start = self.n_obs_steps - 1
        return chunk[:, start : start + self.n_action_steps]

    def reset(self) -> None:
        """Start of an episode. The policies here keep no per-episode state (observation history and the
        action queue belong to the caller), so this does nothing; stateful wrappers override it."""

    # ------------------------------------------------------------------ observations
    def _to_device(self, x: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
        return t.to(self.device, non_blocking=True)

    def normalize_obs(self, obs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Raw observation history -> normalized tensors on the policy's device (checks keys and shapes)."""
        missing = [k for k in self.obs_shapes if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the policy needs {self.obs_keys}")
        out = {}
        for key, shape in self.obs_shapes.items():
            x = self._to_device(obs[key])
            if x.ndim != 2 + len(shape) or tuple(x.shape[2:]) != shape or x.shape[1] != self.n_obs_steps:
                raise ValueError(
                    f"observation {key!r} must have shape (B, {self.n_obs_steps}, {', '.join(map(str, shape))}), "
                    f"got {tuple(x.shape)}"
                )
            out[key] = self.normalizer.normalize(key, x).float()
        return out

    def encode_obs(self, obs: Mapping[str, Any]) -> torch.Tensor:
        """Raw observation history -> the backbone's condition ((B, C) or tokens (B, N, D))."""
        return self.obs_encoder(self.normalize_obs(obs))

    # ------------------------------------------------------------------ inference
    @property
    def backbone_dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            return p.dtype
        return torch.float32

    def set_inference_dtype(self, dtype: torch.dtype | str) -> None:
        """Cast the denoiser backbone (only) to ``dtype`` ("bfloat16"/"float32") for faster sampling.

        Batch-1 denoising on a CPU is bound by reading the weights (64M float32 parameters = 256 MB per call),
        so bfloat16 weights roughly halve a call where the CPU has native bf16 matrix products (AVX512-BF16,
        AMX). The observation encoder, normalizer and sampler arithmetic stay float32; the sampler casts the
        noisy chunk to the backbone's dtype and its output back. Lossy and meant for deployment: save
        checkpoints before casting, and training refuses a non-float32 backbone.
        """
        if isinstance(dtype, str):
            dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                     "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
        self.backbone.to(dtype)

    def _prepare(self, cond: torch.Tensor) -> Any:
        """The backbone's per-chunk precomputation, in the backbone's dtype."""
        return self.backbone.prepare(cond.to(self.backbone_dtype))

    def predict_action(
        self,
        obs_history: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample an action chunk (B, horizon, action_dim) in raw action units.

        ``noise``: initial noise of shape :meth:`noise_shape` (normalized space); drawn (from ``generator``
        if given) when None. ``sampler``/``steps`` override the configured sampler for this call only.
        Runs under ``torch.inference_mode``. Call ``policy.eval()`` before rolling out: in training mode
        the image encoder random-crops, which makes the chunk depend on more than the noise.
        """
        with torch.inference_mode():
            cond = self.encode_obs(obs_history)
            B = cond.shape[0]
            if noise is None:
                noise = self.make_noise(B, generator)
                seeded = False
            else:
                if tuple(noise.shape) != self.noise_shape(B):
                    raise ValueError(f"noise must have shape {self.noise_shape(B)}, got {tuple(noise.shape)}")
                noise = noise.to(self.device, torch.float32)
                seeded = True
            chunk = self.sample(cond, noise, sampler=sampler, steps=steps, generator=generator, seeded=seeded)
            chunk = self.normalizer.unnormalize(self.action_key, chunk)
        return chunk.clone()  # a normal tensor (inference tensors refuse later autograd / in-place use)

    def predict_action_warm(
        self,
        obs_history: Mapping[str, Any],
        prev_chunk: torch.Tensor,
        shift: int,
        steps: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Warm-started sampling (RTI-DP): start from the previous chunk shifted by the ``shift`` executed
        steps (its tail repeats the last action) and run only the last ``steps`` denoising steps.

        ``prev_chunk``: (B, horizon, action_dim) in raw action units, as :meth:`predict_action` returned it.
        The real-time runner calls this with ``blend=warmstart``.
        """
        with torch.inference_mode():
            cond = self.encode_obs(obs_history)
            B = cond.shape[0]
            prev = torch.as_tensor(prev_chunk, dtype=torch.float32, device=self.device)
            if tuple(prev.shape) != self.noise_shape(B):
                raise ValueError(f"prev_chunk must have shape {self.noise_shape(B)}, got {tuple(prev.shape)}")
            shift = max(0, min(int(shift), self.horizon - 1))
            shifted = torch.cat([prev[:, shift:], prev[:, -1:].expand(B, shift, self.action_dim)], dim=1)
            guess = self.normalizer.normalize(self.action_key, shifted)
            if noise is not None and tuple(noise.shape) != self.noise_shape(B):
                raise ValueError(f"noise must have shape {self.noise_shape(B)}, got {tuple(noise.shape)}")
            noise = self.make_noise(B, generator) if noise is None else noise.to(self.device, torch.float32)
            chunk = self.sample_warm(cond, guess, noise, int(steps))
            chunk = self.normalizer.unnormalize(self.action_key, chunk)
        return chunk.clone()

    def sample_warm(self, cond: torch.Tensor, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no warm-started sampler")

    @abstractmethod
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
        """Normalized chunk from the encoded condition and initial noise (no grad handling here)."""

    @abstractmethod
    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        """Change the default sampler and/or its number of steps (e.g. ``robolearn eval sampler.steps=K``)."""

    @property
    @abstractmethod
    def sampler_config(self) -> dict[str, Any]:
        """The current default sampler, e.g. ``{"kind": "ddim", "steps": 10}``."""

    # ------------------------------------------------------------------ training
    def compute_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Scalar training loss for a batch as :class:`~robolearn.data.SequenceDataset` yields it (raw units)."""
        if self.backbone_dtype != torch.float32:
            raise RuntimeError(f"the backbone was cast to {self.backbone_dtype} for inference; training needs "
                               "float32 (rebuild or reload the policy)")
        action = self._to_device(batch["action"]).float()
        if action.ndim != 3 or tuple(action.shape[1:]) != (self.horizon, self.action_dim):
            raise ValueError(
                f"batch['action'] must have shape (B, {self.horizon}, {self.action_dim}), got {tuple(action.shape)}"
            )
        cond = self.encode_obs(batch["obs"])
        return self.loss(cond, self.normalizer.normalize(self.action_key, action))

    @abstractmethod
    def loss(self, cond: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Training objective given the encoded condition and the normalized action chunk."""

    def extra_repr(self) -> str:
        return (f"type={self.policy_type}, horizon={self.horizon}, n_obs_steps={self.n_obs_steps}, "
                f"n_action_steps={self.n_action_steps}, action_dim={self.action_dim}, obs={self.obs_shapes}")
