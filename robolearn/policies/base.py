"""The chunk-policy contract every consumer (training, evaluation, RL wrappers, caching, the runner) relies on.

A chunk policy maps an observation history ``{key: (B, n_obs_steps, ...)}`` to an action chunk
``(B, horizon, action_dim)`` in the environment's (unnormalized) units. Normalization lives inside the policy
(``policy.normalizer``, a buffer-holding module saved with the weights), so callers always speak raw units.

Determinism: given the initial noise ``noise`` (shape :meth:`ChunkPolicy.noise_shape`, standard normal, in the
*normalized* action space) the chunk is a deterministic function of the observation and the noise, for every
sampler. DDIM (eta 0) and the flow ODE are smooth functions of the noise -- what latent-noise steering (DSRL,
Wagenmaker et al. 2025) needs. DDPM draws fresh noise at every step; given ``noise`` it draws each row's from a
generator seeded by that row's noise (and ``ddpm_seed``), so it is repeatable and independent of the rest of the
batch, but not smooth in the noise.

The one denoising loop (:meth:`ChunkPolicy.denoise`): every sampler -- DDPM/DDIM, Euler/midpoint, and the warm
starts -- is a small generator that yields ``(x, t)`` for each backbone call it wants and receives the backbone's
output. The loop makes the calls, and tells each one where it is: ``backbone(x, t, cond, step=DenoiseStep(...))``
with the call's index within the run and the run's length (a midpoint step is two calls). Plain backbones ignore
``step``; a caching wrapper (BAC) decides from it what to recompute.

Executable part: following Diffusion Policy (Chi et al. 2023, Sec. 3.1 "closed-loop action-sequence
prediction"), the chunk's step ``n_obs_steps - 1`` is aligned with the latest observation; the first
``n_obs_steps - 1`` steps are the (already executed) past, and the robot executes ``n_action_steps`` actions
from the current step (:func:`robolearn.policies.executor.executable`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generator, Mapping

import numpy as np
import torch
from torch import nn

from robolearn.data.normalizer import Normalizer
from robolearn.policies.config import ChunkPolicyConfig, check_geometry


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of (B, horizon, A) chunks. With ``weight`` (B, horizon): each predicted action's error
    (averaged over action dimensions) weighs ``weight[b, t]``, and the sum is divided by the weights' sum, so
    uniform weights give the plain mean whatever their size, and a zero weight takes an action out of the loss
    (a batch whose weights are all zero gives a zero loss with zero gradients)."""
    err = (pred - target) ** 2
    if weight is None:
        return err.mean()
    per_action = err.mean(dim=-1)
    return (per_action * weight).sum() / weight.sum().clamp_min(1e-12)

#: A sampler: yields ``(x, t)`` per backbone call (t a 0-d tensor, the backbone's timestep), receives the
#: backbone's float32 output, returns the final normalized chunk.
Solver = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DenoiseStep:
    """Where one backbone call sits in a sampling run.

    ``index`` counts backbone calls from 0 to ``total - 1`` within this run. A warm start runs only the tail of
    its sampler's schedule: ``offset`` is the number of calls it skipped, so ``offset + index`` is the call's
    position in the full schedule of ``offset + total`` calls. ``sampler`` names the schedule ("ddim-10",
    "midpoint-4"): a per-step cache calibrated for one schedule can refuse another.
    """

    index: int
    total: int
    sampler: str
    offset: int = 0

    @property
    def schedule_index(self) -> int:
        return self.offset + self.index


class ChunkPolicy(nn.Module, ABC):
    """Abstract chunk policy: an observation encoder, a denoiser backbone and a normalizer.

    Subclasses implement :meth:`solver` (the sampler as a generator), :meth:`warm_solver`, :meth:`loss`, and
    set ``config_class``. ``cfg`` is the typed config (:mod:`robolearn.policies.config`); ``config`` its plain
    dict with the current sampler (what checkpoints save).
    """

    policy_type: ClassVar[str] = "abstract"
    config_class: ClassVar[type[ChunkPolicyConfig]] = ChunkPolicyConfig
    #: samplers that draw fresh noise at every step (not smooth functions of the initial noise)
    stochastic_samplers: ClassVar[tuple[str, ...]] = ()
    wraps_base: ClassVar[bool] = False

    def __init__(self, cfg: ChunkPolicyConfig, *, obs_encoder: nn.Module, backbone: nn.Module,
                 normalizer: Normalizer) -> None:
        super().__init__()
        check_geometry(cfg.horizon, cfg.n_obs_steps, cfg.n_action_steps)
        self.cfg = cfg
        self.obs_encoder = obs_encoder
        self.backbone = backbone
        self.normalizer = normalizer
        self.horizon, self.n_obs_steps = int(cfg.horizon), int(cfg.n_obs_steps)
        self.n_action_steps = int(cfg.n_action_steps)
        self.action_dim = int(cfg.action_dim)  # type: ignore[arg-type]
        self.obs_shapes = {k: tuple(int(s) for s in v) for k, v in cfg.obs.items()}
        self.action_key = cfg.action_key
        self.checkpoint_path: str | None = None  # the folder it was loaded from (wrappers name it as their base)
        self.checkpoint_stamp: list[tuple[str, int, int]] | None = None  # see checkpoint._stamp

    @property
    def config(self) -> dict[str, Any]:
        """The fully explicit plain config, current sampler included (what checkpoints save)."""
        return self.cfg.to_dict()

    # ------------------------------------------------------------------ checkpoints (see .registry)
    def checkpoint_config(self) -> dict[str, Any]:
        return self.config

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(state), strict=True)

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any], *, normalizer: Normalizer | None = None, base: Any = None
                        ) -> "ChunkPolicy":
        from robolearn.policies.factory import make_policy

        return make_policy(config, normalizer=normalizer)

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
        from robolearn.policies.executor import executable

        return executable(chunk, self.n_obs_steps, self.n_action_steps)

    def reset(self) -> None:
        """Start of an episode. The policies here keep no per-episode state (observation history and the
        action queue belong to the executor), so this does nothing; stateful wrappers override it."""

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

    # ------------------------------------------------------------------ the denoising loop
    @property
    def backbone_dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            return p.dtype
        return torch.float32

    def _prepare(self, cond: torch.Tensor) -> Any:
        """The backbone's per-chunk precomputation, in the backbone's dtype."""
        return self.backbone.prepare(cond.to(self.backbone_dtype))

    def denoise(self, prepared: Any, solver: Solver, *, total: int, sampler: str, offset: int = 0,
                denoiser: Any = None) -> torch.Tensor:
        """Run ``solver`` to the end, making each backbone call it asks for (see the module docstring).

        The backbone sees the noisy chunk in its own dtype (a bf16 backbone for inference) and its output comes
        back as float32, so sampler arithmetic stays float32. ``denoiser``: called in place of ``self.backbone``
        with the same arguments (a block-caching wrapper around it, :mod:`robolearn.accel.cache`).
        """
        dtype = self.backbone_dtype
        backbone = self.backbone if denoiser is None else denoiser
        request = next(solver)
        index = 0
        while True:
            x, t = request
            step = DenoiseStep(index, total, sampler, offset)
            out = backbone(x.to(dtype), t.expand(x.shape[0]), prepared, step=step).float()
            index += 1
            try:
                request = solver.send(out)
            except StopIteration as finished:
                if index != total:
                    raise RuntimeError(f"{type(self).__name__}'s {sampler} sampler made {index} backbone calls, "
                                       f"announced {total}") from None
                return finished.value

    @abstractmethod
    def solver(self, noise: torch.Tensor, kind: str, steps: int, generator: Any) -> tuple[Solver, int]:
        """The sampler ``kind`` with ``steps`` steps from the initial noise: the generator and its call count."""

    @abstractmethod
    def warm_solver(self, guess: torch.Tensor, noise: torch.Tensor, steps: int) -> tuple[Solver, int, int, str]:
        """The last ``steps`` steps of the configured schedule, started from ``guess`` (normalized) noised with
        ``noise``: the generator, its call count, the calls it skips, and the schedule's name (RTI-DP's warm
        start)."""

    # ------------------------------------------------------------------ sampler selection
    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        """Change the default sampler and/or its number of steps (``robolearn eval sampler.steps=K``); a bad name
        or count raises :class:`~robolearn.policies.config.ConfigError` naming it."""
        kind = self.cfg.sampler.kind if kind is None else kind
        steps = self.cfg.sampler.steps if steps is None else int(steps)
        self.cfg.check_sampler(kind, steps)
        self.cfg.sampler.kind, self.cfg.sampler.steps = kind, steps

    @property
    def sampler_config(self) -> dict[str, Any]:
        """The current default sampler, e.g. ``{"kind": "ddim", "steps": 10}``."""
        return {"kind": self.cfg.sampler.kind, "steps": self.cfg.sampler.steps}

    # ------------------------------------------------------------------ inference
    def _check_noise(self, noise: torch.Tensor | None, B: int, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, bool]:
        if noise is None:
            return self.make_noise(B, generator), False
        if tuple(noise.shape) != self.noise_shape(B):
            raise ValueError(f"noise must have shape {self.noise_shape(B)}, got {tuple(noise.shape)}")
        return noise.to(self.device, torch.float32), True

    def predict_action(
        self,
        obs_history: Mapping[str, Any],
        noise: torch.Tensor | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        denoiser: Any = None,
    ) -> torch.Tensor:
        """Sample an action chunk (B, horizon, action_dim) in raw action units.

        ``noise``: initial noise of shape :meth:`noise_shape` (normalized space); drawn (from ``generator``
        if given) when None. ``sampler``/``steps`` override the configured sampler for this call only.
        ``denoiser``: what the denoising loop calls in place of the backbone (:meth:`denoise`).
        Runs under ``torch.inference_mode``. Call ``policy.eval()`` before rolling out: in training mode
        the image encoder random-crops, which makes the chunk depend on more than the noise.
        """
        kind = self.cfg.sampler.kind if sampler is None else sampler
        n = self.cfg.sampler.steps if steps is None else int(steps)
        self.cfg.check_sampler(kind, n)
        with torch.inference_mode():
            cond = self.encode_obs(obs_history)
            noise, given = self._check_noise(noise, cond.shape[0], generator)
            if generator is None and given and kind in self.stochastic_samplers:
                generator = self.noise_generator(noise)
            solver, total = self.solver(noise, kind, n, generator)
            chunk = self.denoise(self._prepare(cond), solver, total=total, sampler=f"{kind}-{n}", denoiser=denoiser)
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
        denoiser: Any = None,
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
            noise, _ = self._check_noise(noise, B, generator)
            solver, total, offset, name = self.warm_solver(guess, noise, int(steps))
            chunk = self.denoise(self._prepare(cond), solver, total=total, sampler=name, offset=offset,
                                 denoiser=denoiser)
            chunk = self.normalizer.unnormalize(self.action_key, chunk)
        return chunk.clone()

    def noise_generator(self, noise: torch.Tensor, salt: int = 0) -> list[torch.Generator]:
        """One CPU generator per batch row, seeded by that row's initial noise (and ``salt``): what a stochastic
        sampler (DDPM) draws its per-step noise from when the initial noise is given, so that each chunk is a
        function of its own noise alone, whatever else shares the batch."""
        rows = noise.detach().to("cpu", torch.float32).contiguous().reshape(noise.shape[0], -1).numpy()
        gens = []
        for row in rows:
            words = np.frombuffer(row.tobytes(), np.uint32).tolist()
            seed = np.random.SeedSequence([int(salt) % 2**32, *words]).generate_state(1, np.uint64)[0]
            gens.append(torch.Generator().manual_seed(int(seed)))
        return gens

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
        weight = batch.get("weight")
        if weight is not None:
            weight = self._to_device(weight).float()
            if tuple(weight.shape) != tuple(action.shape[:2]):
                raise ValueError(f"batch['weight'] must have shape {tuple(action.shape[:2])} (B, horizon), "
                                 f"got {tuple(weight.shape)}")
        return self.loss(cond, self.normalizer.normalize(self.action_key, action), weight)

    @abstractmethod
    def loss(self, cond: torch.Tensor, action: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Training objective given the encoded condition and the normalized action chunk; ``weight`` (B, horizon)
        weighs each predicted action (:func:`weighted_mse`)."""

    def extra_repr(self) -> str:
        return (f"type={self.policy_type}, horizon={self.horizon}, n_obs_steps={self.n_obs_steps}, "
                f"n_action_steps={self.n_action_steps}, action_dim={self.action_dim}, obs={self.obs_shapes}")
