"""robomimic HDF5 datasets read into an episode store.

robomimic's layout (what its ``dataset_states_to_obs.py`` writes, and the datasets Diffusion Policy trained on)::

    data/                    attrs: env_args (JSON: env_name, env_version, type, env_kwargs), total
    data/demo_N/             attrs: num_samples (steps), model_file (MJCF), ep_meta (optional)
        actions  (T, A)      float64
        rewards  (T,)        float64
        dones    (T,)        int64 (0/1)
        states   (T, S)      float64, flattened MuJoCo state (replays the demo)
        obs/<key> (T, ...)   low-dim float64, camera images (T, H, W, 3) uint8, upright
        next_obs/<key>       the observation after each step (not imported: it is ``obs`` shifted by one)
    mask/<filter>            optional: names of the demos in a subset (``train``, ``valid``, ...), bytes

What lands in the store, and why:

- ``obs/<key>`` -> ``<key>``: float observations as float32 (what robolearn's environments produce and its
  policies read; robomimic's float64 carries no more than the simulator's float32-worthy signal), images and
  integer arrays as they are. ``actions`` -> ``action`` (float32), ``rewards`` -> ``reward`` (float32),
  ``dones`` -> ``done`` (uint8, a flag: checked to be 0/1 so nothing is lost) and ``states`` -> ``states``
  (float64 kept: a MuJoCo state must be exact to replay). ``next_obs`` is not imported.
- Each key's role is chosen by the caller (``robolearn data import robomimic`` asks the task which observations it
  produces): a key the task does not produce is kept with role ``other``, so training's default observation set
  (every ``obs`` key) is one the environment can feed at evaluation.
- Demos are imported in robomimic's own order (sorted by the number in ``demo_N``; a mask selects a subset);
  each episode's attributes say where it came from (``source: robomimic``, ``robomimic_file``, ``demo``), which
  is how a re-run finds the demos already imported and skips them: an interrupted import resumes.
- Episodes are appended in batches (about :data:`BATCH_BYTES`, or :data:`BATCH_SECONDS` of reading, whichever
  comes first) through :meth:`EpisodeStore.append_episodes`: each batch commits whole episodes only, so a store
  never holds part of a demo, and a kill loses at most the batch being read (re-read on resume). One append per
  demo costs a metadata round trip per key and made low-dim imports ~10x slower; 128 MB batches rather than 32
  cut a two-camera import's zarr calls fourfold. The next batch is read in a thread while this one is written.
- The store is created only once the first demo has been read: a file that fails before that leaves nothing.

Everything wrong with the file is a :class:`RobomimicError` (a :class:`StoreError`, so the CLI prints it as one
``robolearn: error:`` line) that names the file and the HDF5 key. This module never imports ``sim``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from robolearn.data.schema import KeySpec, StoreError

# robosuite environment -> robolearn task; any other environment is "robosuite/<Env>".
TASK_OF_ENV: dict[str, str] = {"Lift": "lift", "PickPlaceCan": "can", "NutAssemblySquare": "square"}
ROBOSUITE_TYPE = 1  # robomimic's EnvType.ROBOSUITE_TYPE (2: gym, 3: iGibson)
# robomimic demo arrays (besides obs/) -> store key, and the dtype kept.
DEMO_ARRAYS: dict[str, tuple[str, str]] = {
    "actions": ("action", "float32"),
    "rewards": ("reward", "float32"),
    "dones": ("done", "uint8"),
    "states": ("states", "float64"),
}
ROLE_OF_ARRAY = {"action": "action", "reward": "reward", "done": "flag", "states": "other"}
BATCH_BYTES = 128 * 1024 * 1024
BATCH_SECONDS = 2.0
SOURCE = "robomimic"


class RobomimicError(StoreError):
    """A robomimic file that cannot be imported as asked: the message names the file and the HDF5 key."""


@dataclass
class RobomimicHeader:
    """What :func:`read_header` learned from the file's metadata alone (no array is read)."""

    path: Path
    env_args: dict[str, Any]
    demos: list[str]  # the demos to import, in robomimic's order
    lengths: dict[str, int]  # every demo of the file -> num_samples
    obs: dict[str, tuple[tuple[int, ...], str]]  # imported obs key -> (per-step shape, dtype in the file)
    arrays: dict[str, tuple[int, ...]]  # robomimic demo arrays present in every demo ("actions", ...) -> shape
    filter: str | None = None
    filters: list[str] = field(default_factory=list)
    unused_obs: list[str] = field(default_factory=list)  # obs keys in the file left out by ``obs_keys``
    # The file as read_header left it open, and the arrays it checked: the import reads through them rather than
    # looking 3,000 arrays up a second time (a tenth of a low-dim import). Closed by import_file or close().
    _file: Any = field(default=None, repr=False, compare=False)
    _datasets: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False, compare=False)

    def close(self) -> None:
        """Close the file :func:`read_header` kept open (the header's facts stay)."""
        if self._file is not None:
            self._datasets.clear()
            self._file.close()
            self._file = None

    @property
    def env_name(self) -> str:
        return str(self.env_args.get("env_name", ""))

    @property
    def env_kwargs(self) -> dict[str, Any]:
        return dict(self.env_args.get("env_kwargs") or {})

    @property
    def steps(self) -> int:
        return int(sum(self.lengths[d] for d in self.demos))

    @property
    def fingerprint(self) -> str:
        """Identifies the file's content well enough to resume into its store -- its environment and its demos'
        names and lengths -- while staying the same when a damaged file is replaced by a good copy."""
        text = json.dumps({"env_args": self.env_args, "lengths": sorted(self.lengths.items())}, sort_keys=True,
                          default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_for_env(env_name: str) -> str:
    """The robolearn task of a robosuite environment (Lift -> ``lift``; an unlisted one -> ``robosuite/<Env>``)."""
    return TASK_OF_ENV.get(env_name, f"robosuite/{env_name}")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise RobomimicError(
            "reading robomimic files needs h5py, which is not installed: pip install 'robolearn-mujoco[io]' "
            "(or pip install h5py)") from None
    return h5py


def open_file(path: str | os.PathLike) -> Any:
    """``h5py.File`` opened read-only, or a :class:`RobomimicError` saying why it is not a readable HDF5 file."""
    h5py = _h5py()
    path = Path(path)
    if not path.exists():
        raise RobomimicError(f"{path} does not exist")
    if path.is_dir():
        raise RobomimicError(f"{path} is a folder, not a robomimic HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        text = str(e)
        if "truncated file" in text:
            why = "it is truncated (shorter than its HDF5 superblock says: an interrupted download or copy?)"
        elif "file signature not found" in text:
            why = "it is not an HDF5 file"
        else:
            why = "HDF5 cannot open it"
        raise RobomimicError(f"{path}: {why} (h5py: {text})") from None


def _dataset(gid: Any, demo: str, key: str) -> Any:
    """The low-level dataset ``<demo>/<key>`` under the group ``gid`` (KeyError when absent or not a dataset).

    Why low-level: h5py's high-level ``group[path]`` costs ~0.1 ms of Python per lookup; a 200-demo file has
    3,000 arrays, looked up once to check the file and once to read it, which was most of a low-dim import."""
    return _h5py().h5d.open(gid, f"{demo}/{key}".encode())


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _demo_order(name: str) -> tuple[int, int | str]:
    """robomimic sorts demos by the number after ``demo_``; anything else goes after, by name."""
    m = re.fullmatch(r"demo_(\d+)", name)
    return (0, int(m.group(1))) if m else (1, name)


def read_header(path: str | os.PathLike, *, filter: str | None = None,
                obs_keys: Sequence[str] | None = None) -> RobomimicHeader:
    """Check the file's structure from its metadata (no array data is read) and say what an import would write.

    ``filter``: a name under ``mask/`` (``train``); ``obs_keys``: the observations to import (default: all).
    Every demo must hold the same keys with the same per-step shapes, and each array as many steps as
    ``num_samples``; the first disagreement is a :class:`RobomimicError` naming the file and the key.
    """
    path = Path(path)
    f = open_file(path)
    try:
        header = _read_header(path, f, filter, obs_keys)
    except RobomimicError:
        f.close()
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # metadata h5py cannot read: a damaged file
        f.close()
        raise RobomimicError(f"{path}: cannot read its structure ({type(e).__name__}: {e}); the file is "
                             f"damaged") from None
    header._file = f
    return header


def _read_header(path: Path, f: Any, filter: str | None, obs_keys: Sequence[str] | None) -> RobomimicHeader:
    h5py = _h5py()
    if "data" not in f or not isinstance(f["data"], h5py.Group):
        top = ", ".join(sorted(f.keys())) or "nothing"
        raise RobomimicError(f"{path} is an HDF5 file but not a robomimic dataset: it has no group 'data' "
                             f"(its top level holds {top})")
    data = f["data"]
    if "env_args" not in data.attrs:
        raise RobomimicError(f"{path}: data.attrs['env_args'] is missing: robomimic records the environment there "
                             f"(env_name, env_kwargs); without it the task cannot be known")
    try:
        env_args = json.loads(_decode(data.attrs["env_args"]))
    except json.JSONDecodeError as e:
        raise RobomimicError(f"{path}: data.attrs['env_args'] is not JSON ({e})") from None
    if not isinstance(env_args, dict) or not env_args.get("env_name"):
        raise RobomimicError(f"{path}: data.attrs['env_args'] has no 'env_name'")
    if env_args.get("type", ROBOSUITE_TYPE) != ROBOSUITE_TYPE:
        kind = {2: "a gym", 3: "an iGibson"}.get(env_args.get("type"), f"type {env_args.get('type')!r}")
        raise RobomimicError(f"{path}: data.attrs['env_args'] says {kind} environment "
                             f"({env_args['env_name']!r}); only robosuite datasets can be imported")
    names = [k for k in data.keys() if isinstance(data[k], h5py.Group)]
    if not names:
        raise RobomimicError(f"{path}: group 'data' holds no demos (robomimic names them data/demo_0, ...)")
    names.sort(key=_demo_order)
    lengths: dict[str, int] = {}
    for name in names:
        g = data[name]
        if "num_samples" in g.attrs:
            lengths[name] = int(g.attrs["num_samples"])
        elif "actions" in g:
            lengths[name] = int(g["actions"].shape[0])
        else:
            raise RobomimicError(f"{path}: data/{name} has no 'actions' dataset")
    filters = sorted(f["mask"].keys()) if "mask" in f and isinstance(f["mask"], h5py.Group) else []
    demos = names
    if filter is not None:
        if filter not in filters:
            have = f"its filters: {', '.join(filters)}" if filters else "it has no mask group at all"
            raise RobomimicError(f"{path}: no filter mask/{filter} ({have})")
        wanted = [_decode(x) for x in np.asarray(f["mask"][filter][()]).reshape(-1)]
        unknown = [d for d in wanted if d not in lengths]
        if unknown:
            raise RobomimicError(f"{path}: mask/{filter} names {unknown[0]!r}, which is not a demo under data/")
        demos = sorted(dict.fromkeys(wanted), key=_demo_order)
        if not demos:
            raise RobomimicError(f"{path}: mask/{filter} is empty: no demo to import")
    first = data[demos[0]]
    if "obs" not in first:
        raise RobomimicError(
            f"{path}: data/{demos[0]}/obs is missing: this file holds simulator states only (a raw robosuite "
            f"demo file); extract observations first with robomimic's dataset_states_to_obs.py")
    if "actions" not in first:
        raise RobomimicError(f"{path}: data/{demos[0]} has no 'actions' dataset")
    all_obs = list(first["obs"].keys())
    if obs_keys is not None:
        missing = [k for k in obs_keys if k not in all_obs]
        if missing:
            raise RobomimicError(f"{path}: no observation {missing[0]!r} in data/{demos[0]}/obs "
                                 f"(it has: {', '.join(all_obs)})")
        chosen = list(dict.fromkeys(obs_keys))
    else:
        chosen = all_obs
    clash = [k for k in chosen if k in ROLE_OF_ARRAY]
    if clash:
        raise RobomimicError(f"{path}: observation data/{demos[0]}/obs/{clash[0]} has the name of the store's own "
                             f"{clash[0]!r} key; leave it out with --obs-keys")
    obs = {k: (tuple(first["obs"][k].shape[1:]), first["obs"][k].dtype.name) for k in chosen}
    arrays = {a: tuple(first[a].shape[1:]) for a in DEMO_ARRAYS if a in first}
    for a in ("rewards", "dones"):
        if a in arrays and int(np.prod(arrays[a])) != 1:
            raise RobomimicError(f"{path}: data/{demos[0]}/{a} has {arrays[a]} values per step, robomimic has one")
    expect: dict[str, tuple[int, ...]] = {f"obs/{k}": shape for k, (shape, _) in obs.items()}
    expect.update(arrays)
    gid = data.id
    datasets: dict[tuple[str, str], Any] = {}
    for name in demos:
        n = lengths[name]
        if n < 1:
            raise RobomimicError(f"{path}: data/{name} is empty (num_samples {n})")
        for key, shape in expect.items():
            try:
                ds = _dataset(gid, name, key)
            except KeyError as e:
                if "not a dataset" in str(e):
                    raise RobomimicError(f"{path}: data/{name}/{key} is a group, not an array") from None
                raise RobomimicError(f"{path}: data/{name}/{key} is missing (data/{demos[0]} has it; every demo "
                                     f"must hold the same keys)") from None
            full = ds.shape
            if full[1:] != shape:
                raise RobomimicError(f"{path}: data/{name}/{key} has per-step shape {full[1:]}, "
                                     f"data/{demos[0]}/{key} has {shape}")
            if full[0] != n:
                raise RobomimicError(f"{path}: data/{name}/{key} has {full[0]} steps but "
                                     f"data/{name}.attrs['num_samples'] says {n}")
            datasets[(name, key)] = ds
    return RobomimicHeader(path=path, env_args=env_args, demos=demos, lengths=lengths, obs=obs, arrays=arrays,
                           filter=filter, filters=filters, unused_obs=[k for k in all_obs if k not in chosen],
                           _datasets=datasets)


# --------------------------------------------------------------------------------------- environment settings
# env_kwargs robomimic records that the robolearn adapter sets itself (rendering, horizon, observation switches).
_ADAPTER_OWNS = {
    "has_renderer", "has_offscreen_renderer", "use_camera_obs", "use_object_obs", "ignore_done", "horizon",
    "render_gpu_device_id", "render_camera", "render_collision_mesh", "render_visual_mesh", "renderer",
    "renderer_config", "camera_names", "camera_heights", "camera_widths", "camera_depths",
    "camera_segmentations", "hard_reset", "reward_scale",
}


def env_overrides(header: RobomimicHeader) -> tuple[dict[str, Any], dict[str, Any]]:
    """robolearn environment overrides from ``env_args["env_kwargs"]``, and the robosuite kwargs left to judge.

    Returns ``(overrides, rest)``: ``overrides`` holds ``robots``, ``control_freq`` and ``reward_type`` as the
    adapter spells them; ``rest`` holds every other robosuite kwarg the adapter does not set itself (the
    controller settings among them), for the caller to compare with robosuite's defaults -- only robosuite knows
    them, and this module does not import it.
    """
    kw = header.env_kwargs
    out: dict[str, Any] = {}
    robots = kw.get("robots")
    if robots is not None:
        robots = [robots] if isinstance(robots, str) else list(robots)
        out["robots"] = robots[0] if len(robots) == 1 else robots
    if kw.get("control_freq") is not None:
        out["control_freq"] = int(kw["control_freq"]) if float(kw["control_freq"]).is_integer() \
            else float(kw["control_freq"])
    if "reward_shaping" in kw:
        out["reward_type"] = "dense" if kw["reward_shaping"] else "sparse"
    rest = {k: v for k, v in kw.items()
            if k not in _ADAPTER_OWNS and k not in ("robots", "control_freq", "reward_shaping")}
    return out, rest


def camera_of(key: str, shape: tuple[int, ...], dtype: str) -> str | None:
    """``agentview_image`` (uint8, H x W x 3) -> ``agentview``: the camera a robosuite image observation comes
    from; None for anything else."""
    if key.endswith("_image") and len(shape) == 3 and shape[2] == 3 and np.dtype(dtype) == np.uint8:
        return key[: -len("_image")]
    return None


def store_schema(header: RobomimicHeader, roles: Mapping[str, str]) -> dict[str, KeySpec]:
    """The store's schema: each imported observation with ``roles[key]`` (default ``obs``), then the arrays."""
    schema: dict[str, KeySpec] = {}
    for key, (shape, dtype) in header.obs.items():
        kind = np.dtype(dtype).kind
        kept = "float32" if kind == "f" else dtype
        schema[key] = KeySpec(shape, kept, roles.get(key, "obs"))
    for array, shape in header.arrays.items():
        store_key, dtype = DEMO_ARRAYS[array]
        schema[store_key] = KeySpec(() if store_key in ("reward", "done") else shape, dtype,
                                    ROLE_OF_ARRAY[store_key])
    return schema


# ------------------------------------------------------------------------------------------------- reading
def read_demo(f: Any, header: RobomimicHeader, name: str, schema: Mapping[str, KeySpec]) -> dict[str, np.ndarray]:
    """One demo as a store episode (keys renamed, dtypes as the schema says). An array HDF5 cannot read (a damaged
    or truncated file) is a :class:`RobomimicError` naming it; so is a cast that would change a value where the
    schema promises it cannot (``done`` not 0/1, an integer that does not fit)."""
    gid, everything = f["data"].id, _h5py().h5s.ALL
    checked = header._datasets if f is header._file else {}
    out: dict[str, np.ndarray] = {}
    wanted = [(f"obs/{k}", k) for k in header.obs] + [(a, DEMO_ARRAYS[a][0]) for a in header.arrays]
    for h5key, key in wanted:
        target = np.dtype(schema[key].dtype)
        try:
            ds = checked.get((name, h5key))
            if ds is None:
                ds = _dataset(gid, name, h5key)
            # Floats are converted by HDF5 as it reads (float64 -> float32 without a second copy); anything else
            # is read as stored and cast below, where a value that would change is refused.
            x = np.empty(ds.shape, target if target.kind == "f" and ds.dtype.kind == "f" else ds.dtype)
            ds.read(everything, everything, x)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise RobomimicError(f"{header.path}: cannot read data/{name}/{h5key} ({type(e).__name__}: {e}); "
                                 f"the file is damaged there") from None
        if x.dtype != target:
            y = x.astype(target)
            if target.kind != "f" and not np.array_equal(y, x):
                raise RobomimicError(f"{header.path}: data/{name}/{h5key} holds values that {target} cannot keep "
                                     f"(e.g. {x.reshape(-1)[np.argmax((y != x).reshape(-1))]!r})")
            x = y
        if key == "reward" or key == "done":
            x = x.reshape(len(x))
        out[key] = x
    return out


def demo_attrs(header: RobomimicHeader, name: str) -> dict[str, Any]:
    """An imported episode's attributes: where it came from (its provenance is ``source: robomimic``)."""
    return {"source": SOURCE, "robomimic_file": str(header.path.resolve()), "demo": name,
            "num_samples": header.lengths[name]}


def root_attrs(header: RobomimicHeader) -> dict[str, Any]:
    """Root attributes of a store made by importing ``header``'s file: the claim about its episodes and what a
    re-run needs to know that it is resuming the same import."""
    return {
        "source": {"kind": SOURCE, "file": str(header.path.resolve())},
        "robomimic": {"file": str(header.path.resolve()), "env_args": header.env_args, "filter": header.filter,
                      "fingerprint": header.fingerprint, "demos": len(header.demos)},
    }


def _iter_batches(f: Any, header: RobomimicHeader, names: Sequence[str], schema: Mapping[str, KeySpec],
                  batch_bytes: int, batch_seconds: float) -> Iterator[tuple[list[str], list[dict[str, np.ndarray]],
                                                                           RobomimicError | None]]:
    """Batches of read demos; a demo that fails to read ends the iteration with the batch read so far and the
    error, so the caller commits what it has before saying what went wrong."""
    names_b: list[str] = []
    eps: list[dict[str, np.ndarray]] = []
    size, t0 = 0, time.perf_counter()
    for name in names:
        try:
            ep = read_demo(f, header, name, schema)
        except RobomimicError as e:
            yield names_b, eps, e
            return
        names_b.append(name)
        eps.append(ep)
        size += sum(v.nbytes for v in ep.values())
        if size >= batch_bytes or time.perf_counter() - t0 >= batch_seconds:
            yield names_b, eps, None
            names_b, eps, size, t0 = [], [], 0, time.perf_counter()
    if eps:
        yield names_b, eps, None


def _read_ahead(items: Iterator[Any]) -> Iterator[Any]:
    """``items``, with the next one already being made in a thread, so reading the next batch (h5py,
    decompression) overlaps writing this one. An error of ``items`` is raised where its item would have been;
    closing this generator waits for the item in flight (before the file it reads is closed)."""
    end = object()
    with ThreadPoolExecutor(1, thread_name_prefix="robolearn-prefetch") as pool:
        ahead = pool.submit(next, items, end)
        while (item := ahead.result()) is not end:
            ahead = pool.submit(next, items, end)
            yield item


@dataclass
class ImportResult:
    """What :func:`import_file` did."""

    out: Path
    imported: list[str]
    skipped: list[str]  # demos the store held already (a resumed import)
    episodes: int  # the store's episodes afterwards
    steps: int  # steps added
    seconds: float
    resumed: bool


def existing_import(out: Path, header: RobomimicHeader, schema: Mapping[str, KeySpec]) -> tuple[bool, str]:
    """Whether the store at ``out`` is an earlier import of this file that can be continued, and why not."""
    from robolearn.data.store import EpisodeStore

    store = EpisodeStore.open(out, validate=False)
    try:
        info = store.attrs.get("robomimic")
        if not isinstance(info, dict):
            return False, "it was not made by importing a robomimic file"
        if info.get("fingerprint") != header.fingerprint:
            return False, (f"it was imported from {info.get('file')}, whose environment or demos differ from "
                           f"{header.path}'s")
        if info.get("filter") != header.filter:
            return False, (f"it was imported with --filter {info.get('filter')}, not "
                           f"{header.filter if header.filter else '(none)'}")
        from robolearn.data.schema import schema_mismatch

        diff = schema_mismatch(store.schema, schema)
        if diff:
            return False, f"its keys differ from this import's ({diff.replace('first store', 'store')})"
        return True, ""
    finally:
        store.close()


def import_file(header: RobomimicHeader, out: str | os.PathLike, *, schema: Mapping[str, KeySpec], task: str,
                fps: float | None, env_config: Mapping[str, Any], overwrite: bool = False, progress: bool = True,
                batch_bytes: int = BATCH_BYTES, batch_seconds: float = BATCH_SECONDS,
                on_resume: Callable[[int, int], None] | None = None) -> ImportResult:
    """Import ``header``'s demos into the store at ``out`` (made with ``schema``, ``task``, ``fps``,
    ``env_config``), resuming an earlier import of the same file there; ``overwrite`` replaces any store at
    ``out`` instead (once the first demo has been read). A store that is not an earlier import of this file is
    refused. A demo that cannot be read stops the import after committing every demo read before it."""
    from robolearn.data.store import EpisodeStore
    from robolearn.progress import progress_bar

    out = Path(out)
    done: set[str] = set()
    resumed = False
    if (out.exists() or out.is_symlink()) and not overwrite:
        try:
            ok, why = existing_import(out, header, schema)
        except StoreError as e:
            raise RobomimicError(f"cannot import {header.path} into {out}: {out} already exists and cannot be read "
                                 f"as an episode store ({e}); pass --overwrite to replace it (only a store is "
                                 f"ever replaced), or choose another --out") from None
        if not ok:
            raise RobomimicError(f"cannot import {header.path} into {out}: {out} already exists and {why}; pass "
                                 f"--overwrite to replace it, or choose another --out")
        resumed = True
    store: EpisodeStore | None = None
    if resumed:
        store = EpisodeStore.open(out, mode="a")
        done = {str(a.get("demo")) for a in store.all_episode_attrs() if a.get("source") == SOURCE}
        if on_resume is not None:
            on_resume(len(done), len(header.demos))
    todo = [d for d in header.demos if d not in done]
    skipped = [d for d in header.demos if d in done]
    imported: list[str] = []
    steps = 0
    t0 = time.perf_counter()
    bar = progress_bar(len(header.demos), desc="import robomimic", unit="demo", initial=len(skipped),
                       disable=not progress)
    f = header._file if header._file is not None else open_file(header.path)
    batches = _read_ahead(_iter_batches(f, header, todo, schema, batch_bytes, batch_seconds))
    try:
        for names, eps, error in batches:
            if eps:
                if store is None:
                    store = EpisodeStore.create(out, schema, fps=fps, task=task, env_config=env_config,
                                                attrs=root_attrs(header), overwrite=overwrite)
                store.append_episodes(eps, [demo_attrs(header, n) for n in names])
                imported += names
                steps += sum(len(e["action"]) for e in eps)
                bar.update(len(names))
            if error is not None:
                held = store.n_episodes if store is not None else 0
                kept = (f"{out} holds the {held} demos imported before it" if store is not None
                        else f"nothing was written at {out}")
                raise RobomimicError(f"{error} ({kept}; replace the file with a good copy and run the same "
                                     f"command again to continue)")
        episodes = store.n_episodes if store is not None else 0
    finally:
        batches.close()
        bar.close()
        if f is header._file:
            header.close()
        else:
            f.close()
        if store is not None:
            store.close()
    return ImportResult(out=out, imported=imported, skipped=skipped, episodes=episodes, steps=steps,
                        seconds=time.perf_counter() - t0, resumed=resumed)
