"""Per-key affine normalization that a policy carries inside itself and saves with its weights.

Every mode is ``y = x * scale + offset`` with per-dimension ``scale`` and ``offset``, stored as buffers of a
``torch.nn.Module``: they move with ``.to(device)``, land in the policy's ``state_dict`` (so in its safetensors
file), and :meth:`to_dict` / :meth:`from_dict` give a JSON form for the checkpoint's statistics file.

Modes:

- ``minmax``: to [-1, 1]. A dimension whose range is (nearly) zero maps to 0 instead of dividing by zero.
- ``meanstd``: zero mean, unit variance; a (nearly) constant dimension is only centred.

A dimension that was constant in the data is *held*: unnormalizing gives back that constant whatever the
input, so a sampler's output in [-1, 1] on such an action dimension cannot turn into a real action the
demonstrations never took.
- ``image``: uint8 [0, 255] to [-1, 1], whatever the statistics say.
- ``identity``.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "meanstd", "image", "identity")
EPS = 1e-6


def _affine(
    mode: str, stats: Mapping[str, Any] | None, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, offset, hold): ``hold`` marks constant dimensions."""
    scale, offset = _scale_offset(mode, stats, shape)
    if mode in ("minmax", "meanstd"):
        assert stats is not None
        spread = (np.asarray(stats["max"], dtype=np.float64) - np.asarray(stats["min"], dtype=np.float64)
                  if mode == "minmax" else np.asarray(stats["std"], dtype=np.float64))
        return scale, offset, (spread < EPS).astype(np.float64)
    return scale, offset, np.zeros_like(np.asarray(scale))


def _scale_offset(mode: str, stats: Mapping[str, Any] | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    if mode == "identity":
        return np.ones(shape), np.zeros(shape)
    if mode == "image":
        return np.full(shape, 2.0 / 255.0), np.full(shape, -1.0)
    if stats is None:
        raise ValueError(f"mode {mode!r} needs statistics")
    if mode == "minmax":
        lo = np.asarray(stats["min"], dtype=np.float64)
        hi = np.asarray(stats["max"], dtype=np.float64)
        rng = hi - lo
        const = rng < EPS
        scale = np.where(const, 1.0, 2.0 / np.where(const, 1.0, rng))
        offset = np.where(const, -lo, -1.0 - lo * scale)  # constant dims: x - lo = 0
        return scale, offset
    if mode == "meanstd":
        mean = np.asarray(stats["mean"], dtype=np.float64)
        std = np.asarray(stats["std"], dtype=np.float64)
        const = std < EPS
        scale = np.where(const, 1.0, 1.0 / np.where(const, 1.0, std))
        return scale, -mean * scale
    raise ValueError(f"unknown normalization mode {mode!r}; choose one of {MODES}")


class Normalizer(nn.Module):
    """Normalizes a dict of tensors key by key; keys it does not know pass through unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: dict[str, str] = {}

    @classmethod
    def from_stats(
        cls, stats: Mapping[str, Mapping[str, Any]], modes: Mapping[str, str], default: str | None = None
    ) -> "Normalizer":
        """Fit from store statistics (:meth:`EpisodeStore.stats`). ``modes`` maps key to mode; ``default``
        applies to the other keys in ``stats`` (None leaves them out)."""
        norm = cls()
        for key in stats:
            mode = modes.get(key, default)
            if mode is not None:
                norm.add(key, mode, stats[key])
        for key in modes:
            if key not in stats:
                raise KeyError(f"no statistics for key {key!r}; statistics exist for: {', '.join(stats)}")
        return norm

    def add(self, key: str, mode: str, stats: Mapping[str, Any] | None = None, shape: tuple[int, ...] = ()) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown normalization mode {mode!r} for key {key!r}; choose one of {MODES}")
        if stats is not None and "min" in stats:
            shape = tuple(np.asarray(stats["min"]).shape)
        scale, offset, hold = _affine(mode, stats, shape)
        self._register(key, mode, scale, offset, hold)

    def _register(self, key: str, mode: str, scale: Any, offset: Any, hold: Any) -> None:
        self.modes[key] = mode
        for what, value in (("scale", scale), ("offset", offset), ("hold", hold)):
            self.register_buffer(self._name(key, what), torch.as_tensor(np.asarray(value), dtype=torch.float32))

    @staticmethod
    def _name(key: str, what: str) -> str:
        return f"{key.replace('.', '__')}__{what}"

    def params(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, self._name(key, "scale")), getattr(self, self._name(key, "offset"))

    def __contains__(self, key: str) -> bool:
        return key in self.modes

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key not in self.modes:
            return x
        scale, offset = self.params(key)
        x = x.to(scale.dtype) if not torch.is_floating_point(x) else x
        return x * scale + offset  # per-dimension (last axis); images per channel, channels last

    def unnormalize(self, key: str, y: torch.Tensor) -> torch.Tensor:
        if key not in self.modes:
            return y
        scale, offset = self.params(key)
        hold = getattr(self, self._name(key, "hold"))
        return (y * (1.0 - hold) - offset) / scale  # held dimensions: exactly the constant -offset/scale

    def normalize_dict(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.normalize(k, v) for k, v in batch.items()}

    def unnormalize_dict(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: self.unnormalize(k, v) for k, v in batch.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: mode, scale, offset and held (constant) dimensions per key."""
        out = {}
        for key, mode in self.modes.items():
            scale, offset = self.params(key)
            hold = getattr(self, self._name(key, "hold"))
            out[key] = {"mode": mode, "scale": scale.cpu().tolist(), "offset": offset.cpu().tolist(),
                        "hold": hold.cpu().tolist()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        norm = cls()
        for key, entry in d.items():
            try:
                mode, scale, offset = entry["mode"], entry["scale"], entry["offset"]
            except (KeyError, TypeError):
                raise ValueError(f"normalizer entry for key {key!r} needs 'mode', 'scale' and 'offset'") from None
            if mode not in MODES:
                raise ValueError(f"unknown normalization mode {mode!r} for key {key!r}")
            hold = entry.get("hold", np.zeros_like(np.asarray(scale, dtype=np.float64)).tolist())
            norm._register(key, mode, scale, offset, hold)
        return norm
