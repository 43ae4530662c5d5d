"""The episode store: episodes on zarr, in diffusion_policy's ReplayBuffer layout.

Layout::

    root/data/<key>          time-first arrays, all episodes concatenated
    root/meta/episode_ends   int64, cumulative: episode i is rows [ends[i-1], ends[i])
    root.attrs               robolearn schema, fps, task, env_config, version
    root/meta attrs          ``stats`` (cached statistics) and, when a writer gave any, ``episode_attrs``: one
                             JSON object per episode (who or what recorded it, when), index-aligned with
                             ``episode_ends``
    root.attrs["source"]     how the episodes were made: once an episode records its own ``source``, a summary
                             kept true on every append ("mixed" when they differ; :mod:`robolearn.data.provenance`)

Why it is safe to kill a writer: every zarr metadata and chunk write is atomic (zarr's LocalStore writes a
temporary file and renames it; camera frames, one file each, are written in place, always past the committed
rows, where a torn file is an orphan row like any other), data rows are written before ``episode_ends`` grows,
and ``episode_ends`` is created with fill value -1. So a writer killed at any moment leaves either orphan data rows past the last
committed end (ignored by readers, trimmed when the store is next opened for append) or a trailing -1 in
``episode_ends`` (an append whose end never landed: ignored and trimmed the same way). Per-episode attributes
are written before ``episode_ends`` grows too, so a killed writer can leave an entry past the last committed
episode: readers ignore it and the next append overwrites it.

Every chunk is written, even one that holds only the fill value (zarr 3 would skip it), so a chunk file that
should exist and does not is damage, never "zeros": given an array's chunk grid and the committed row count,
validation knows which files must exist (``<array>/c/<i>/<j>`` in zarr 3, ``<array>/<i>.<j>`` in zarr 2) and
names the one that is missing; reading one that is missing or does not decode is a :class:`StoreError` naming
the file. (A store not written by this robolearn -- no ``every_chunk`` mark in its root attributes: an older
robolearn's, diffusion_policy's -- may lack data chunks that held only zeros: there, absent data chunks still read
as zeros, and only ``episode_ends`` is checked. Dropping or merging such a store writes a new, marked one.) Zarr-3 stores also keep a crc32c checksum with every chunk, so a truncated, garbage or
bit-flipped chunk fails to decode instead of reading as wrong numbers; zarr-2 stores have none, and
``validate(read_all=True)`` (``robolearn data validate``) compares each blosc chunk's length with its header.
The one legitimate hole: an append that grows ``episode_ends`` into a chunk that does not exist yet
(the first append to a store, then every 65,536 episodes) records ``growing_ends`` (from, to) in the meta
attributes first and clears it after the commit, so an ends chunk missing past ``from`` is provably an append
that did not finish. Any other missing ends chunk means the episode boundaries are lost: the store is neither
read nor trimmed nor written until the file is restored. Trimming removes only rows past the last committed end
of an intact ``episode_ends``.

One writer at a time: opening for append takes an exclusive ``flock`` on ``<root>/.robolearn.lock``; the
kernel releases it when the writer dies, however it dies. Readers take no lock and never block.

Drop and merge never modify a store in place. Beside a store ``NAME`` they use, in this order:

1. ``.NAME.drop-<hex>`` / ``.NAME.merge-<hex>``: the new store, written with its own writer lock held;
2. rename ``NAME`` -> ``.NAME.drop-backup`` (merge with overwrite: ``.NAME.merge-backup``), the old store
   with its lock still held by the writer;
3. rename the new store -> ``NAME``;
4. rename the backup -> ``.NAME.drop-old-<hex>`` (``merge-old``), then delete that.

(A merge into a new ``NAME`` has only steps 1 and 3.)

A writer killed at any point leaves one of these states; the next command resolves it like this:

- a hidden copy (``.NAME.drop-<hex>``, complete or not) beside the untouched ``NAME``: the operation did not
  happen. The copy is a stale temporary: removed when ``NAME`` is next opened for writing (and by
  ``robolearn data info`` / ``validate``, which say so), once its lock is free -- never while its writer lives.
  The same for ``.NAME.*-old-<hex>`` (an old copy half deleted after the operation completed) and
  ``.NAME.overwrite-old-<hex>`` (a store being replaced by ``create(overwrite=True)``).
- a backup and no ``NAME`` (killed between the renames): the operation did not happen. A writer opening or
  creating ``NAME`` renames the backup back, only when its lock is free (the operation's writer is dead) and
  it is a complete store; the hidden copy is then stale and removed. Readers say to rename it back.
- ``NAME`` and a backup (killed between steps 3 and 4, or a store made at ``NAME`` by hand or by an older
  robolearn while the backup was waiting): which one the user wants cannot be proven, so every writer refuses,
  naming both with their episode counts and the renames that keep either. Readers read ``NAME``. No code path
  deletes a backup it did not just create.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import math
import os
import re
import shutil
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
_WRITE_ALL_CHUNKS = {"write_empty_chunks": True}
# A hidden folder whose lock file does not exist (yet, or any more) is taken as stale only this long after its
# last change: create() makes the folder a moment before its lock.
_STALE_WITHOUT_LOCK_S = 60.0
_OPS = ("drop", "merge")

# The lock file sits in the store root; zarr warns about unknown files when it lists the root.
warnings.filterwarnings("ignore", message=r"Object at \.robolearn\.lock is not recognized")


def time_chunk_len(spec: KeySpec) -> int:
    """Rows per chunk: ``IMAGE_CHUNK_FRAMES`` frames for images (fewer when frames are large), about
    ``CHUNK_BYTES`` for everything else."""
    if spec.is_image:
        return int(max(1, min(IMAGE_CHUNK_FRAMES, IMAGE_CHUNK_BYTES // max(1, spec.bytes_per_step))))
    return int(max(1, CHUNK_BYTES // max(1, spec.bytes_per_step)))


# Camera frames: 16 to a chunk file (at most 1 MiB of frames). One file per frame, as Diffusion Policy's stores have,
# spent most of an image import creating files -- the kernel serializes file creation in one folder, and 20,000
# files per 10,000 two-camera steps cost more than compressing them (a perf profile of the import; 16 frames a file
# made two-camera imports 2.03x faster: tools/bench/import_robomimic_ab.py, results/import_robomimic_ab_chunks16.json).
# 16 frames of 84x84 are 340 KB, which a reader of one frame decodes in 0.36 ms against 0.03 ms for one frame, while
# zarr's own bookkeeping for that read takes about 1.4 ms either way (tools/bench/frame_read.py).
IMAGE_CHUNK_FRAMES = 16
IMAGE_CHUNK_BYTES = 1024 * 1024

_FrameWrite = Callable[..., "list[Future[None]]"]


def _frame_writer(arr: zarr.Array, root: Path) -> _FrameWrite | None:
    """For a uint8 array chunked by whole frames (camera images), a function writing rows ``start, start+1, ...``
    chunk file by chunk file, with the bytes zarr would write (its own blosc codec, then the crc32c zarr 3
    appends). None for any other array or codec chain: zarr writes those.

    ``write(start, blocks, pool, head=None)``: ``blocks`` are consecutive row blocks (an append's episodes, never
    concatenated) that begin at row ``start``; when ``start`` is not on a chunk boundary, ``head`` holds the rows
    of its chunk before ``start`` (committed rows: that one file is replaced atomically, through a temporary file
    renamed over it, so a kill leaves the old chunk or the new one, never a torn one). Every other file lies past
    the committed rows and is written in place (see ``write_chunks``). The last chunk is padded with the fill value,
    as zarr pads a chunk at the array's end.

    Why: zarr-python spends about a millisecond of asyncio and buffer bookkeeping per chunk, which capped one-frame
    chunks near 800 frames/s on two cores, while encoding and writing a frame takes a tenth of that.
    ``tests/data/test_store_frames.py`` checks the files are byte-identical to zarr's.
    """
    if arr.dtype != np.uint8 or arr.ndim < 2:
        return None
    grid = _grid(arr)
    if tuple(grid[1:]) != tuple(arr.shape[1:]):
        return None
    k = int(grid[0])
    md = arr.metadata
    encode: Callable[[np.ndarray], bytes]
    if md.zarr_format == 3:
        from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

        codecs = list(md.codecs)
        if [type(c) for c in codecs] != [BytesCodec, BloscCodec, Crc32cCodec]:
            return None
        blosc = getattr(codecs[1], "_blosc_codec", None)  # the numcodecs Blosc zarr itself encodes with
        if blosc is None:
            return None
        import google_crc32c

        def encode(rows: np.ndarray) -> bytes:
            packed = blosc.encode(rows)
            return bytes(packed) + int(google_crc32c.value(packed)).to_bytes(4, "little")
    elif md.zarr_format == 2:
        import numcodecs

        if md.filters or md.order != "C" or not isinstance(md.compressor, numcodecs.Blosc):
            return None
        compressor = md.compressor

        def encode(rows: np.ndarray) -> bytes:
            return bytes(compressor.encode(rows))
    else:
        return None
    folder = os.path.join(str(root), arr.path, "")
    rest = (0,) * (arr.ndim - 1)
    frame = tuple(int(s) for s in arr.shape[1:])
    fill = np.uint8(arr.fill_value or 0)

    def write_chunks(start: int, blocks: Sequence[np.ndarray], offsets: np.ndarray, head: np.ndarray | None,
                     c_lo: int, c_hi: int) -> None:
        made = {folder.rstrip(os.sep)}
        end = start + int(offsets[-1])
        for c in range(c_lo, c_hi):
            a, b = c * k, (c + 1) * k
            replace = a < start  # the one chunk holding committed rows: ``head`` is those rows
            parts = [head] if replace else []
            lo, hi = max(a, start) - start, min(b, end) - start  # rows of the blocks in this chunk
            i = int(np.searchsorted(offsets, lo, side="right")) - 1
            while lo < hi:
                take = min(hi, int(offsets[i + 1])) - lo
                parts.append(blocks[i][lo - int(offsets[i]): lo - int(offsets[i]) + take])
                lo += take
                i += 1
            if b > end:
                parts.append(np.full((b - end, *frame), fill, np.uint8))
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            data = memoryview(encode(np.ascontiguousarray(rows)))
            path = folder + md.encode_chunk_key((c, *rest))
            _make_parents(path, made)
            # Every chunk but one lies past the committed rows (appends, and copies into a hidden store), so a
            # file torn by a kill is an orphan that readers never see and the next writer trims or overwrites:
            # written in place (renaming cost a third of a one-frame chunk's write). The chunk holding committed
            # rows before ``start`` is replaced whole through a renamed temporary file, as zarr writes.
            target = f"{path}.{uuid.uuid4().hex}.partial" if replace else path  # zarr's temporaries' name: trimmed
            fd = os.open(target, _WRITE_FLAGS, 0o666)  # os.open: open()'s buffered file object cost a fifth more
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            if replace:
                try:
                    os.replace(target, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(target)
                    raise

    def write(start: int, blocks: Sequence[np.ndarray], pool: ThreadPoolExecutor,
              head: np.ndarray | None = None) -> list[Future[None]]:
        """Submit the chunks to ``pool``'s threads and return the futures to wait on (blosc and file writes
        release the GIL: threads overlap compression, the file system and the caller's own work)."""
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return []
        if start % k:
            if head is None or len(head) != start % k:
                raise ValueError(f"{arr.path}: rows from {start} start inside a chunk of {k}: the "
                                 f"{start % k} rows before them are needed (head=)")
        else:
            head = None
        offsets = np.concatenate([[0], np.cumsum([len(b) for b in blocks])])
        c0, c1 = start // k, -(-(start + int(offsets[-1])) // k)
        parts = min(_FRAME_THREADS, max(1, (c1 - c0) * k // 64))
        bounds = np.linspace(c0, c1, parts + 1).astype(int)
        return [pool.submit(write_chunks, start, blocks, offsets, head, int(a), int(b))
                for a, b in zip(bounds, bounds[1:]) if b > a]

    return write


# Camera frames: zstd level 1, not 3. On rendered 84x84 Lift frames (agentview, eye-in-hand) level 1 encodes in
# 0.11-0.13 ms against 0.27-0.30 ms and decodes as fast (0.05 ms), for files 9% larger (ratio 2.21/3.11 against
# 2.44/3.37); encoding was most of an image import's time.
IMAGE_CLEVEL = 1

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_FRAME_THREADS = max(1, min(4, os.cpu_count() or 1))


def _make_parents(path: str, made: set[str]) -> None:
    """Create the folders above a chunk file (zarr 3 puts each frame in ``c/<i>/0/0/``), top down, each once:
    ``os.makedirs`` stats every level first, which cost a third of writing a frame."""
    parent = os.path.dirname(path)
    missing = []
    while parent not in made:
        missing.append(parent)
        parent = os.path.dirname(parent)
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        made.add(folder)


def _compressor(spec: KeySpec, zarr_format: int) -> Any:
    if zarr_format == 2:
        import numcodecs

        return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
    from zarr.codecs import BloscCodec, Crc32cCodec

    # The checksum makes every chunk self-verifying: a truncated, garbage or bit-flipped file fails to decode
    # (a StoreError naming it) instead of reading as wrong numbers -- blosc alone decodes a truncated
    # incompressible chunk without complaint.
    if spec.is_image:
        return BloscCodec(cname="zstd", clevel=IMAGE_CLEVEL, shuffle="noshuffle"), Crc32cCodec()
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()


class _Welford:
    """Mergeable per-dimension count / mean / M2 / min / max (Chan et al.'s parallel update)."""

    @staticmethod
    def of(x: np.ndarray, axes: tuple[int, ...]) -> dict[str, np.ndarray]:
        if x.dtype == np.uint8 and x.ndim > 1 and axes == tuple(range(x.ndim - 1)):
            return _Welford._of_uint8_channels(x)
        x = x.astype(np.float64, copy=False)
        count = int(np.prod([x.shape[a] for a in axes])) if x.size else 0
        if count == 0:
            return {}
        mean = x.mean(axis=axes)
        m2 = ((x - np.expand_dims(mean, axes)) ** 2).sum(axis=axes)
        return {"count": np.float64(count), "mean": mean, "m2": m2, "min": x.min(axis=axes), "max": x.max(axis=axes)}

    @staticmethod
    def _of_uint8_channels(x: np.ndarray, block: int = 128) -> dict[str, np.ndarray]:
        """Per-channel statistics of uint8 images from exact integer sums (sum, sum of squares). Frames are summed
        position by position over blocks of ``block`` frames (contiguous rows: vectorized uint32 adds, which
        cannot overflow for 128 frames of 255**2), then each position's totals are folded into its channel. The
        float64 path converted every pixel and reduced along a stride-3 axis, which cost more than writing the
        frames; summing channel by channel after a transpose cost 0.81 s for 5,000 84x84 frames, this 0.16 s."""
        channels = x.shape[-1]
        count = x.size // channels if channels else 0
        if count == 0:
            return {}
        rows = x.reshape(len(x), -1)
        sums = np.zeros(rows.shape[1], np.uint64)
        squares = np.zeros(rows.shape[1], np.uint64)
        lo = np.full(rows.shape[1], 255, np.uint8)
        hi = np.zeros(rows.shape[1], np.uint8)
        for a in range(0, len(rows), block):
            b = rows[a : a + block]
            sums += b.sum(axis=0, dtype=np.uint32)
            sq = b.astype(np.uint16)
            sq *= sq
            squares += sq.sum(axis=0, dtype=np.uint32)
            np.minimum(lo, b.min(axis=0), out=lo)
            np.maximum(hi, b.max(axis=0), out=hi)
        total = sums.reshape(-1, channels).sum(axis=0).astype(np.float64)
        total_sq = squares.reshape(-1, channels).sum(axis=0).astype(np.float64)
        mean = total / count
        return {"count": np.float64(count), "mean": mean, "m2": np.maximum(total_sq - total * mean, 0.0),
                "min": lo.reshape(-1, channels).min(axis=0).astype(np.float64),
                "max": hi.reshape(-1, channels).max(axis=0).astype(np.float64)}

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


class EpisodeIndex:
    """Episode counts and boundaries from cumulative ends (``self._ends``): shared by a store and a set of stores."""

    _ends: np.ndarray

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


class EpisodeStore(EpisodeIndex):
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
        _in_place: bool = False,
    ) -> "EpisodeStore":
        """Create an empty store opened for append. Refuses to overwrite unless ``overwrite=True``.
        (``_in_place``: for drop and merge, whose new store is a hidden copy already.)"""
        path = _norm(path)
        if not schema:
            raise StoreError(f"cannot create {path}: the schema has no keys")
        root_attrs = {
            "robolearn": {"version": __version__, "schema": schema_to_json(schema), "every_chunk": True},
            "fps": fps,
            "task": task,
            "env_config": dict(env_config or {}),
            **dict(attrs or {}),
        }
        try:
            json.dumps(root_attrs)
        except TypeError as e:
            raise StoreError(f"cannot create {path}: its attributes are not JSON-serializable ({e})") from None
        if not _in_place:  # (drop's and merge's hidden copies have random names: nothing to clean beside them)
            clean_leftovers(path)
            _release_lock(_resolve_backups(path, write=True))  # a backup put back is a store that exists now
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise StoreError(f"cannot create {path}: it already exists (open it, or pass overwrite=True)")
        # Built under a hidden name and renamed into place, so a writer killed while creating leaves no half-made
        # store at ``path`` (a hidden copy, removed by the next writer once its lock is free). The copies drop and
        # merge write are hidden already and are built in place.
        build = path if _in_place else _hidden_path(path, "create")
        try:
            build.parent.mkdir(parents=True, exist_ok=True)
            build.mkdir()
            lock_fd = _acquire_lock(build)
        except OSError as e:
            with contextlib.suppress(OSError):
                build.rmdir()
            raise _os_store_error(f"cannot create {path}", e) from e
        try:
            root = zarr.open_group(str(build), mode="a", zarr_format=zarr_format)  # "w" would delete the lock
            data = root.create_group("data")
            for key, spec in schema.items():
                n = time_chunk_len(spec)
                # Camera chunks are named c.<i>.0.0.0 in the array's folder rather than zarr 3's default
                # c/<i>/0/0/0, which made three folders per chunk (when chunks were one frame, 0.4 ms of a
                # frame's 0.85 ms to write).
                flat = {"chunk_key_encoding": {"name": "default", "separator": "."}} \
                    if spec.is_image and zarr_format == 3 else {}
                data.create_array(
                    key,
                    shape=(0, *spec.shape),
                    dtype=spec.dtype,
                    chunks=(n, *spec.shape),
                    compressors=_compressor(spec, zarr_format),
                    fill_value=0,
                    **flat,
                )
            meta = root.create_group("meta")
            meta.create_array(
                "episode_ends", shape=(0,), dtype="int64", chunks=(ENDS_CHUNK,), fill_value=-1,
                compressors=_compressor(KeySpec((), "int64", "other"), zarr_format),
            )
            root.attrs.update(root_attrs)
            if not _in_place:
                if path.exists() or path.is_symlink():
                    if not overwrite:  # made by someone else while this one was being built
                        raise StoreError(f"cannot create {path}: it appeared while this store was being made")
                    _remove_store(path)  # overwrite=True: only now that the new store is whole
                os.rename(build, path)  # the lock file moves with it: the lock stays held
                root = zarr.open_group(str(path), mode="r+")
        except BaseException as e:
            _release_lock(lock_fd)
            shutil.rmtree(build, ignore_errors=True)
            if isinstance(e, OSError):
                raise _os_store_error(f"cannot create {path}", e) from e
            raise
        return cls(path, root, writable=True, lock_fd=lock_fd)

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, validate: bool = True) -> "EpisodeStore":
        """Open a store: ``mode="r"`` to read (never blocks), ``"a"`` to append/drop (takes the writer lock).

        Stores written by diffusion_policy (zarr format 2, no robolearn schema) open too; their schema is
        inferred from the arrays and the key names. Opening for writing first deals with what a killed drop or
        merge left beside the store (see the module docstring).
        """
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
        path = _norm(path)
        lock_fd = None
        if mode == "a":
            clean_leftovers(path)
            lock_fd = _resolve_backups(path, write=True)
        return cls._open(path, mode, validate, lock_fd)

    @classmethod
    def _open(cls, path: Path, mode: str, validate: bool, lock_fd: int | None) -> "EpisodeStore":
        try:
            if not path.exists():
                _resolve_backups(path, write=False)  # says what a killed drop left in its place, if anything
                raise StoreError(f"no store at {path}")
            if not path.is_dir() or not ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
                raise StoreError(f"{path} is not a zarr store (no zarr.json or .zgroup in it)")
            if mode == "a" and lock_fd is None:
                lock_fd = _acquire_lock(path)
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
            except Exception as e:  # corrupt metadata JSON, ...
                raise _explain(path, e) from e
            if validate:
                # Opened to write (drop, append), a store with a NaN action must still open: dropping the bad
                # episode is how it gets fixed.
                store.validate(check_values=mode == "r", check_chunks="light")
            if mode == "a":
                store._trim_uncommitted()
        except BaseException:
            _release_lock(lock_fd)
            raise
        return store

    @classmethod
    def open_or_create(
        cls, path: str | os.PathLike, schema: Mapping[str, KeySpec], *, env_config_must_match: bool = True,
        **create_kwargs: Any
    ) -> "EpisodeStore":
        """Open ``path`` for append if it exists (schemas must match), else create it: resumable collection.

        ``env_config_must_match=False``: an existing store recorded in another environment config opens anyway --
        for a caller that checks it itself and records the difference per episode (``collect
        append_mismatch=allow``); schema, fps and task must still match."""
        path = _norm(path)
        clean_leftovers(path)
        lock_fd = _resolve_backups(path, write=True)
        if lock_fd is None and not path.exists():
            return cls.create(path, schema, **create_kwargs)
        store = cls._open(path, "a", True, lock_fd)
        diff = schema_mismatch(store.schema, schema)
        fps = create_kwargs.get("fps")
        if diff is None and fps is not None and store.fps is not None and float(fps) != float(store.fps):
            diff = f"fps {store.fps} in the store vs {fps}"
        task = create_kwargs.get("task")
        if diff is None and task and store.task and task != store.task:
            diff = f"task {store.task!r} in the store vs {task!r}"
        env_config = create_kwargs.get("env_config")
        if (diff is None and env_config_must_match and env_config is not None and store.is_robolearn
                and dict(env_config) != store.env_config):
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
    def keys(self) -> list[str]:
        return list(self.schema)

    def array(self, key: str) -> zarr.Array:
        """The raw zarr array behind ``key`` (it may hold orphan rows past :attr:`n_steps`)."""
        if key not in self.schema:
            raise KeyError(f"no key {key!r} in store {self.path}; keys: {', '.join(self.schema)}")
        try:
            arr = self._root["data"][key]
        except Exception as e:  # its zarr.json cut short, ...
            raise _explain(self.path, e) from e
        return arr.with_config(_WRITE_ALL_CHUNKS)

    def read_rows(self, key: str, start: int, stop: int, *, array: zarr.Array | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``key``; a chunk file that is missing or does not decode is a StoreError naming
        it (zarr alone would read a missing chunk as zeros). ``array``: ``self.array(key)`` fetched once before,
        for callers that read many small slices (streaming windows)."""
        return self._read(array if array is not None else self.array(key), start, stop)

    def check_chunks(self, light: bool = False) -> None:
        """Raise a StoreError naming the first chunk file that committed rows need and that does not exist.

        ``light`` (what opening a store does): every chunk of low-dimensional keys (a few files each), but only
        the last of image keys, which have a file per 16 frames (a million frames are 62,500 files at about 3 us
        each to check; reading a frame checks its own file, and ``robolearn data validate`` / ``info`` check them all)."""
        for key, spec in self.schema.items():
            arr = self.array(key)
            hi = min(self.n_steps, int(arr.shape[0]))
            lo = max(0, hi - 1) if (light and spec.is_image) else 0
            missing = next(self._missing_chunks(arr, lo, hi), None)
            if missing is not None:
                raise self._missing_error(arr, *missing)

    def episode_slice(self, index: int) -> slice:
        n = self.n_episodes
        if not -n <= index < n:
            raise IndexError(f"episode {index} out of range: store {self.path} holds {n} episodes")
        index %= n
        start = int(self._ends[index - 1]) if index > 0 else 0
        return slice(start, int(self._ends[index]))

    def get_episode(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        sl = self.episode_slice(index)
        return {k: self.read_rows(k, sl.start, sl.stop) for k in (keys or self.schema)}

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
        return {k: self.read_rows(k, 0, n) for k in (keys or self.schema)}

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
        # Never write into a chunk whose file is missing: zarr would merge the new rows into zeros and the hole
        # in the committed rows before them would be filled with zeros for good.
        arrays = {key: self.array(key) for key in self.schema}  # opened once: each open reads its zarr.json
        for arr in arrays.values():
            hole = next(self._missing_chunks(arr, n0 - n0 % _grid(arr)[0], min(n0, int(arr.shape[0]))), None)
            if hole is not None:
                raise self._missing_error(arr, *hole)
        ends = self._ends_array()
        g = _grid(ends)[0]
        e1 = e0 + len(episodes)
        grows = math.ceil(e1 / g) > math.ceil(e0 / g)  # episode_ends needs a chunk file that does not exist yet
        new_stats: dict[str, Any] = {}
        # Camera frames are written in background threads while the other keys go through zarr and the
        # statistics are computed here; all of it finishes (or raises) before the commit below.
        pool: ThreadPoolExecutor | None = None
        pending: list[Future[None]] = []
        image_stats: dict[str, list[Future[dict[str, Any]]]] = {}
        try:
            for key, spec in self.schema.items():
                arr = arrays[key]
                arr.resize((n0 + total, *spec.shape))
                frames = _frame_writer(arr, self.path)
                if frames is not None:
                    # The episodes' frames, never concatenated (a copy of a batch of frames cost more in page
                    # faults than writing them: only a chunk spanning two episodes is copied); their
                    # statistics in the pool too (numpy's reductions release the GIL).
                    if pool is None:
                        pool = ThreadPoolExecutor(_FRAME_THREADS, thread_name_prefix="robolearn-frames")
                    k = _grid(arr)[0]
                    head = self._read(arr, n0 - n0 % k, n0) if n0 % k else None  # committed rows sharing a chunk
                    pending += frames(n0, [ep[key] for ep in checked], pool, head=head)
                    image_stats[key] = [pool.submit(_Welford.of, ep[key], _stat_axes(spec)) for ep in checked]
                    continue
                block = np.concatenate([ep[key] for ep in checked]) if len(checked) > 1 else checked[0][key]
                arr[n0 : n0 + total] = block
                new_stats[key] = _Welford.of(block, _stat_axes(spec))
            for f in pending:
                f.result()
            for key, parts in image_stats.items():
                stats: dict[str, Any] = {}
                for part in parts:
                    stats = _Welford.merge(stats, part.result())
                new_stats[key] = stats
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        before = self._episode_attrs_entries(e0, attrs, len(episodes))
        root_source = self._source_summary(before)
        if grows:
            before["growing_ends"] = {"from": e0, "to": e1}
        if before:
            self._root["meta"].attrs.update(before)
        if root_source:
            # Before the commit: a writer killed here leaves a root that already counts these episodes' source
            # (at worst claiming a mix that never landed, until the next append or open for writing fixes it),
            # never one that hides a committed episode's.
            self._root.attrs.update(root_source)
        new_ends = n0 + np.cumsum(lengths, dtype=np.int64)
        ends.resize((e1,))
        # The commit point: these episodes exist from here on. Written chunk by chunk, in order, so a crash
        # can only leave an unwritten tail (never a hole in the middle).
        start = e0
        while start < e1:
            stop = min(e1, (start // g + 1) * g)
            ends[start:stop] = new_ends[start - e0 : stop - e0]
            start = stop
        self._ends = np.concatenate([self._ends, new_ends])
        # After the commit: an error here (a full disk) leaves the episodes committed, the cache stale (it is
        # recomputed when found stale) and at worst a growing_ends record that the next writer clears.
        after: dict[str, Any] = {}
        merged = self._merged_stats(new_stats, previous_steps=n0)
        if merged is not None:
            after["stats"] = merged
        if grows:
            after["growing_ends"] = None
        if after:
            self._root["meta"].attrs.update(after)
        return list(range(e0, e1))

    def drop_episodes(self, indices: Iterable[int]) -> None:
        """Remove episodes. The store is rewritten beside itself and swapped in, so a crash keeps the original
        (the states a killed drop can leave and how each is resolved: see the module docstring)."""
        self._require_writable("drop episodes from")
        n = self.n_episodes
        drop = sorted(set(int(i) for i in indices))
        bad = [i for i in drop if not 0 <= i < n]
        if bad:
            raise StoreError(f"cannot drop episodes {bad} from {self.path}: it holds episodes 0..{n - 1}")
        if not drop:
            return
        dropped = set(drop)
        keep = [i for i in range(n) if i not in dropped]
        self._check_kept(keep, drop)
        _refuse_beside_backup(self.path)
        tmp = _hidden_path(self.path, "drop")
        try:
            out = EpisodeStore.create(
                tmp, self.schema, fps=self.fps, task=self.task, env_config=self.env_config,
                attrs={k: v for k, v in self.attrs.items() if k not in ("robolearn", "fps", "task", "env_config")},
                zarr_format=self.zarr_format, _in_place=True,
            )
        except StoreError as e:
            if isinstance(e.__cause__, OSError):
                raise self._copy_failed(e.__cause__) from None
            raise
        try:
            _copy_episodes(self, out, keep)
        except BaseException as e:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise self._copy_failed(e) from None
            raise
        # Swap: the new directory carries its own (held) lock; the old one is released once it is deleted.
        try:
            trash = _swap_in(self.path, tmp, "drop")
        except BaseException:
            out.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old_fd, self._lock_fd, out._lock_fd = self._lock_fd, out._lock_fd, None
        self._root = zarr.open_group(str(self.path), mode="r+")
        self._ends = self._read_ends()
        shutil.rmtree(trash, ignore_errors=True)
        _release_lock(old_fd)

    def _copy_failed(self, e: OSError) -> StoreError:
        e.filename = None  # a file of the hidden copy, which is gone: not one the user can act on
        return _os_store_error(
            f"cannot drop episodes from {self.path} ({self.path} is unchanged, nothing was left beside it): "
            f"writing its new copy failed", e)

    def _check_kept(self, keep: list[int], drop: list[int]) -> None:
        """Refuse a drop that would leave a bad episode behind: name the episodes, not the hidden copy."""
        p = self.path
        nonfinite = self._nonfinite_episodes()
        left = [e for e in keep if e in nonfinite]
        if left:
            if len(left) == 1:
                raise StoreError(
                    f"cannot drop episodes from {p}: episode {left[0]} still has NaN or inf in "
                    f"{nonfinite[left[0]]!r} after dropping {drop}; drop it too")
            keys = sorted({nonfinite[e] for e in left})
            raise StoreError(
                f"cannot drop episodes from {p}: episodes {_ranges(left)} still have NaN or inf in "
                f"{', '.join(repr(k) for k in keys)} after dropping {drop}; drop them too")
        kept = set(keep)
        for key in self.schema:
            arr = self.array(key)
            for i, f in self._missing_chunks(arr, 0, min(self.n_steps, int(arr.shape[0]))):
                lo, hi = self._chunk_rows(arr, i)
                hit = [e for e in self._episodes_in(lo, hi) if e in kept]
                if hit:
                    one = len(hit) == 1
                    raise StoreError(
                        f"cannot drop episodes from {p}: {'episode' if one else 'episodes'} {_ranges(hit)} would "
                        f"stay, but {'it lies' if one else 'they lie'} partly in {arr.path} chunk "
                        f"{f.relative_to(p / arr.path).as_posix()}, whose file {f} is missing; drop "
                        f"{'it' if one else 'them'} too, or restore the file from a copy of the store")

    def _nonfinite_episodes(self) -> dict[int, str]:
        """Committed episodes with NaN or inf in a float action or reward key -> the first such key."""
        out: dict[int, str] = {}
        for key, spec in self.schema.items():
            if spec.role not in ("action", "reward") or np.dtype(spec.dtype).kind != "f" or not self.n_steps:
                continue
            values = self.read_rows(key, 0, self.n_steps)
            rows = np.nonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))[0]
            for e in np.unique(np.searchsorted(self._ends, rows, side="right")):
                out.setdefault(int(e), key)
        return out

    # ------------------------------------------------------------------ statistics
    def stats(self, refresh: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """Per-key min, max, mean, std (per dimension; per channel for images) over all committed steps.

        Cached in ``meta`` attributes, updated on append, recomputed when stale (after a drop, a crash
        between commit and cache update, or a store written by another tool). A store without episodes has
        no statistics: StoreError.
        """
        if not self.n_steps:
            raise StoreError(
                f"{self.path} holds no episodes: there are no statistics to compute (collect, record or merge "
                f"episodes into it first)")
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
                self._root["meta"].attrs["stats"] = self._stats_entry(raw)
        return {k: _finish_stats(v) for k, v in raw.items()}

    def _scan_stats(self, key: str) -> dict[str, Any]:
        spec = self.schema[key]
        arr = self.array(key)
        step = max(1, _COPY_BLOCK_BYTES // max(1, spec.bytes_per_step))
        acc: dict[str, Any] = {}
        for start in range(0, self.n_steps, step):
            block = self._read(arr, start, min(self.n_steps, start + step))
            acc = _Welford.merge(acc, _Welford.of(block, _stat_axes(spec)))
        return acc

    def _merged_stats(self, new: dict[str, Any], previous_steps: int) -> dict[str, Any] | None:
        """The cache entry after an append, or None when the cache was stale already (recomputed on demand)."""
        cached = self._root["meta"].attrs.get("stats")
        if previous_steps == 0:
            base: dict[str, Any] = {k: {} for k in self.schema}
        elif isinstance(cached, dict) and cached.get("n_steps") == previous_steps:
            base = {k: {f: np.asarray(v) for f, v in d.items()} for k, d in cached["keys"].items()}
        else:
            return None
        return self._stats_entry({k: _Welford.merge(base.get(k, {}), new[k]) for k in self.schema})

    def _stats_entry(self, raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "n_steps": self.n_steps,
            "n_episodes": self.n_episodes,
            "keys": {k: {f: np.asarray(v).tolist() for f, v in d.items()} for k, d in raw.items()},
        }

    # ------------------------------------------------------------------ validation
    def validate(self, check_values: bool = True, *, check_chunks: bool | str = True,
                 read_all: bool = False) -> dict[str, Any]:
        """Check the store's structure (and, with ``check_values``, NaN/inf in actions and rewards).

        ``check_chunks``: every chunk file the committed rows need exists (cheap: no data is read); ``"light"``:
        image keys only their last frame (see :meth:`check_chunks`).
        ``read_all``: also decode every committed chunk of every key (``robolearn data validate`` does).
        Raises :class:`StoreError` naming the key, episode or file at the first problem; returns a report.
        """
        try:
            return self._validate(check_values, check_chunks, read_all)
        except StoreError:
            raise
        except Exception as e:  # metadata cut short, ...
            raise _explain(self.path, e) from e

    def _validate(self, check_values: bool, check_chunks: bool | str, read_all: bool) -> dict[str, Any]:
        p = self.path
        ends_arr = self._ends_array()
        committed = self._ends
        if ends_arr.dtype.kind not in "iu":
            raise StoreError(f"{p}: meta/episode_ends has dtype {ends_arr.dtype}, expected int64")
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
        if check_chunks:
            self.check_chunks(light=check_chunks == "light")
        if check_values:
            for key, spec in self.schema.items():
                if spec.role not in ("action", "reward") or np.dtype(spec.dtype).kind != "f":
                    continue
                values = self.read_rows(key, 0, self.n_steps)
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
        if read_all:
            for key, spec in self.schema.items():
                arr = self.array(key)
                self._check_blosc_lengths(arr, 0, self.n_steps)
                step = max(1, _COPY_BLOCK_BYTES // max(1, spec.bytes_per_step))
                for start in range(0, self.n_steps, step):
                    self._read(arr, start, min(self.n_steps, start + step))
        return {
            "path": str(p),
            "episodes": self.n_episodes,
            "steps": self.n_steps,
            "uncommitted_rows": orphans,
            "uncommitted_episode_ends": int(ends_arr.shape[0] - len(committed)),
            "ok": True,
        }

    # ------------------------------------------------------------------ internals
    def _raw_episode_attrs(self) -> list[Any]:
        entries = self._root["meta"].attrs.get("episode_attrs")
        return list(entries) if isinstance(entries, list) else []

    def _episode_attrs_entries(self, first: int, attrs: list[dict[str, Any]] | None, count: int) -> dict[str, Any]:
        """Entries for episodes ``first..first+count-1``, written before they are committed (see module docstring).

        Stores that never got attrs keep no list at all (scripted collection pays nothing); once one episode has
        attrs, episodes appended without get ``{}``. An entry left past ``first`` by a killed or failed append
        is replaced here, never inherited by the new episode. Returns the meta attributes to update.
        """
        entries = self._raw_episode_attrs()
        if attrs is None and len(entries) <= first:
            return {}
        entries = entries[:first] + [{}] * max(0, first - len(entries))
        entries += attrs if attrs is not None else [{}] * count
        return {"episode_attrs": entries}

    def _source_summary(self, update: dict[str, Any]) -> dict[str, Any]:
        """Keep the root ``source`` honest about the episodes in ``update["episode_attrs"]`` (see
        :mod:`robolearn.data.provenance`): once any episode records its own source, episodes that record none get
        the root's claim as their attributes (``update`` is changed in place), and the root becomes the summary
        of all of them. Returns the root attributes to set ({} when the root stays as it is)."""
        from robolearn.data import provenance

        entries = update.get("episode_attrs")
        if not entries or not any(isinstance(e, dict) and "source" in e for e in entries):
            return {}
        root = self._root.attrs.get("source")
        update["episode_attrs"] = entries = provenance.backfill(entries, root)
        summary = provenance.root_summary(entries, root)
        return {} if summary is None else {"source": summary}

    def _ends_array(self) -> zarr.Array:
        try:
            arr = self._root["meta"]["episode_ends"]
        except Exception as e:  # its zarr.json cut short, ...
            raise _explain(self.path, e) from e
        return arr.with_config(_WRITE_ALL_CHUNKS)

    def _read_ends(self) -> np.ndarray:
        for attempt in range(3):
            arr = self._ends_array()
            n_alloc = int(arr.shape[0])
            missing = list(self._missing_chunks(arr, 0, n_alloc))
            if missing and not self._growing_hole(arr, [i for i, _ in missing]):
                if attempt < 2 and any(f.exists() for _, f in missing):
                    continue  # a writer committing right now wrote it (and cleared its record) as we looked
                raise self._missing_error(arr, *missing[0])
            try:
                raw = np.asarray(arr[:], dtype=np.int64)
            except Exception as e:
                raise self._unreadable_error(arr, 0, n_alloc, e) from e
            break
        # An end that was allocated but never written (writer killed between resize and write) reads as the fill
        # value: -1 in robolearn's stores, often 0 in others. A trailing run of such non-increasing entries is
        # an append that did not finish, not corruption.
        fill = arr.fill_value
        fill = -1 if fill is None else int(fill)
        n = len(raw)
        while n and raw[n - 1] == fill and (n == 1 or raw[n - 1] <= raw[n - 2]):
            n -= 1
        return raw[:n]

    def _growing_hole(self, ends: zarr.Array, missing: list[int]) -> bool:
        """Whether the missing chunks of episode_ends are provably an append that grew it and did not finish:
        trailing, past the ``from`` its ``growing_ends`` record names, within that append's ``to``."""
        g = _grid(ends)[0]
        n_alloc = int(ends.shape[0])
        if missing != list(range(missing[0], math.ceil(n_alloc / g))):
            return False  # a hole with written chunks after it: writes go in order, so this is damage
        try:
            growing = self._root["meta"].attrs.get("growing_ends")  # read after the shape: see _read_ends
            start, stop = int(growing["from"]), int(growing["to"])
        except (KeyError, TypeError, ValueError):
            return False
        return 0 <= start <= missing[0] * g and n_alloc <= stop

    # ------------------------------------------------------------------ chunk files
    @property
    def every_chunk_written(self) -> bool:
        """Whether an absent chunk file is damage: only in stores created since robolearn writes every chunk (marked
        ``every_chunk`` in the root attributes). Other stores -- an older robolearn's (zarr 2 or 3, written through
        zarr-python 3, which skips chunks holding only the fill value: an all-False flag, an all-zero reward) and
        foreign ones -- read their absent data chunks as that value, as they always did."""
        info = self._root.attrs.get("robolearn")
        return isinstance(info, dict) and bool(info.get("every_chunk"))

    def _missing_chunks(self, arr: zarr.Array, lo: int, hi: int) -> Iterator[tuple[int, Path]]:
        """(time-chunk index, file) of each chunk file that rows ``lo:hi`` of ``arr`` need and that is absent
        (data chunks of a store older than :attr:`every_chunk_written`: none, they are the fill value)."""
        if arr.path != "meta/episode_ends" and not self.every_chunk_written:
            return
        exists = os.path.exists
        for coords, f in self._chunk_files(arr, lo, hi, as_str=True):
            if not exists(f):
                yield coords[0], Path(f)

    def _chunk_files(self, arr: zarr.Array, lo: int, hi: int,
                     as_str: bool = False) -> Iterator[tuple[tuple[int, ...], Any]]:
        """(chunk coordinates, file) of every chunk file rows ``lo:hi`` of ``arr`` need (one per 16 frames
        for images; one per frame in older stores: kept cheap, about 5 us each)."""
        grid = _grid(arr)
        hi = min(hi, int(arr.shape[0]))
        if hi <= lo:
            return
        others = [range(math.ceil(int(s) / int(c))) for s, c in zip(arr.shape[1:], grid[1:])]
        folder = os.path.join(str(self.path), arr.path, "")
        encode = arr.metadata.encode_chunk_key
        for i in range(lo // grid[0], math.ceil(hi / grid[0])):
            for rest in itertools.product(*others):
                coords = (i, *rest)
                f = folder + encode(coords)
                yield coords, (f if as_str else Path(f))

    def _chunk_rows(self, arr: zarr.Array, i: int) -> tuple[int, int]:
        g = _grid(arr)[0]
        return i * g, min((i + 1) * g, int(arr.shape[0]))

    def _episodes_in(self, lo: int, hi: int) -> list[int]:
        """Committed episodes with rows in ``lo:hi``."""
        hi = min(hi, self.n_steps)
        if hi <= lo:
            return []
        first = int(np.searchsorted(self._ends, lo, side="right"))
        last = int(np.searchsorted(self._ends, hi - 1, side="right"))
        return list(range(first, min(last, self.n_episodes - 1) + 1))

    def _where(self, arr: zarr.Array, i: int, f: Path) -> tuple[str, str]:
        """(what the chunk holds, what to do about it) for an error message."""
        lo, hi = self._chunk_rows(arr, i)
        if arr.path == "meta/episode_ends":
            return (_span("episode", lo, hi),
                    "Where those episodes end is lost, so robolearn will neither read nor change this store (an "
                    "append would take its rows for an unfinished episode and trim them). Restore the file from "
                    "a copy of the store")
        eps = self._episodes_in(lo, hi)
        held = _span("row", lo, hi) + (f", {_episodes_text(eps)}" if eps else ", no committed episode")
        todo = "Restore the file from a copy of the store"
        if eps:
            todo += (f", or drop {_episodes_text(eps)} (robolearn data drop {self.path} --episodes "
                     f"{_ranges(eps)})")
        return held, todo

    def _missing_error(self, arr: zarr.Array, i: int, f: Path) -> StoreError:
        held, todo = self._where(arr, i, f)
        key = f.relative_to(self.path / arr.path).as_posix()
        return StoreError(f"{self.path}: {arr.path} chunk {key} ({held}) is missing: there is no file {f}. {todo}")

    def _unreadable_error(self, arr: zarr.Array, lo: int, hi: int, error: Exception) -> StoreError:
        """Find the chunk of rows ``lo:hi`` that does not decode and name its file."""
        grid = _grid(arr)
        for coords, f in self._chunk_files(arr, lo, hi):
            key = f.relative_to(self.path / arr.path).as_posix()
            try:
                arr[tuple(slice(c * g, (c + 1) * g) for c, g in zip(coords, grid))]
            except Exception as e:
                held, todo = self._where(arr, coords[0], f)
                return StoreError(
                    f"{self.path}: the file {f} cannot be read ({type(e).__name__}: {e}): {arr.path} chunk {key} "
                    f"({held}) is damaged. {todo}")
        return _explain(self.path, error)

    def _check_blosc_lengths(self, arr: zarr.Array, lo: int, hi: int) -> None:
        """Chunks whose last codec is blosc (no checksum after it: zarr 2 stores, zarr 3 stores written before
        robolearn added one) must be as long as their blosc header says: blosc itself decodes a truncated
        incompressible chunk without complaint."""
        codecs = list(getattr(arr, "compressors", ()) or ())
        if not codecs or getattr(codecs[-1], "codec_id", type(codecs[-1]).__name__.lower()) not in (
                "blosc", "blosccodec"):
            return
        for coords, f in self._chunk_files(arr, lo, hi):
            try:
                with open(f, "rb") as fh:
                    header = fh.read(16)
                size = f.stat().st_size
            except FileNotFoundError:
                continue  # the existence check names it
            if len(header) < 16 or int.from_bytes(header[12:16], "little") != size:
                held, todo = self._where(arr, coords[0], f)
                key = f.relative_to(self.path / arr.path).as_posix()
                said = int.from_bytes(header[12:16], "little") if len(header) == 16 else "16 or more"
                raise StoreError(
                    f"{self.path}: the file {f} cannot be read (it is {size} bytes, its blosc header says {said}): "
                    f"{arr.path} chunk {key} ({held}) is damaged. {todo}")

    def _read(self, arr: zarr.Array, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of ``arr``, refusing to read a missing chunk as zeros and naming one that does not decode."""
        hole = next(self._missing_chunks(arr, lo, hi), None)
        if hole is not None:
            raise self._missing_error(arr, *hole)
        try:
            return arr[lo:hi]
        except Exception as e:
            raise self._unreadable_error(arr, lo, hi, e) from e

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
            update: dict[str, Any] = {"episode_attrs": entries[: self.n_episodes]}
            root_source = self._source_summary(update)  # the root may count the source of what was trimmed
            self._root["meta"].attrs.update(update)
            if root_source:
                self._root.attrs.update(root_source)
        if self._root["meta"].attrs.get("growing_ends") is not None:  # its append is trimmed or committed
            self._root["meta"].attrs["growing_ends"] = None
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


def _grid(arr: zarr.Array) -> tuple[int, ...]:
    """The grid of chunk files (shards when the array is sharded)."""
    return tuple(int(c) for c in (arr.shards or arr.chunks))


def _span(what: str, lo: int, hi: int) -> str:
    return f"{what} {lo}" if hi - lo == 1 else f"{what}s {lo}-{hi - 1}"


def _episodes_text(eps: Sequence[int]) -> str:
    return f"episode {eps[0]}" if len(eps) == 1 else f"episodes {eps[0]}-{eps[-1]}"


def _ranges(indices: Iterable[int]) -> str:
    """``[3, 5, 6, 7]`` -> ``"3,5-7"`` (what ``robolearn data drop --episodes`` takes)."""
    out: list[str] = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda t: t[1] - t[0]):
        vals = [v for _, v in run]
        out.append(str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}")
    return ",".join(out)


_METADATA_FILES = ("zarr.json", ".zgroup", ".zarray", ".zattrs", ".zmetadata")


def _broken_metadata(path: Path) -> tuple[Path, Exception] | None:
    """The first metadata file of the store (root, groups, arrays) that is not valid JSON."""
    folders = [path]
    for group in ("data", "meta"):
        g = path / group
        if g.is_dir():
            folders += [g, *sorted(p for p in g.iterdir() if p.is_dir())]
    for folder in folders:
        for name in _METADATA_FILES:
            f = folder / name
            if f.is_file():
                try:
                    json.loads(f.read_bytes())
                except (ValueError, UnicodeDecodeError) as e:
                    return f, e
    return None


def _explain(path: Path, error: Exception) -> StoreError:
    """A StoreError for an exception zarr raised while reading ``path``: names the damaged file when it can."""
    broken = _broken_metadata(path)
    if broken is not None:
        f, e = broken
        return StoreError(
            f"cannot read store {path}: its metadata file {f} is damaged ({type(e).__name__}: {e}); restore that "
            f"file from a copy of the store")
    return StoreError(f"cannot read store {path}: {type(error).__name__}: {error}")


_FS_ADVICE = {
    errno.ENOSPC: "free some space and run it again",
    errno.EDQUOT: "free some space (a disk quota is full) and run it again",
    errno.EFBIG: "the file system refused a file that large",
    errno.EROFS: "it can still be read; to change it, copy it to a writable place",
    errno.EACCES: "it can still be read if you may read it; to change it, copy it to a place you may write",
    errno.EPERM: "it can still be read if you may read it; to change it, copy it to a place you may write",
}


def _os_store_error(what: str, e: OSError) -> StoreError:
    """``what``: <the error> (<the file>); <what to do>."""
    where = f" ({e.filename})" if e.filename else ""
    advice = _FS_ADVICE.get(e.errno or 0)
    reason = {errno.EROFS: "it is on a read-only file system"}.get(e.errno or 0, (e.strerror or str(e)).lower())
    return StoreError(f"{what}: {reason}{where}" + (f"; {advice}" if advice else ""))


# ------------------------------------------------------------------------------------- beside the store
def _backup_path(path: Path, op: str = "drop") -> Path:
    return path.with_name(f".{path.name}.{op}-backup")


def _hidden_path(path: Path, op: str, old: bool = False) -> Path:
    return path.with_name(f".{path.name}.{op}-{'old-' if old else ''}{uuid.uuid4().hex[:8]}")


def _hidden_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(r"^\." + re.escape(path.name) + r"\.(?P<op>drop|merge|overwrite|create)-(?P<old>old-)?[0-9a-f]{8}$")


def _lock_if_free(folder: Path) -> int | None:
    """Take ``folder``'s writer lock if nobody holds it (None if somebody does); never creates the lock file
    (FileNotFoundError when there is none)."""
    fd = os.open(folder / LOCK_NAME, os.O_RDONLY)  # flock needs no write access: works on read-only mounts
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _holder(folder: Path) -> str:
    with contextlib.suppress(OSError):
        text = (folder / LOCK_NAME).read_text(errors="replace").strip()
        if text:
            return text
    return "another process"


def _episode_count(path: Path) -> str:
    with contextlib.suppress(Exception):
        n = EpisodeStore._open(path, "r", False, None).n_episodes
        return f"{n} episode{'s' if n != 1 else ''}"
    return "an unreadable store"


def _norm(path: str | os.PathLike) -> Path:
    """The store's real, absolute path: its hidden siblings (copies, backups) must sit beside the store itself --
    not beside a symlink to it, and ``.`` has no name to derive them from."""
    return Path(os.path.realpath(os.fspath(path)))


def clean_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove the hidden copies dead drops and merges left beside ``path`` and describe what is there.

    A hidden copy (``.NAME.drop-<hex>``, ``.NAME.merge-<hex>``, ``.NAME.*-old-<hex>``) is removed only when its
    writer lock is free (its writer is dead) -- or, having no lock file, when it has not changed for a minute.
    Backups (``.NAME.drop-backup``, ``.NAME.merge-backup``) are never removed: they are described. Returns one
    line per finding, for ``robolearn data info`` and ``validate`` to print.
    """
    path = _norm(path)
    notes: list[str] = []
    pattern = _hidden_pattern(path)
    try:
        beside = sorted(path.parent.iterdir())
    except OSError:
        return notes
    for entry in beside:
        m = pattern.match(entry.name)
        if not m or entry.is_symlink() or not entry.is_dir():
            continue
        op = m["op"]
        what = (f"the old copy of {path.name} that a finished {op} was deleting" if m["old"]
                else f"a copy that a {op} of {path.name} was writing")
        try:
            fd = _lock_if_free(entry)
        except FileNotFoundError:
            fd = None
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > _STALE_WITHOUT_LOCK_S:
                    fd = -1  # stale, no lock to hold
        except OSError:
            continue
        else:
            if fd is None:
                notes.append(f"{entry.name} is {what}: it is at work now (left alone)")
                continue
        if fd is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            if fd >= 0:
                _release_lock(fd)
        if entry.exists():
            notes.append(f"{entry.name} is {what} and was killed; it could not be removed (remove it by hand)")
        else:
            notes.append(f"removed {entry.name}: {what}, killed before it finished")
    if path.exists():
        for op in _OPS:
            backup = _backup_path(path, op)
            if backup.exists():
                notes.append(_both_exist(path, backup, op))
    return notes


def _both_exist(path: Path, backup: Path, op: str) -> str:
    return (
        f"{path} and {backup} both exist: a {op} was interrupted after putting its result in place (or a store "
        f"was made at {path.name} while the backup waited). {path.name} holds {_episode_count(path)}; "
        f"{backup.name} holds {_episode_count(backup)}, the store before the {op}. robolearn writes to neither "
        f"until one is chosen: to keep {path.name}, delete {backup.name}; to go back to the backup, rename "
        f"{path.name} to another name, then rename {backup.name} to {path.name}"
    )


def _refuse_beside_backup(path: Path) -> None:
    for op in _OPS:
        backup = _backup_path(path, op)
        if backup.exists() or backup.is_symlink():
            raise StoreError(_both_exist(path, backup, op))


def _resolve_backups(path: Path, *, write: bool) -> int | None:
    """Deal with the backup a killed drop or merge left beside ``path`` (see the module docstring).

    Writers (``write=True``): with ``path`` present and a backup beside it, refuse; with no ``path`` and one
    backup whose lock is free and which is a complete store, rename it back to ``path`` and return its lock,
    held (the caller goes on as ``path``'s writer); otherwise refuse. Readers: with no ``path``, say what to
    rename. Returns None when nothing was put back.
    """
    backups = [(op, _backup_path(path, op)) for op in _OPS]
    backups = [(op, b) for op, b in backups if b.exists() or b.is_symlink()]
    if not backups:
        return None
    present = path.exists() or path.is_symlink()
    if present and not write:
        return None  # readers read the store; they never block
    for op, backup in backups:
        with contextlib.suppress(FileNotFoundError, OSError):
            fd = _lock_if_free(backup)
            if fd is None:
                raise StoreError(
                    f"a {op} of {path} is in progress ({_holder(backup)} holds {backup.name}); try again when it "
                    f"has finished")
            _release_lock(fd)
    if present:
        if write:
            _refuse_beside_backup(path)
        return None
    if len(backups) > 1:
        raise StoreError(
            f"no store at {path}, but both {backups[0][1]} and {backups[1][1]} exist: interrupted operations "
            f"left two earlier versions of it; rename the one you want back to {path.name}")
    op, backup = backups[0]
    if not write:
        raise StoreError(
            f"no store at {path}, but {backup} exists: an interrupted {op} left the original there; rename it back "
            f"to {path.name} (robolearn does so when it next opens {path.name} for writing)")
    try:
        fd = _acquire_lock(backup)
    except StoreError as e:
        if e.__cause__ is not None:  # a read-only file system, ...: not somebody holding it
            raise
        raise StoreError(
            f"a {op} of {path} is in progress ({_holder(backup)} holds {backup.name}); try again when it has "
            f"finished") from None
    try:
        try:
            EpisodeStore._open(backup, "r", False, None).validate(check_values=False)
        except StoreError as e:
            raise StoreError(
                f"no store at {path}, and {backup}, which an interrupted {op} left, is not a complete store "
                f"({e}); inspect it, and rename it back to {path.name} if it is what you want") from None
        try:
            os.rename(backup, path)  # atomic: the store is back, and this process holds its writer lock
        except OSError as e:  # something appeared at path meanwhile
            raise StoreError(f"cannot rename {backup} back to {path.name}: {e.strerror or e}") from None
    except BaseException:
        _release_lock(fd)
        raise
    return fd


def _swap_in(path: Path, new: Path, op: str) -> Path:
    """Steps 2-4 of the module docstring: ``path`` -> backup, ``new`` -> ``path``, backup -> a hidden old copy,
    which is returned for the caller to delete. Undone if the second rename fails."""
    backup = _backup_path(path, op)
    os.rename(path, backup)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(backup, path)
        raise
    old = _hidden_path(path, op, old=True)
    os.rename(backup, old)
    return old


def _remove_store(path: Path) -> None:
    """Delete an existing store for ``overwrite=True``: only a zarr store, and only if no writer holds it. It is
    renamed aside first, so a kill part-way leaves a recognisable old copy, never a half-deleted store."""
    if path.is_symlink() or not path.is_dir() or not ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
        raise StoreError(f"cannot overwrite {path}: it is not an episode store (refusing to delete it)")
    fd = _acquire_lock(path)  # raises if a writer holds it
    try:
        old = _hidden_path(path, "overwrite", old=True)
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _release_lock(fd)


def _acquire_lock(path: Path) -> int:
    try:
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise _os_store_error(f"cannot open {path} for writing", e) from e
        raise
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
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
    except OSError:
        pass  # who holds the lock is only for messages; a full disk must not stop a writer from opening
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)


def _copy_episodes(src: EpisodeStore, dst: EpisodeStore, episodes: Sequence[int]) -> None:
    """Append ``episodes`` of ``src`` to ``dst`` in blocks of about 64 MB, keeping memory bounded. A ``flag`` key
    ``dst`` has and ``src`` lacks is written as false."""
    fill = {k: spec for k, spec in dst.schema.items() if k not in src.schema}

    def episode(j: int) -> dict[str, np.ndarray]:
        ep = src.get_episode(j)
        n = int(lengths[j])
        for k, spec in fill.items():
            ep[k] = np.zeros((n, *spec.shape), dtype=spec.dtype)
        return ep

    bytes_per_step = max(1, sum(s.bytes_per_step for s in src.schema.values()))
    budget = max(1, _COPY_BLOCK_BYTES // bytes_per_step)
    batch: list[int] = []
    steps = 0
    lengths = src.episode_lengths
    src_attrs = _provenance_attrs(src, dst)
    for i in list(episodes) + [None]:  # type: ignore[list-item]
        if i is not None and (steps + lengths[i] <= budget or not batch):
            batch.append(i)
            steps += int(lengths[i])
            continue
        if batch:
            attrs = [src_attrs[j] for j in batch] if src_attrs is not None else None
            dst.append_episodes([episode(j) for j in batch], attrs)
        if i is None:
            break
        batch, steps = [i], int(lengths[i])


def check_compatible(stores: Sequence[Any], verb: str = "merge", *, missing_flags_ok: bool = False) -> None:
    """Refuse stores that cannot be read as one: a StoreError naming the first store, the one that differs and
    the difference (a key's shape, dtype or role, a key only one has, fps, task). ``verb`` says what was being
    done (``merge``, ``train on``). The one check behind ``data merge`` and training on several stores.
    ``missing_flags_ok``: a ``flag`` key (``intervention``) that only some stores have is allowed (merge fills it)."""
    first = stores[0]
    for other in stores[1:]:
        diff = schema_mismatch(first.schema, other.schema, missing_flags_ok=missing_flags_ok)
        if diff:
            raise StoreError(f"cannot {verb} {first.path} and {other.path}: schemas differ ({diff})")
        if first.fps is not None and other.fps is not None and float(first.fps) != float(other.fps):
            raise StoreError(f"cannot {verb} {first.path} and {other.path}: fps {first.fps} vs {other.fps}")
        if first.task and other.task and first.task != other.task:
            raise StoreError(f"cannot {verb} {first.path} and {other.path}: task {first.task!r} vs {other.task!r}")


def _provenance_attrs(src: EpisodeStore, dst: EpisodeStore) -> list[dict[str, Any]] | None:
    """``src``'s episode attributes as ``dst`` should keep them: each episode's source made explicit (the root of
    ``src`` may be the only place that says it, and ``dst``'s root may say something else: a merge of a clean
    and a noisy store), environment changes made relative to ``dst``'s environment. None: nothing to say."""
    from robolearn.data import provenance

    entries = provenance.backfill(src.all_episode_attrs(), src.attrs.get("source"))
    if not any(entries):
        return None
    if src.is_robolearn and dst.env_config != src.env_config:
        entries = provenance.rebase(entries, src.env_config, dst.env_config)
    return entries


def _union_schema(stores: Sequence[EpisodeStore]) -> tuple[dict[str, KeySpec], dict[str, list[str]]]:
    """Every store's keys in one schema (flag keys some lack included), and the flag keys each store lacks."""
    union: dict[str, KeySpec] = {}
    for s in stores:
        for key, spec in s.schema.items():
            if key in union and union[key] != spec:
                owner = next(o for o in stores if key in o.schema and o.schema[key] == union[key])
                raise StoreError(f"cannot merge {owner.path} and {s.path}: key {key!r} is {union[key]} vs {spec}")
            union.setdefault(key, spec)
    filled = {str(s.path): [k for k in union if k not in s.schema] for s in stores}
    return union, {p: keys for p, keys in filled.items() if keys}


def merge_stores(
    sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, zarr_format: int = 3, overwrite: bool = False,
    episodes: Sequence[Sequence[int] | None] | None = None, attrs: Mapping[str, Any] | None = None,
) -> EpisodeStore:
    """Concatenate stores into a new one at ``out``. Schemas and fps must match, except for ``flag`` keys
    (``intervention``) that only some sources have: the merged store has them, false in the episodes of the
    sources that lacked them, and its ``filled_flags`` attribute says which keys were filled for which source.

    ``episodes``: per source, the episode indices to copy, in order (None: all of them; what ``data filter``
    uses). ``attrs``: more root attributes for the new store.
    """
    if len(sources) < 1:
        raise StoreError("merge needs at least one source store")
    stores = [EpisodeStore.open(s) for s in sources]
    first = stores[0]
    check_compatible(stores, "merge", missing_flags_ok=True)
    schema, filled = _union_schema(stores)
    if episodes is None:
        episodes = [None] * len(stores)
    if len(episodes) != len(stores):
        raise StoreError(f"merge got {len(stores)} stores but {len(episodes)} episode selections")
    chosen = []
    for s, sel in zip(stores, episodes):
        if sel is None:
            chosen.append(list(range(s.n_episodes)))
            continue
        bad = [i for i in sel if not 0 <= int(i) < s.n_episodes]
        if bad:
            raise StoreError(f"{s.path} has no episode {bad[0]} (it holds {s.n_episodes})")
        chosen.append([int(i) for i in sel])
    outp = _norm(out)
    for s in stores:
        src, dst_abs = s.path.resolve(), outp.resolve()
        if dst_abs == src or dst_abs in src.parents or src in dst_abs.parents:
            raise StoreError(f"cannot merge into {outp}: it is, contains or lies inside the source {s.path}")
    clean_leftovers(outp)
    old_fd = _resolve_backups(outp, write=True)  # a backup put back is the store at outp again
    exists = outp.exists() or outp.is_symlink()
    try:
        if exists and not overwrite:
            raise StoreError(f"cannot create {outp}: it already exists (pass overwrite=True to replace it)")
        if exists and old_fd is None:
            if outp.is_symlink() or not outp.is_dir() or not (
                    (outp / "zarr.json").exists() or (outp / ".zgroup").exists()):
                raise StoreError(f"cannot overwrite {outp}: it is not an episode store (refusing to delete it)")
            old_fd = _acquire_lock(outp)  # held through the swap: nobody writes to what is being replaced
    except BaseException:
        _release_lock(old_fd)
        raise
    # Written under a hidden name, its own lock held, and renamed: a failed or killed merge never leaves a store
    # that looks complete, and never a half-replaced one (the states: see the module docstring).
    tmp = _hidden_path(outp, "merge")
    dst = None
    try:
        root_attrs: dict[str, Any] = {"merged_from": [str(s.path) for s in stores]}
        if filled:
            root_attrs["filled_flags"] = filled
        root_attrs.update(attrs or {})
        dst = EpisodeStore.create(
            tmp, schema, fps=first.fps, task=first.task, env_config=first.env_config,
            attrs=root_attrs, zarr_format=zarr_format, _in_place=True,
        )
        for s, sel in zip(stores, chosen):
            _copy_episodes(s, dst, sel)
        if exists:
            trash = _swap_in(outp, tmp, "merge")
        else:
            os.rename(tmp, outp)
            trash = None
    except BaseException as e:
        if dst is not None:
            dst.close()
        shutil.rmtree(tmp, ignore_errors=True)
        _release_lock(old_fd)
        unchanged = f"{outp} is unchanged" if exists else f"nothing was written at {outp}"
        cause = e if isinstance(e, OSError) else e.__cause__ if isinstance(e, StoreError) else None
        if isinstance(cause, OSError):
            cause.filename = None  # a file of the hidden copy, which is gone
            raise _os_store_error(f"cannot merge into {outp} ({unchanged}): writing the merged store failed",
                                  cause) from None
        raise
    lock_fd, dst._lock_fd = dst._lock_fd, None  # the new store's lock is outp's lock now
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    _release_lock(old_fd)
    return EpisodeStore._open(outp, "a", False, lock_fd)
