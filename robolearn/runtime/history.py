"""Observation history: the last ``n_obs_steps`` frames per key, as the policy wants them ``(1, n, ...)``.

At the start of an episode (or after a reset) the history holds fewer frames than needed; it is padded by
repeating the oldest frame it has, which is how the training windows pad episode starts.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping, Sequence

import numpy as np
import torch


class ObsHistory:
    def __init__(self, keys: Sequence[str], n_obs_steps: int,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.keys = list(keys)
        self.n = int(n_obs_steps)
        self.shapes = {k: tuple(int(s) for s in v) for k, v in shapes.items()} if shapes else None
        self._frames: deque[dict[str, np.ndarray]] = deque(maxlen=self.n)

    def reset(self) -> None:
        self._frames.clear()

    def __len__(self) -> int:
        return len(self._frames)

    def check_frame(self, obs: Mapping[str, object]) -> dict[str, np.ndarray]:
        """The policy's keys of ``obs`` as arrays (copied), with clear errors for missing keys / wrong shapes."""
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing key(s) {missing}; the policy needs {self.keys}")
        frame = {}
        for k in self.keys:
            a = np.array(obs[k])  # copy: the caller may reuse its buffers, and wire arrays are read-only
            if a.dtype.kind not in "biuf":
                raise TypeError(f"observation {k!r} must be numeric, got dtype {a.dtype}")
            want = self.shapes.get(k) if self.shapes else None
            if want is None and self._frames:
                want = self._frames[-1][k].shape
            if want is not None and a.shape != tuple(want):
                raise ValueError(f"observation {k!r} must have shape {tuple(want)}, got {a.shape}")
            frame[k] = a
        return frame

    def push(self, obs: Mapping[str, object]) -> None:
        self._frames.append(self.check_frame(obs))

    def batch(self) -> dict[str, torch.Tensor]:
        """``{key: (1, n_obs_steps, ...)}`` tensors; padded at the front with the oldest frame."""
        if not self._frames:
            raise RuntimeError("observation history is empty: push an observation first")
        frames = list(self._frames)
        frames = [frames[0]] * (self.n - len(frames)) + frames
        return {k: torch.from_numpy(np.stack([f[k] for f in frames]))[None] for k in self.keys}

    def state(self) -> list[dict[str, np.ndarray]]:
        return list(self._frames)

    def restore(self, frames: list[dict[str, np.ndarray]]) -> None:
        self._frames = deque(frames, maxlen=self.n)
