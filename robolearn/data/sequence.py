"""Sequence windows over an episode store: what a chunk policy trains on.

A window is ``horizon`` consecutive steps of one episode; the policy sees the first ``n_obs_steps``
observations and predicts all ``horizon`` actions. Windows may start ``pad_before = n_obs_steps - 1`` steps
before an episode and end ``pad_after = n_action_steps - 1`` steps after it; the missing steps repeat the
episode's edge frame (so the first observation history of an episode is its first frame, repeated). A window
never mixes two episodes.

Data is read into memory first by default: slicing zarr for every window costs about 1.7 ms here, gathering
rows from numpy a few microseconds for a whole batch. ``in_memory=False`` streams from zarr for stores
larger than memory.

Several stores (a list of paths, or a :class:`~robolearn.data.storeset.StoreSet`) are read as one: their episodes
one after another, checked to fit together as ``data merge`` checks them, so windows, episode indices and the
validation split run across all of them.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from robolearn.data.schema import StoreError
from robolearn.data.store import EpisodeStore
from robolearn.data.storeset import StoreSet, open_stores


def split_episodes(n_episodes: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split episode indices into train and validation, by whole episodes, reproducibly from ``seed``.

    With ``val_ratio > 0`` and at least two episodes, validation gets at least one episode and training
    keeps at least one.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0 and n_episodes >= 2:
        n_val = min(max(n_val, 1), n_episodes - 1)
    perm = np.random.default_rng(seed).permutation(n_episodes)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class WindowIndex:
    """Every valid window start of the chosen episodes, and the rows each window reads.

    Stored as three flat int64 arrays (episode start row, episode length, window offset ``t0`` within the
    episode, which may be negative or run past the end: those steps are clamped to the edge frame).
    """

    def __init__(
        self,
        episode_ends: np.ndarray,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
        episodes: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if pad_before < 0 or pad_after < 0:
            raise ValueError(f"padding must be >= 0, got pad_before={pad_before}, pad_after={pad_after}")
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        chosen = np.arange(len(ends)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        self.horizon = horizon
        ep_start, ep_len, t0 = [], [], []
        for e in chosen:
            length = int(ends[e] - starts[e])
            first = -pad_before
            last = max(first, length - horizon + pad_after)  # a short episode still yields one window
            offsets = np.arange(first, last + 1, dtype=np.int64)
            t0.append(offsets)
            ep_start.append(np.full(len(offsets), starts[e], dtype=np.int64))
            ep_len.append(np.full(len(offsets), length, dtype=np.int64))
        empty = np.zeros(0, dtype=np.int64)
        self.ep_start = np.concatenate(ep_start) if ep_start else empty
        self.ep_len = np.concatenate(ep_len) if ep_len else empty
        self.t0 = np.concatenate(t0) if t0 else empty
        self._steps = np.arange(horizon, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.t0)

    def rows(self, index: np.ndarray | int, length: int | None = None) -> np.ndarray:
        """Global store rows of windows ``index``: shape ``(B, length)`` (``length`` defaults to horizon)."""
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        steps = self._steps if length is None else np.arange(length, dtype=np.int64)
        local = np.clip(self.t0[idx, None] + steps[None, :], 0, self.ep_len[idx, None] - 1)
        return self.ep_start[idx, None] + local


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of an episode store as dict batches: ``{"obs": {key: (B, n_obs_steps, ...)}, "action": (B, horizon, A)}``.

    ``step_weights`` (one per store row, >= 0): batches also carry ``"weight"`` (B, horizon), each predicted
    action's weight in the loss (episode weights from an audit, ``training.intervention_weight``).

    ``__getitem__`` serves torch's DataLoader one window at a time; :meth:`batches` and :meth:`get_batch`
    gather a whole batch in one numpy indexing call per key, which is what training should use.
    """

    def __init__(
        self,
        source: str | os.PathLike | EpisodeStore | StoreSet | Sequence[str | os.PathLike],
        *,
        horizon: int,
        n_obs_steps: int = 1,
        n_action_steps: int = 1,
        obs_keys: Sequence[str] | None = None,
        action_key: str = "action",
        extra_keys: Sequence[str] = (),
        split: str = "train",
        val_ratio: float = 0.0,
        seed: int = 0,
        in_memory: bool = True,
        max_episodes: int | None = None,
        step_weights: np.ndarray | None = None,
        _shared: Mapping[str, Any] | None = None,
    ) -> None:
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps must be in [1, horizon={horizon}], got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon:
            raise ValueError(f"n_action_steps must be in [1, horizon={horizon}], got {n_action_steps}")
        store = source if isinstance(source, (EpisodeStore, StoreSet)) else open_stores(source)
        self.store = store
        schema = store.schema
        if obs_keys is None:
            obs_keys = [k for k, s in schema.items() if s.role == "obs"]
        for key in [*obs_keys, action_key, *extra_keys]:
            if key not in schema:
                raise StoreError(
                    f"store {store.path} has no key {key!r}; it has: "
                    + ", ".join(f"{k} ({s.role})" for k, s in schema.items())
                )
        if store.n_episodes == 0:
            raise StoreError(f"store {store.path} holds no episodes")
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.obs_keys, self.action_key, self.extra_keys = list(obs_keys), action_key, list(extra_keys)
        self.in_memory = in_memory
        if step_weights is not None:
            step_weights = np.asarray(step_weights, dtype=np.float32).reshape(-1)
            if len(step_weights) != store.n_steps:
                raise ValueError(f"step_weights has {len(step_weights)} entries; store {store.path} has "
                                 f"{store.n_steps} steps")
            if not np.isfinite(step_weights).all() or (step_weights < 0).any():
                raise ValueError("step_weights must be finite and >= 0")
        self.step_weights = step_weights
        self._kw = dict(
            horizon=horizon, n_obs_steps=n_obs_steps, n_action_steps=n_action_steps, obs_keys=obs_keys,
            action_key=action_key, extra_keys=extra_keys, val_ratio=val_ratio, seed=seed, in_memory=in_memory,
            max_episodes=max_episodes, step_weights=step_weights,
        )
        n_eps = store.n_episodes if max_episodes is None else min(store.n_episodes, max_episodes)
        train, val = split_episodes(n_eps, val_ratio, seed)
        self.episodes = {"train": train, "val": val, "all": np.arange(n_eps)}[split]
        keys = [*self.obs_keys, action_key, *self.extra_keys]
        if _shared is not None:
            self._data = _shared
        elif in_memory:
            self._data = store.load(keys)
        else:
            self._data = {k: store.array(k) for k in keys}
        self.index = WindowIndex(
            store.episode_ends, horizon, pad_before=n_obs_steps - 1, pad_after=n_action_steps - 1,
            episodes=self.episodes,
        )

    def split(self, split: str) -> "SequenceDataset":
        """The same store, window settings and data in memory, for another split."""
        return SequenceDataset(self.store, split=split, _shared=self._data, **self._kw)

    def __len__(self) -> int:
        return len(self.index)

    def _gather(self, key: str, rows: np.ndarray) -> np.ndarray:
        src = self._data[key]
        if isinstance(src, np.ndarray):
            return src[rows]
        # Streaming: each window's rows are one contiguous slice, edges repeated after reading (read through the
        # store, so a missing or damaged chunk file is a StoreError naming it, never zeros or a codec error).
        out = []
        for r in rows:
            lo, hi = int(r.min()), int(r.max()) + 1
            out.append(np.asarray(self.store.read_rows(key, lo, hi, array=src))[r - lo])
        return np.stack(out)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, Any]:
        """Windows ``indices`` as numpy arrays, batch first."""
        idx = np.asarray(indices, dtype=np.int64)
        rows_obs = self.index.rows(idx, self.n_obs_steps)
        rows_act = self.index.rows(idx)
        batch: dict[str, Any] = {"obs": {k: self._gather(k, rows_obs) for k in self.obs_keys}}
        batch["action"] = self._gather(self.action_key, rows_act)
        for k in self.extra_keys:
            batch[k] = self._gather(k, rows_act)
        if self.step_weights is not None:  # (B, horizon): each predicted action's weight in the loss
            batch["weight"] = self.step_weights[rows_act]
        return batch

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range ({len(self)} windows)")
        b = self.get_batch([i % len(self)])
        return _to_torch(b, squeeze=True)

    def batches(
        self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = True, epochs: int | None = 1
    ) -> Iterator[dict[str, Any]]:
        """Torch batches; ``epochs=None`` repeats forever (training counts steps, not epochs)."""
        rng = np.random.default_rng(seed)
        n = len(self)
        if n == 0:
            return
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(n) if shuffle else np.arange(n)
            stop = n - batch_size + 1 if drop_last and n >= batch_size else n
            for s in range(0, stop, batch_size):
                yield _to_torch(self.get_batch(order[s : s + batch_size]))
            epoch += 1

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-key statistics of the whole store, or of all stores of a set (cached in each store's meta)."""
        return self.store.stats()


def _to_torch(batch: Mapping[str, Any], squeeze: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, Mapping):
            out[k] = _to_torch(v, squeeze)
        else:
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t[0] if squeeze else t
    return out
