"""The episode store: episodes on zarr, in diffusion_policy's ReplayBuffer layout.

Layout::

    root/data/<key>          time-first arrays, all episodes concatenated
    root/meta/episode_ends   int64, cumulative: episode i is rows [ends[i-1], ends[i])
    root.attrs               robolearn schema, fps, task, env_config, version
    root/meta attrs          ``stats`` (cached statistics) and, when a writer gave any, ``episode_attrs``: one
                             JSON object per episode (who or what recorded it, when), index-aligned with
                             ``episode_ends``

Why it is safe to kill a writer: every zarr metadata and chunk write is atomic (zarr's LocalStore writes a
temporary file and renames it), data rows are written before ``episode_ends`` grows, and ``episode_ends`` is
created with fill value -1. So a writer killed at any moment leaves either orphan data rows past the last
committed end (ignored by readers, trimmed when the store is next opened for append) or a trailing -1 in
``episode_ends`` (an append whose end never landed: ignored and trimmed the same way). Per-episode attributes
are written before ``episode_ends`` grows too, so a killed writer can leave an entry past the last committed
episode: readers ignore it and the next append overwrites it.

One writer at a time: opening for append takes an exclusive ``flock`` on ``<root>/.robolearn.lock``; the
kernel releases it when the writer dies, however it dies. Readers take no lock and never block.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import zarr

from robolearn import __version__
from robolearn.data.schema import (
    KeySpec,
    Schema,
    StoreError,
    guess_role,
    schema_from_json,
    schema_mismatch,
    schema_to_json,
)

LOCK_NAME = ".robolearn.lock"
ENDS_CHUNK = 65536
CHUNK_BYTES = 2 * 1024 * 1024  # time chunks of low-dim keys: about 2 MB uncompressed (1-4 MB asked)
_COPY_BLOCK_BYTES = 64 * 1024 * 1024

# The lock file sits in the store root; zarr warns about unknown files when it lists the root.
warnings.filterwarnings("ignore", message=r"Object at \.robolearn\.lock is not recognized")


def time_chunk_len(spec: KeySpec) -> int:
    """Rows per chunk: one frame for images, about ``CHUNK_BYTES`` for everything else."""
    if spec.is_image:
        return 1
    return int(max(1, CHUNK_BYTES // max(1, spec.bytes_per_step)))


def _compressor(spec: KeySpec, zarr_format: int) -> Any:
    if zarr_format == 2:
        import numcodecs

        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle" if not spec.is_image else "noshuffle")


class _Welford:
    """Mergeable per-dimension count / mean / M2 / min / max (Chan et al.'s parallel update)."""

    @staticmethod
    def of(x: np.ndarray, axes: tuple[int, ...]) -> dict[str, np.ndarray]:
        x = x.astype(np.float64, copy=False)
        count = int(np.prod([x.shape[a] for a in axes])) if x.size else 0
        if count == 0:
            return {}
        mean = x.mean(axis=axes)
        m2 = ((x - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
        return {"count": np.float64(count), "mean": mean, "m2": m2, "min": x.min(axis=axes), "max": x.max(axis=axes)}

    @staticmethod
    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        if not a:
            return b
        if not b:
            return a
        na, nb = float(a["count"]), float(b["count"])
        n = na + nb
        delta = np.asarray(b["mean"]) - np.asarray(a["mean"])
        return {
            "count": n,
            "mean": np.asarray(a["mean"]) + delta * nb / n,
            "m2": np.asarray(a["m2"]) + np.asarray(b["m2"]) + delta**2 * na * nb / n,
            "min": np.minimum(a["min"], b["min"]),
            "max": np.maximum(a["max"], b["max"]),
        }


def _stat_axes(spec: KeySpec) -> tuple[int, ...]:
    # Images: one statistic per channel. Everything else: one per dimension, over time.
    return (0, 1, 2) if spec.is_image else (0,)


class EpisodeStore:
    """A zarr episode store. Use :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, path: Path, root: zarr.Group, writable: bool, lock_fd: int | None) -> None:
        self.path = path
        self._root = root
        self.writable = writable
        self._lock_fd = lock_fd
        self.schema: Schema = self._read_schema()
        self._ends = self._read_ends()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        schema: Mapping[str, KeySpec],
        *,
        fps: float | None = None,
        task: str | None = None,
        env_config: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        zarr_format: int = 3,
        overwrite: bool = False,
    ) -> "EpisodeStore":
        """Create an empty store opened for append. Refuses to overwrite unless ``overwrite=True``."""
        path = Path(path)
        if not schema:
            raise StoreError(f"cannot create {path}: the schema has no keys")
        root_attrs = {
            "robolearn": {"version": __version__, "schema": schema_to_json(schema)},
            "fps": fps,
            "task": task,
            "env_config": dict(env_config or {}),
            **dict(attrs or {}),
        }
        try:
            json.dumps(root_attrs)
        except TypeError as e:
            raise StoreError(f"cannot create {path}: its attributes are not JSON-serializable ({e})") from None
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise StoreError(f"cannot create {path}: it already exists (open it, or pass overwrite=True)")
            _remove_store(path)
        path.mkdir(parents=True)
        lock_fd = _acquire_lock(path)
        try:
            root = zarr.open_group(str(path), mode="a", zarr_format=zarr_format)  # "w" would delete the lock
            data = root.create_group("data")
            for key, spec in schema.items():
                n = time_chunk_len(spec)
                data.create_array(
                    key,
                    shape=(0, *spec.shape),
                    dtype=spec.dtype,
                    chunks=(n, *spec.shape),
                    compressors=_compressor(spec, zarr_format),
                    fill_value=0,
                )
            meta = root.create_group("meta")
            meta.create_array(
                "episode_ends", shape=(0,), dtype="int64", chunks=(ENDS_CHUNK,), fill_value=-1,
                compressors=_compressor(KeySpec((), "int64", "other"), zarr_format),
            )
            root.attrs.update(root_attrs)
        except BaseException:
            _release_lock(lock_fd)
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, root, writable=True, lock_fd=lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, validate: bool = True) -> "EpisodeStore":
        """Open a store: ``mode="r"`` to read (never blocks), ``"a"`` to append/drop (takes the writer lock).

        Stores written by diffusion_policy (zarr format 2, no robolearn schema) open too; their schema is
        inferred from the arrays and the key names.
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        path = Path(path)
        if not path.exists():
            backup = _backup_path(path)
            if backup.exists():
                raise StoreError(
                    f"no store at {path}, but {backup} exists: an interrupted drop left the original there; "
                    f"rename it back to {path.name}"
                )
            raise StoreError(f"no store at {path}")
        if not path.is_dir() or not ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
            raise StoreError(f"{path} is not a zarr store (no zarr.json or .zgroup in it)")
        lock_fd = _acquire_lock(path) if mode == "a" else None
        try:
            try:
                root = zarr.open_group(str(path), mode="r+" if mode == "a" else "r")
                for name in ("data", "meta"):
                    if name not in root:
                        raise StoreError(f"{path} has no '{name}' group: not an episode store")
                if "episode_ends" not in root["meta"]:
                    raise StoreError(f"{path} has no 'meta/episode_ends' array: not an episode store")
                store = cls(path, root, writable=mode == "a", lock_fd=lock_fd)
            except StoreError:
                raise
            except Exception as e:  # corrupt metadata JSON, unreadable chunks, ...
                raise StoreError(f"cannot read store {path}: {type(e).__name__}: {e}") from e
            if validate:
                # Opened to write (drop, append), a store with a NaN action must still open: dropping the bad
                # episode is how it gets fixed.
                store.validate(check_values=mode == "r")
            if mode == "a":
                store._trim_uncommitted()
        except BaseException:
            _release_lock(lock_fd)
            raise
        return store

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike, schema: Mapping[str, KeySpec], **create_kwargs: Any
    ) -> "EpisodeStore":
        """Open ``path`` for append if it exists (schemas must match), else create it: resumable collection."""
        path = Path(path)
        if not path.exists():
            return cls.create(path, schema, **create_kwargs)
        store = cls.open(path, mode="a")
        diff = schema_mismatch(store.schema, schema)
        fps = create_kwargs.get("fps")
        if diff is None and fps is not None and store.fps is not None and float(fps) != float(store.fps):
            diff = f"fps {store.fps} in the store vs {fps}"
        task = create_kwargs.get("task")
        if diff is None and task and store.task and task != store.task:
            diff = f"task {store.task!r} in the store vs {task!r}"
        env_config = create_kwargs.get("env_config")
        if diff is None and env_config is not None and store.is_robolearn and dict(env_config) != store.env_config:
            changed = sorted(k for k in set(env_config) | set(store.env_config)
                             if env_config.get(k) != store.env_config.get(k))
            diff = "environment config differs in " + ", ".join(
                f"{k} ({store.env_config.get(k)!r} in the store vs {env_config.get(k)!r})" for k in changed)
        if diff is not None:
            store.close()
            raise StoreError(f"cannot append to {path}: its schema differs from the new data ({diff})")
        return store

    def close(self) -> None:
        _release_lock(self._lock_fd)
        self._lock_fd = None
        self.writable = False

    def __enter__(self) -> "EpisodeStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close must not keep the lock for the process' lifetime
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ reading
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._root.attrs)

    @property
    def fps(self) -> float | None:
        return self._root.attrs.get("fps")

    @property
    def task(self) -> str | None:
        return self._root.attrs.get("task")

    @property
    def env_config(self) -> dict[str, Any]:
        return dict(self._root.attrs.get("env_config") or {})

    @property
    def zarr_format(self) -> int:
        return int(self._root.metadata.zarr_format)

    @property
    def is_robolearn(self) -> bool:
        """False for stores written by other tools (diffusion_policy), whose schema was inferred."""
        return "robolearn" in self._root.attrs

    @property
    def episode_ends(self) -> np.ndarray:
        return self._ends.copy()

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._ends, prepend=0)

    @property
    def keys(self) -> list[str]:
        return list(self.schema)

    def array(self, key: str) -> zarr.Array:
        """The raw zarr array behind ``key`` (it may hold orphan rows past :attr:`n_steps`)."""
        if key not in self.schema:
            raise KeyError(f"no key {key!r} in store {self.path}; keys: {', '.join(self.schema)}")
        return self._root["data"][key]

    def episode_slice(self, index: int) -> slice:
        n = self.n_episodes
        if not -n <= index < n:
            raise IndexError(f"episode {index} out of range: store {self.path} holds {n} episodes")
        index %= n
        start = int(self._ends[index - 1]) if index > 0 else 0
        return slice(start, int(self._ends[index]))

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(index)
        return {k: self.array(k)[sl] for k in (keys or self.schema)}

    def iter_episodes(self, keys: Iterable[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for i in range(self.n_episodes):
            yield self.get_episode(i, keys)

    def episode_attrs(self, index: int) -> dict[str, Any]:
        """What the writer said about episode ``index`` (``{}`` when it said nothing, as scripted collection)."""
        n = self.n_episodes
        if not -n <= index < n:
            raise IndexError(f"episode {index} out of range: store {self.path} holds {n} episodes")
        index %= n
        entries = self._raw_episode_attrs()
        return dict(entries[index] or {}) if index < len(entries) else {}

    def all_episode_attrs(self) -> list[dict[str, Any]]:
        """:meth:`episode_attrs` of every committed episode, in order."""
        entries = self._raw_episode_attrs()[: self.n_episodes]
        return [dict(e or {}) for e in entries] + [{} for _ in range(self.n_episodes - len(entries))]

    def load(self, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Committed rows of ``keys`` (default all) as numpy arrays in memory."""
        n = self.n_steps
        return {k: self.array(k)[:n] for k in (keys or self.schema)}

    def refresh(self) -> None:
        """Re-read ``episode_ends``: a reader sees episodes a concurrent writer committed since it opened."""
        self._ends = self._read_ends()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ------------------------------------------------------------------ writing
    def update_attrs(self, values: Mapping[str, Any]) -> None:
        """Set root attributes (JSON-able), e.g. a collector's resume state."""
        self._require_writable("set attributes of")
        self._root.attrs.update(dict(values))

    def append_episode(self, episode: Mapping[str, np.ndarray], attrs: Mapping[str, Any] | None = None) -> int:
        """Append one whole episode; it becomes visible only once all its rows are written. Returns its index.

        ``attrs`` (JSON-able) are kept with the episode: see :meth:`episode_attrs`.
        """
        return self.append_episodes([episode], None if attrs is None else [attrs])[0]

    def append_episodes(
        self, episodes: Sequence[Mapping[str, np.ndarray]], attrs: Sequence[Mapping[str, Any] | None] | None = None
    ) -> list[int]:
        """Append several episodes in one write per key (faster for many short episodes).

        ``attrs``: one JSON-able dict (or None) per episode, e.g. the device and time of a teleoperated episode.
        """
        self._require_writable("append")
        if not episodes:
            return []
        if attrs is not None:
            if len(attrs) != len(episodes):
                raise StoreError(f"cannot append to {self.path}: {len(episodes)} episodes but {len(attrs)} attrs")
            attrs = [dict(a or {}) for a in attrs]
            try:
                json.dumps(attrs)
            except (TypeError, ValueError) as e:
                raise StoreError(
                    f"cannot append to {self.path}: episode attrs are not JSON-serializable ({e})") from None
        checked = [self._check_episode(ep, i) for i, ep in enumerate(episodes)]
        lengths = [len(next(iter(ep.values()))) for ep in checked]
        n0, e0 = self.n_steps, self.n_episodes
        total = int(sum(lengths))
        new_stats: dict[str, Any] = {}
        for key, spec in self.schema.items():
            block = np.concatenate([ep[key] for ep in checked]) if len(checked) > 1 else checked[0][key]
            arr = self.array(key)
            arr.resize((n0 + total, *spec.shape))
            arr[n0 : n0 + total] = block
            new_stats[key] = _Welford.of(block, _stat_axes(spec))
        self._write_episode_attrs(e0, attrs, len(episodes))
        ends = self._ends_array()
        new_ends = n0 + np.cumsum(lengths, dtype=np.int64)
        ends.resize((e0 + len(episodes),))
        # The commit point: these episodes exist from here on. Written chunk by chunk, in order, so a crash
        # can only leave an unwritten tail (never a hole in the middle).
        chunk = int(ends.chunks[0])
        start = e0
        while start < e0 + len(episodes):
            stop = min(e0 + len(episodes), (start // chunk + 1) * chunk)
            ends[start:stop] = new_ends[start - e0 : stop - e0]
            start = stop
        self._ends = np.concatenate([self._ends, new_ends])
        self._merge_cached_stats(new_stats, previous_steps=n0)
        return list(range(e0, e0 + len(episodes)))

    def drop_episodes(self, indices: Iterable[int]) -> None:
        """Remove episodes. The store is rewritten beside itself and swapped in, so a crash keeps the original."""
        self._require_writable("drop episodes from")
        n = self.n_episodes
        drop = sorted(set(int(i) for i in indices))
        bad = [i for i in drop if not 0 <= i < n]
        if bad:
            raise StoreError(f"cannot drop episodes {bad} from {self.path}: it holds episodes 0..{n - 1}")
        if not drop:
            return
        keep = [i for i in range(n) if i not in set(drop)]
        tmp = self.path.with_name(f".{self.path.name}.drop-{uuid.uuid4().hex[:8]}")
        out = EpisodeStore.create(
            tmp, self.schema, fps=self.fps, task=self.task, env_config=self.env_config,
            attrs={k: v for k, v in self.attrs.items() if k not in ("robolearn", "fps", "task", "env_config")},
            zarr_format=self.zarr_format,
        )
        try:
            _copy_episodes(self, out, keep)
        except BaseException:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # Swap: the new directory carries its own (held) lock; the old one is released after.
        backup = _backup_path(self.path)
        if backup.exists():  # left by a drop killed while deleting the old copy: the swap had completed
            shutil.rmtree(backup)
        try:
            os.rename(self.path, backup)
        except BaseException:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, self.path)
        old_fd, self._lock_fd, out._lock_fd = self._lock_fd, out._lock_fd, None
        _release_lock(old_fd)
        self._root = zarr.open_group(str(self.path), mode="r+")
        self._ends = self._read_ends()
        shutil.rmtree(backup, ignore_errors=True)

    # ------------------------------------------------------------------ statistics
    def stats(self, refresh: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Per-key min, max, mean, std (per dimension; per channel for images) over all committed steps.

        Cached in ``meta`` attributes, updated on append, recomputed when stale (after a drop, a crash
        between commit and cache update, or a store written by another tool).
        """
        cached = self._root["meta"].attrs.get("stats")
        fresh = (
            not refresh
            and isinstance(cached, dict)
            and cached.get("n_steps") == self.n_steps
            and cached.get("n_episodes") == self.n_episodes
            and set(cached.get("keys", {})) == set(self.schema)
        )
        if fresh:
            raw = {k: {f: np.asarray(v) for f, v in d.items()} for k, d in cached["keys"].items()}
        else:
            raw = {key: self._scan_stats(key) for key in self.schema}
            if self.writable:
                self._write_stats(raw)
        return {k: _finish_stats(v) for k, v in raw.items()}

    def _scan_stats(self, key: str) -> dict[str, Any]:
        spec = self.schema[key]
        arr = self.array(key)
        step = max(1, _COPY_BLOCK_BYTES // max(1, spec.bytes_per_step))
        acc: dict[str, Any] = {}
        for start in range(0, self.n_steps, step):
            acc = _Welford.merge(acc, _Welford.of(arr[start : min(self.n_steps, start + step)], _stat_axes(spec)))
        return acc

    def _merge_cached_stats(self, new: dict[str, Any], previous_steps: int) -> None:
        cached = self._root["meta"].attrs.get("stats")
        if previous_steps == 0:
            base: dict[str, Any] = {k: {} for k in self.schema}
        elif isinstance(cached, dict) and cached.get("n_steps") == previous_steps:
            base = {k: {f: np.asarray(v) for f, v in d.items()} for k, d in cached["keys"].items()}
        else:
            return  # stale already: recomputed on the next stats() call
        self._write_stats({k: _Welford.merge(base.get(k, {}), new[k]) for k in self.schema})

    def _write_stats(self, raw: dict[str, dict[str, Any]]) -> None:
        self._root["meta"].attrs["stats"] = {
            "n_steps": self.n_steps,
            "n_episodes": self.n_episodes,
            "keys": {k: {f: np.asarray(v).tolist() for f, v in d.items()} for k, d in raw.items()},
        }

    # ------------------------------------------------------------------ validation
    def validate(self, check_values: bool = True) -> dict[str, Any]:
        """Check the store's structure (and, with ``check_values``, NaN/inf in actions and rewards).

        Raises :class:`StoreError` naming the key and episode at the first problem; returns a report.
        """
        p = self.path
        raw = self._ends_array()[:]
        committed = self._ends
        if raw.dtype.kind not in "iu":
            raise StoreError(f"{p}: meta/episode_ends has dtype {raw.dtype}, expected int64")
        if len(committed):
            if committed[0] <= 0:
                raise StoreError(f"{p}: episode 0 has length {committed[0]} (meta/episode_ends[0] must be > 0)")
            bad = np.nonzero(np.diff(committed) <= 0)[0]
            if len(bad):
                i = int(bad[0]) + 1
                raise StoreError(
                    f"{p}: meta/episode_ends is not increasing at episode {i} "
                    f"({int(committed[i - 1])} then {int(committed[i])})"
                )
        data_keys = set(self._root["data"].array_keys())
        for key in self.schema:
            if key not in data_keys:
                raise StoreError(f"{p}: schema key {key!r} has no array data/{key}")
        for key in sorted(data_keys - set(self.schema)):
            raise StoreError(f"{p}: array data/{key} is not in the store's schema")
        orphans: dict[str, int] = {}
        for key, spec in self.schema.items():
            arr = self.array(key)
            if tuple(arr.shape[1:]) != spec.shape or arr.dtype != np.dtype(spec.dtype):
                raise StoreError(
                    f"{p}: key {key!r} holds {arr.dtype}{tuple(arr.shape[1:])} per step, "
                    f"schema says {spec.dtype}{spec.shape}"
                )
            rows = int(arr.shape[0])
            if rows < self.n_steps:
                ep = int(np.searchsorted(committed, rows, side="right"))
                raise StoreError(
                    f"{p}: key {key!r} has {rows} rows but meta/episode_ends says {self.n_steps}: "
                    f"episode {ep} (rows {int(committed[ep - 1]) if ep else 0}..{int(committed[ep])}) "
                    f"is missing data"
                )
            if rows > self.n_steps:
                orphans[key] = rows - self.n_steps
        if check_values:
            for key, spec in self.schema.items():
                if spec.role not in ("action", "reward") or np.dtype(spec.dtype).kind != "f":
                    continue
                values = self.array(key)[: self.n_steps]
                if not len(values):  # an empty store (a scalar key's (0,) cannot reshape to (0, -1))
                    continue
                finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
                if not finite.all():
                    row = int(np.argmin(finite))
                    ep = int(np.searchsorted(committed, row, side="right"))
                    start = int(committed[ep - 1]) if ep else 0
                    raise StoreError(
                        f"{p}: key {key!r} has NaN or inf in episode {ep} (step {row - start})"
                    )
        return {
            "path": str(p),
            "episodes": self.n_episodes,
            "steps": self.n_steps,
            "uncommitted_rows": orphans,
            "uncommitted_episode_ends": int(len(raw) - len(committed)),
            "ok": True,
        }

    # ------------------------------------------------------------------ internals
    def _raw_episode_attrs(self) -> list[Any]:
        entries = self._root["meta"].attrs.get("episode_attrs")
        return list(entries) if isinstance(entries, list) else []

    def _write_episode_attrs(self, first: int, attrs: list[dict[str, Any]] | None, count: int) -> None:
        """Entries for episodes ``first..first+count-1``, written before they are committed (see module docstring).

        Stores that never got attrs keep no list at all (scripted collection pays nothing); once one episode has
        attrs, episodes appended without get ``{}``. An entry left past ``first`` by a killed or failed append
        is replaced here, never inherited by the new episode.
        """
        entries = self._raw_episode_attrs()
        if attrs is None and len(entries) <= first:
            return
        entries = entries[:first] + [{}] * max(0, first - len(entries))
        entries += attrs if attrs is not None else [{}] * count
        self._root["meta"].attrs["episode_attrs"] = entries

    def _ends_array(self) -> zarr.Array:
        return self._root["meta"]["episode_ends"]

    def _read_ends(self) -> np.ndarray:
        arr = self._ends_array()
        raw = np.asarray(arr[:], dtype=np.int64)
        # An end that was allocated but never written (writer killed between resize and write) reads as the fill
        # value: -1 in robolearn's stores, often 0 in others. A trailing run of such non-increasing entries is
        # an append that did not finish, not corruption.
        fill = arr.fill_value
        fill = -1 if fill is None else int(fill)
        n = len(raw)
        while n and raw[n - 1] == fill and (n == 1 or raw[n - 1] <= raw[n - 2]):
            n -= 1
        return raw[:n]

    def _read_schema(self) -> Schema:
        info = self._root.attrs.get("robolearn")
        if isinstance(info, dict) and "schema" in info:
            try:
                return schema_from_json(info["schema"])
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{self.path}: the schema in the root attributes is malformed ({e})") from None
        # A store written by another tool (diffusion_policy): infer per-step shape, dtype and role.
        out: Schema = {}
        for key in sorted(self._root["data"].array_keys()):
            arr = self._root["data"][key]
            out[key] = KeySpec(tuple(arr.shape[1:]), str(arr.dtype), guess_role(key))
        return out

    def _require_writable(self, what: str) -> None:
        if not self.writable:
            raise StoreError(f"cannot {what} {self.path}: it is open read-only (open it with mode='a')")

    def _check_episode(self, episode: Mapping[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        p = self.path
        missing = [k for k in self.schema if k not in episode]
        if missing:
            raise StoreError(f"cannot append to {p}: episode {index} lacks key(s) {missing}")
        extra = [k for k in episode if k not in self.schema]
        if extra:
            raise StoreError(
                f"cannot append to {p}: episode {index} has key(s) {extra} not in the schema "
                f"({', '.join(self.schema)})"
            )
        lengths = {k: len(np.asarray(episode[k])) if np.ndim(episode[k]) else 0 for k in self.schema}
        if len(set(lengths.values())) > 1:
            listing = ", ".join(f"{k} {n}" for k, n in lengths.items())
            raise StoreError(f"cannot append to {p}: keys disagree on the episode's length ({listing})")
        length = next(iter(lengths.values()))
        out: dict[str, np.ndarray] = {}
        for key, spec in self.schema.items():
            x = np.asarray(episode[key])
            if tuple(x.shape[1:]) != spec.shape:
                raise StoreError(
                    f"cannot append to {p}: key {key!r} has per-step shape {tuple(x.shape[1:])}, "
                    f"schema says {spec.shape}"
                )
            target = np.dtype(spec.dtype)
            if x.dtype != target and not np.can_cast(x.dtype, target, casting="same_kind"):
                raise StoreError(f"cannot append to {p}: key {key!r} is {x.dtype}, schema says {target}")
            x = x.astype(target, copy=False)
            if spec.role in ("action", "reward") and target.kind == "f" and not np.isfinite(x).all():
                row = int(np.argmin(np.isfinite(x.reshape(len(x), -1)).all(axis=1)))
                raise StoreError(f"cannot append to {p}: key {key!r} has NaN or inf at step {row} of the episode")
            out[key] = x
        if not length:
            raise StoreError(f"cannot append to {p}: episode {index} is empty")
        return out

    def _trim_uncommitted(self) -> None:
        """Drop what a killed writer left: orphan rows, a trailing uncommitted end, zarr's temporary files."""
        n = self.n_steps
        for key, spec in self.schema.items():
            arr = self.array(key)
            if arr.shape[0] > n:
                arr.resize((n, *spec.shape))
        ends = self._ends_array()
        if ends.shape[0] > len(self._ends):
            ends.resize((len(self._ends),))
        entries = self._raw_episode_attrs()
        if len(entries) > self.n_episodes:
            self._root["meta"].attrs["episode_attrs"] = entries[: self.n_episodes]
        for partial in self.path.rglob("*.partial"):
            partial.unlink(missing_ok=True)


def _finish_stats(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    if not raw:
        return {}
    count = float(raw["count"])
    return {
        "min": np.asarray(raw["min"], dtype=np.float64),
        "max": np.asarray(raw["max"], dtype=np.float64),
        "mean": np.asarray(raw["mean"], dtype=np.float64),
        "std": np.sqrt(np.asarray(raw["m2"], dtype=np.float64) / max(count, 1.0)),
        "count": np.asarray(count),
    }


def _remove_store(path: Path) -> None:
    """Delete an existing store for ``overwrite=True``: only a zarr store, and only if no writer holds it."""
    if path.is_symlink() or not path.is_dir() or not ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
        raise StoreError(f"cannot overwrite {path}: it is not an episode store (refusing to delete it)")
    fd = _acquire_lock(path)  # raises if a writer holds it
    _release_lock(fd)
    shutil.rmtree(path)


def _backup_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.drop-backup")


def _acquire_lock(path: Path) -> int:
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(
                f"{path} is already open for writing by {holder}; one writer at a time "
                f"(readers can still open it with mode='r')"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)


def _copy_episodes(src: EpisodeStore, dst: EpisodeStore, episodes: Sequence[int]) -> None:
    """Append ``episodes`` of ``src`` to ``dst`` in blocks of about 64 MB, keeping memory bounded."""
    bytes_per_step = max(1, sum(s.bytes_per_step for s in src.schema.values()))
    budget = max(1, _COPY_BLOCK_BYTES // bytes_per_step)
    batch: list[int] = []
    steps = 0
    lengths = src.episode_lengths
    src_attrs = src.all_episode_attrs() if src._raw_episode_attrs() else None
    for i in list(episodes) + [None]:  # type: ignore[list-item]
        if i is not None and (steps + lengths[i] <= budget or not batch):
            batch.append(i)
            steps += int(lengths[i])
            continue
        if batch:
            attrs = [src_attrs[j] for j in batch] if src_attrs is not None else None
            dst.append_episodes([src.get_episode(j) for j in batch], attrs)
        if i is None:
            break
        batch, steps = [i], int(lengths[i])


def merge_stores(
    sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, zarr_format: int = 3, overwrite: bool = False
) -> EpisodeStore:
    """Concatenate stores into a new one at ``out``. Schemas and fps must match."""
    if len(sources) < 1:
        raise StoreError("merge needs at least one source store")
    stores = [EpisodeStore.open(s) for s in sources]
    first = stores[0]
    for other in stores[1:]:
        diff = schema_mismatch(first.schema, other.schema)
        if diff:
            raise StoreError(f"cannot merge {first.path} and {other.path}: schemas differ ({diff})")
        if first.fps is not None and other.fps is not None and float(first.fps) != float(other.fps):
            raise StoreError(f"cannot merge {first.path} and {other.path}: fps {first.fps} vs {other.fps}")
        if first.task and other.task and first.task != other.task:
            raise StoreError(f"cannot merge {first.path} and {other.path}: task {first.task!r} vs {other.task!r}")
    outp = Path(out)
    for s in stores:
        src, dst_abs = s.path.resolve(), outp.resolve()
        if dst_abs == src or dst_abs in src.parents or src in dst_abs.parents:
            raise StoreError(f"cannot merge into {outp}: it is, contains or lies inside the source {s.path}")
    if outp.exists() and not overwrite:
        raise StoreError(f"cannot create {outp}: it already exists (pass overwrite=True to replace it)")
    # Written under a temporary name and renamed: a failed merge never leaves a store that looks complete.
    tmp = outp.with_name(f".{outp.name}.merge-{uuid.uuid4().hex[:8]}")
    dst = EpisodeStore.create(
        tmp, first.schema, fps=first.fps, task=first.task, env_config=first.env_config,
        attrs={"merged_from": [str(s.path) for s in stores]}, zarr_format=zarr_format,
    )
    try:
        for s in stores:
            _copy_episodes(s, dst, range(s.n_episodes))
    except BaseException:
        dst.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dst.close()
    if outp.exists():
        _remove_store(outp)
    os.rename(tmp, outp)
    return EpisodeStore.open(outp, mode="a")
