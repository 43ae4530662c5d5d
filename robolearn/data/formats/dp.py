"""An episode store written in Diffusion Policy's format: zarr format 2, the layout of its ``ReplayBuffer``.

Why: robolearn's stores are zarr format 3, which Diffusion Policy's ``ReplayBuffer.create_from_path`` (zarr-python
2) cannot open. The export is a zarr-2 directory it opens as it is::

    OUT.zarr/.zgroup, .zattrs      root group; attributes: robolearn's (schema, fps, task, env_config, source)
    OUT.zarr/data/<key>/.zarray    time-first arrays, all episodes concatenated
    OUT.zarr/meta/episode_ends     int64, cumulative, one chunk, uncompressed (as Diffusion Policy writes it)

Choices, each Diffusion Policy's own where it has one:

- **Compressor**: numcodecs ``Blosc(cname="lz4", clevel=5, shuffle=NOSHUFFLE)``, ``ReplayBuffer``'s default
  (``resolve_compressor("default")``); ``episode_ends`` uncompressed.
- **Chunks**: time-only. Low-dimensional keys: as many steps as fit in about 2 MB (the target of its
  ``get_optimal_chunks``), at most the whole array. Camera images (uint8 ``H x W x C``): one frame per chunk, as
  its image-dataset conversions write them (random access to single frames during training).
- **Attributes**: the source store's root attributes (schema with roles, fps, task, env_config, source) and its
  per-episode attributes, so robolearn reads the export back as the same store (roles included). Diffusion
  Policy ignores attributes. Every chunk file is written (zarr would skip all-zero ones), so the export keeps
  robolearn's "an absent chunk is damage" promise (``every_chunk``).
- **Atomic**: written under a hidden name beside ``OUT`` (``.OUT.create-<hex>``, holding robolearn's writer lock,
  so a killed export's leftover is removed by the next robolearn command that writes ``OUT``) and renamed into
  place; ``overwrite`` replaces an existing store at ``OUT`` only once the new one is whole (and refuses to delete
  anything that is not a zarr store).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any


from robolearn.data.schema import KeySpec, StoreError

TARGET_CHUNK_BYTES = 2_000_000  # Diffusion Policy's get_optimal_chunks target
_COPY_BYTES = 64 * 1024 * 1024
DP_BLOSC = {"cname": "lz4", "clevel": 5, "shuffle": 0}  # numcodecs.Blosc.NOSHUFFLE == 0


def dp_compressor() -> Any:
    """Diffusion Policy's default compressor (its ``ReplayBuffer.resolve_compressor("default")``)."""
    import numcodecs

    return numcodecs.Blosc(cname=DP_BLOSC["cname"], clevel=DP_BLOSC["clevel"], shuffle=numcodecs.Blosc.NOSHUFFLE)


def dp_chunk_len(spec: KeySpec, n_steps: int) -> int:
    """Steps per chunk: one frame for images; about 2 MB of steps (at most all of them) for everything else."""
    if spec.is_image:
        return 1
    return int(max(1, min(max(n_steps, 1), math.ceil(TARGET_CHUNK_BYTES / max(1, spec.bytes_per_step)))))


def export_dp(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Write the store at ``source`` to ``out`` in Diffusion Policy's zarr-2 layout; returns a summary.

    Refuses an ``out`` that exists (unless ``overwrite``), that is or lies inside ``source``, and a store without
    episodes (``ReplayBuffer`` reads ``episode_ends[-1]`` when it opens one)."""
    import zarr

    from robolearn.data.store import (
        EpisodeStore,
        _FRAME_THREADS,
        _acquire_lock,
        _frame_writer,
        _hidden_path,
        _norm,
        _release_lock,
        _remove_store,
        clean_leftovers,
    )
    from robolearn.progress import progress_bar

    t0 = time.perf_counter()
    src = EpisodeStore.open(source)
    outp = _norm(out)
    s_abs = src.path.resolve()
    if outp == s_abs or s_abs in outp.parents or outp in s_abs.parents:
        raise StoreError(f"cannot export {src.path} to {outp}: it is, contains or lies inside the store itself")
    if src.n_episodes == 0:
        raise StoreError(f"cannot export {src.path}: it holds no episodes (Diffusion Policy's ReplayBuffer cannot "
                         f"open an empty store)")
    clean_leftovers(outp)
    exists = outp.exists() or outp.is_symlink()
    if exists and not overwrite:
        raise StoreError(f"cannot export to {outp}: it already exists (pass --overwrite to replace it)")
    if exists and (outp.is_symlink() or not outp.is_dir()
                   or not ((outp / "zarr.json").exists() or (outp / ".zgroup").exists())):
        raise StoreError(f"cannot overwrite {outp}: it is not a zarr store (refusing to delete it)")
    n = src.n_steps
    tmp = _hidden_path(outp, "create")
    lock = None
    pool = ThreadPoolExecutor(_FRAME_THREADS, thread_name_prefix="robolearn-frames")  # threads only once used
    total_bytes = sum(s.bytes_per_step for s in src.schema.values()) * n
    bar = progress_bar(total_bytes, desc="export dp", unit="B", disable=not progress)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        lock = _acquire_lock(tmp)
        root = zarr.open_group(str(tmp), mode="a", zarr_format=2)
        data = root.create_group("data")
        chunks: dict[str, int] = {}
        for key, spec in src.schema.items():
            c = dp_chunk_len(spec, n)
            chunks[key] = c
            arr = data.create_array(key, shape=(n, *spec.shape), chunks=(c, *spec.shape), dtype=spec.dtype,
                                    compressors=dp_compressor(), fill_value=0)
            arr = arr.with_config({"write_empty_chunks": True})
            rows = c * max(1, _COPY_BYTES // max(1, c * spec.bytes_per_step))  # whole chunks per write
            frames = _frame_writer(arr, tmp)  # images: a file per frame without zarr's per-chunk overhead
            for lo in range(0, n, rows):
                hi = min(n, lo + rows)
                if frames is not None:
                    for f in frames(lo, [src.read_rows(key, lo, hi)], pool):
                        f.result()
                else:
                    arr[lo:hi] = src.read_rows(key, lo, hi)
                bar.update((hi - lo) * spec.bytes_per_step)
        meta = root.create_group("meta")
        ends = meta.create_array("episode_ends", shape=(src.n_episodes,), chunks=(src.n_episodes,),
                                 dtype="int64", compressors=None, fill_value=-1)
        ends[:] = src.episode_ends
        episode_attrs = src.all_episode_attrs()
        if any(episode_attrs):
            meta.attrs["episode_attrs"] = episode_attrs
        attrs = dict(src.attrs)
        attrs["exported"] = {"format": "diffusion_policy", "from": str(src.path)}
        root.attrs.update(attrs)
        if exists:
            _remove_store(outp)  # only now that the new one is whole
        os.rename(tmp, outp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise StoreError(f"cannot export {src.path} to {outp}: {(e.strerror or str(e)).lower()}{where}; "
                             f"{'it is unchanged' if exists else 'nothing was written there'}") from None
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        _release_lock(lock)
        src.close()
    return {"source": str(src.path), "out": str(outp), "episodes": int(src.n_episodes), "steps": int(n),
            "keys": {k: {"shape": list(s.shape), "dtype": s.dtype, "chunks": [chunks[k], *s.shape]}
                     for k, s in src.schema.items()},
            "compressor": {"id": "blosc", **DP_BLOSC}, "zarr_format": 2,
            "seconds": round(time.perf_counter() - t0, 3)}

