"""Wrappers: a registered policy kind that runs a trained base policy without editing it.

Fine-tuning (a residual corrector, a noise-steering actor) and acceleration (block caching) each wrap a trained
chunk policy. A wrapper is a chunk policy itself -- same geometry, same ``predict_action(obs_history, noise)`` --
so it works everywhere a policy does (evaluation, the runner, the server, teleop), and its checkpoint holds only
its own weights plus the base checkpoint's relative path and content hash (see :mod:`.checkpoint`).

Subclass :class:`PolicyWrapper`, register it, and override what the wrapper changes::

    @register_policy("offset")
    class OffsetPolicy(PolicyWrapper):
        def __init__(self, base, scale=1.0):
            super().__init__(base)
            self.offset = nn.Parameter(torch.zeros(base.action_dim))
            self.scale = scale

        def wrapper_config(self):
            return {"scale": self.scale}

        def predict_action(self, obs_history, noise=None, **kw):
            return self.base.predict_action(obs_history, noise, **kw) + self.scale * self.offset
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import nn


class PolicyWrapper(nn.Module):
    """A chunk policy around ``base`` (frozen: its parameters stop requiring gradients)."""

    policy_type: ClassVar[str] = "abstract_wrapper"
    wraps_base: ClassVar[bool] = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.checkpoint_path: str | None = None
        self.checkpoint_stamp: list[tuple[str, int, int]] | None = None  # see checkpoint._stamp

    # ------------------------------------------------------------------ the base's geometry
    @property
    def horizon(self) -> int:
        return int(self.base.horizon)

    @property
    def n_obs_steps(self) -> int:
        return int(self.base.n_obs_steps)

    @property
    def n_action_steps(self) -> int:
        return int(self.base.n_action_steps)

    @property
    def action_dim(self) -> int:
        return int(self.base.action_dim)

    @property
    def obs_keys(self) -> list[str]:
        return list(self.base.obs_keys)

    @property
    def obs_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.base.obs_shapes)

    @property
    def action_key(self) -> str:
        return str(self.base.action_key)

    @property
    def normalizer(self) -> Any:
        return self.base.normalizer

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def sampler_config(self) -> dict[str, Any]:
        return dict(self.base.sampler_config)

    def set_sampler(self, kind: str | None = None, steps: int | None = None) -> None:
        self.base.set_sampler(kind, steps)

    def noise_shape(self, batch_size: int) -> tuple[int, int, int]:
        return self.base.noise_shape(batch_size)

    def reset(self) -> None:
        self.base.reset()

    # ------------------------------------------------------------------ inference (override what changes)
    def predict_action(self, obs_history: Mapping[str, Any], noise: torch.Tensor | None = None,
                       **kwargs: Any) -> torch.Tensor:
        return self.base.predict_action(obs_history, noise, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def wrapper_config(self) -> dict[str, Any]:
        """The wrapper's own settings (JSON-able): what ``from_checkpoint`` passes back to ``__init__``."""
        return {}

    def checkpoint_config(self) -> dict[str, Any]:
        return {"type": self.policy_type, **self.wrapper_config()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise KeyError(f"missing keys {missing[:5]}, unexpected keys {list(unexpected)[:5]}")

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any], *, normalizer: Any = None, base: Any = None
                        ) -> "PolicyWrapper":
        settings = {k: v for k, v in config.items() if k != "type"}
        return cls(base, **settings)

    def extra_repr(self) -> str:
        return f"type={self.policy_type}"
