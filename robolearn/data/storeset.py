"""Several episode stores read as one: what ``robolearn train dataset=[a.zarr,b.zarr]`` trains on.

Why not merge first: a merge copies every row to disk; training on a clean store plus a noisy one, or on
yesterday's demonstrations plus today's, should not need a third copy. A :class:`StoreSet` opens each store read-only
and presents the reader side of :class:`~robolearn.data.store.EpisodeStore` that
:class:`~robolearn.data.sequence.SequenceDataset` and ``train`` use: the stores' episodes one after another
(episode ``i`` of the second store is episode ``n_a + i`` of the set), rows addressed the same way, statistics
over all of them. So episode indices, the validation split and windows work across all stores unchanged.

The stores must fit together exactly as :func:`~robolearn.data.store.merge_stores` demands (one check,
:func:`~robolearn.data.store.check_compatible`): same keys with the same shape, dtype and role, the same fps and
task. Their environment configs may differ (``env_config`` is the first store's: what training evaluates in).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from robolearn.data.schema import Schema, StoreError
from robolearn.data.store import EpisodeIndex, EpisodeStore, _finish_stats, _Welford, check_compatible


class StoreSet(EpisodeIndex):
    """Read-only union of several stores, in the order given. Use :func:`open_stores`."""

    def __init__(self, stores: Sequence[EpisodeStore]) -> None:
        if not stores:
            raise StoreError("a store set needs at least one store")
        check_compatible(stores, "train on")
        self.stores = list(stores)
        self.paths = [s.path for s in self.stores]
        self.schema: Schema = dict(self.stores[0].schema)
        steps = [s.n_steps for s in self.stores]
        self._row_offsets = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
        self._ends = np.concatenate(
            [s.episode_ends + off for s, off in zip(self.stores, self._row_offsets[:-1])]).astype(np.int64)
        self._episode_offsets = np.concatenate([[0], np.cumsum([s.n_episodes for s in self.stores])]).astype(np.int64)

    # ------------------------------------------------------------------ what a reader asks of a store
    @property
    def path(self) -> str:
        """For messages: the stores' paths joined by `` + `` (:attr:`paths` are the stores)."""
        return " + ".join(str(p) for p in self.paths)

    @property
    def task(self) -> str | None:
        return next((s.task for s in self.stores if s.task), None)

    @property
    def fps(self) -> float | None:
        return next((s.fps for s in self.stores if s.fps is not None), None)

    @property
    def env_config(self) -> dict[str, Any]:
        """The first store's: training evaluates in one environment (see :meth:`env_config_differences`)."""
        return self.stores[0].env_config

    def env_config_differences(self) -> dict[str, list[Any]]:
        """Environment settings on which the stores disagree -> each store's value, in store order."""
        configs = [s.env_config for s in self.stores]
        keys = sorted(set().union(*configs))
        return {k: [c.get(k) for c in configs] for k in keys if len({repr(c.get(k)) for c in configs}) > 1}

    @property
    def is_robolearn(self) -> bool:
        return all(s.is_robolearn for s in self.stores)

    @property
    def keys(self) -> list[str]:
        return list(self.schema)

    def locate(self, episode: int) -> tuple[EpisodeStore, int]:
        """The store that holds episode ``episode`` of the set, and its index there."""
        n = self.n_episodes
        if not -n <= episode < n:
            raise IndexError(f"episode {episode} out of range: {self.path} hold {n} episodes")
        episode %= n
        k = int(np.searchsorted(self._episode_offsets, episode, side="right")) - 1
        return self.stores[k], episode - int(self._episode_offsets[k])

    def episode_attrs(self, index: int) -> dict[str, Any]:
        store, local = self.locate(index)
        return store.episode_attrs(local)

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        store, local = self.locate(index)
        return store.get_episode(local, keys)

    def array(self, key: str) -> list[Any]:
        """Each store's zarr array behind ``key``, fetched once (pass it back to :meth:`read_rows`)."""
        return [s.array(key) for s in self.stores]

    def read_rows(self, key: str, start: int, stop: int, *, array: list[Any] | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the set (they may span stores), read through each store (damage is named)."""
        parts = []
        for k, s in enumerate(self.stores):
            lo, hi = int(self._row_offsets[k]), int(self._row_offsets[k + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                parts.append(s.read_rows(key, a - lo, b - lo, array=None if array is None else array[k]))
        if not parts:
            spec = self.schema[key]
            return np.zeros((0, *spec.shape), dtype=spec.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def load(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Committed rows of ``keys`` of every store, concatenated in memory."""
        keys = list(keys or self.schema)
        loaded = [s.load(keys) for s in self.stores]
        return {k: np.concatenate([d[k] for d in loaded]) for k in keys}

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Per-key statistics over every store's steps: each store's (cached) statistics combined exactly (Chan
        et al.'s parallel update), no data read when the caches are fresh."""
        members = [s for s in self.stores if s.n_steps]
        if not members:
            raise StoreError(f"{self.path} hold no episodes: there are no statistics to compute")
        out = {}
        for key in self.schema:
            acc: dict[str, Any] = {}
            for s in members:
                st = s.stats()[key]
                count = float(st["count"])
                raw = {"count": count, "mean": st["mean"], "m2": np.square(st["std"]) * count, "min": st["min"],
                       "max": st["max"]}
                acc = _Welford.merge(acc, raw)
            out[key] = _finish_stats(acc)
        return out

    def close(self) -> None:
        for s in self.stores:
            s.close()

    def __enter__(self) -> "StoreSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def store_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One path or several (a list, a tuple, an OmegaConf ListConfig) as a list of paths."""
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    return [Path(str(p)) for p in source]


def open_stores(source: str | os.PathLike | Sequence[str | os.PathLike]) -> EpisodeStore | StoreSet:
    """Open one store (an :class:`EpisodeStore`) or several (a :class:`StoreSet`, checked as ``data merge``
    checks its inputs) for reading. The same path twice is refused: its episodes would count twice."""
    paths = store_paths(source)
    if not paths:
        raise StoreError("no dataset given (a store path, or a list of them)")
    if len(paths) == 1:
        return EpisodeStore.open(paths[0])
    seen: dict[Path, Path] = {}
    for p in paths:
        real = Path(os.path.realpath(p))
        if real in seen:
            raise StoreError(f"{p} is given twice (as {seen[real]} and {p}): its episodes would count twice")
        seen[real] = p
    stores: list[EpisodeStore] = []
    try:
        for p in paths:
            stores.append(EpisodeStore.open(p))
        return StoreSet(stores)
    except BaseException:
        for s in stores:
            s.close()
        raise


def dataset_ref(store: EpisodeStore | StoreSet) -> str | list[str]:
    """What a run config records as its dataset: the path, or the list of paths of a set."""
    if isinstance(store, StoreSet):
        return [str(p) for p in store.paths]
    return str(store.path)
