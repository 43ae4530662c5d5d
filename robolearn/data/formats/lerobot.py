"""LeRobot datasets (format v3.0) in and out of the episode store.

Why this exists: most of today's robot-learning data is recorded and shared as LeRobot datasets. This module
reads such a folder into an episode store and writes an episode store as a folder that LeRobot's own
``LeRobotDataset`` loads unchanged. It was written from LeRobot's code (``lerobot/datasets/lerobot_dataset.py``,
``utils.py``, ``video_utils.py`` and the v2.1 -> v3.0 converter, lerobot 0.4.x to 0.6.x); no LeRobot code is
imported: only pyarrow (parquet) and PyAV (mp4).

The v3.0 layout::

    meta/info.json           codebase_version "v3.0", fps, features {name: {dtype, shape, names[, info]}},
                             total_episodes/frames/tasks, splits, chunks_size, data_path / video_path templates
    meta/stats.json          per feature: min, max, mean, std, count (images: per channel, in [0, 1], (C, 1, 1))
    meta/tasks.parquet       one row per task: the task text (the pandas index) and task_index
    meta/episodes/chunk-000/file-000.parquet
                             one row per episode: episode_index, tasks, length, data/chunk_index, data/file_index,
                             dataset_from_index, dataset_to_index, videos/<key>/{chunk_index, file_index,
                             from_timestamp, to_timestamp}, meta/episodes/{chunk_index, file_index}, stats/<f>/<s>
    data/chunk-XXX/file-YYY.parquet
                             one row per frame: every non-video feature, plus timestamp, frame_index,
                             episode_index, index, task_index
    videos/<key>/chunk-XXX/file-YYY.mp4
                             several episodes one after another; episode e's frames are at
                             from_timestamp + timestamp (LeRobot checks each within 1e-4 s)
    meta/robolearn.json      (ours; LeRobot ignores it) what restores robolearn's keys exactly on import

How robolearn keys map to LeRobot features (:func:`plan_export`)::

    robolearn key (role, dtype, shape)          LeRobot feature                     dtype, shape
    float32 obs of shape () or (d,)             observation.state, concatenated     float32, (sum of d,); names
                                                in schema order                     "key" / "key.i" per element
    uint8 obs image H x W x 3, H and W even     observation.images.<key>            video (h264 yuv420p mp4),
                                                                                    (H, W, 3)
    any other obs (float64, int, 2-D, odd-      observation.<key>                   same dtype, flattened:
    sized or non-RGB image, or --no-video)                                          (prod(shape),)
    the action key (or the one named action)    action (others: action.<key>)       same dtype, flattened
    reward (role reward)                        next.reward (others: next.<key>)    same dtype, (1,) for ()
    flag done / success                         next.done / next.success            same dtype, (1,) for ()
    anything else                               the key itself                      same dtype, flattened
    (no done flag in the store)                 next.done, True on each             bool, (1,)
                                                episode's last frame
    (a name LeRobot reserves or one taken)      robolearn.<key>

Every array round-trips bit for bit (concatenation and flattening are undone from ``meta/robolearn.json``);
images stored as video come back up to the codec's loss (:func:`psnr`). The store's fps, task, env_config,
schema, other root attributes and each episode's attributes (a ``robolearn/episode_attrs`` JSON column of the
episodes table) come back too; an import adds one per-episode attribute, ``import`` (format, folder, episode
index), and one root attribute, ``import`` (what resuming checks).

Reading a LeRobot dataset written by LeRobot (no ``meta/robolearn.json``): ``observation.state`` -> ``state``,
``observation.images.<cam>`` / ``observation.<name>`` -> ``<cam>`` / ``<name>`` (an image key that would collide
gets ``_image``), ``action`` -> ``action``, ``next.reward`` -> ``reward``, ``next.done`` -> ``done``, other names
with dots turned into underscores; shape (1,) features become per-step scalars; string features are skipped.
Each episode's LeRobot tasks go to its attributes (``tasks``), the dataset's to the root's ``lerobot`` entry.
Video frames are taken where LeRobot takes them, at ``from_timestamp + timestamp`` (within half a frame).

Both directions never leave half of a result: an export is written under ``.<OUT>.export-<pid>-<hex>`` beside
``OUT`` and renamed into place (with ``overwrite``, the old folder waits as ``.<OUT>.export-old-<pid>-<hex>``
until the new one is in place); an import appends whole episodes through :meth:`EpisodeStore.append_episode`,
so a killed import leaves a store of whole episodes that the next run of the same import continues. Bad input
is a :class:`LeRobotFormatError` naming the file and the feature. What the tables and the parquet schemas can
tell (a missing info.json, episodes table, data or video file; a column whose values per row disagree with
info.json's shape; an episode whose rows disagree with its length; an older format version) is found before
the output is created; what only decoding tells (a video frame of another size, an undecodable file) stops
the import at that episode, leaving the whole episodes before it.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from robolearn import __version__
from robolearn.data.schema import KeySpec, StoreError, schema_from_json, schema_to_json

__all__ = [
    "CODEBASE_VERSION", "DEFAULT_FEATURES", "LeRobotFormatError", "KeyMap", "export_lerobot", "import_lerobot",
    "plan_export", "plan_import", "psnr", "read_info", "LeRobotReader", "clean_export_leftovers",
]

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
ROBOLEARN_PATH = "meta/robolearn.json"
ROBOLEARN_FORMAT = 1
EPISODE_ATTRS_COLUMN = "robolearn/episode_attrs"

# LeRobot's defaults (lerobot/datasets/utils.py): files per chunk folder, and the sizes at which a data or
# video file is closed and the next one begun.
CHUNKS_SIZE = 1000
DATA_FILES_SIZE_IN_MB = 100
VIDEO_FILES_SIZE_IN_MB = 200

# Columns every LeRobot dataset has (its DEFAULT_FEATURES): structure, not data.
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}

# Video settings. LeRobot records with crf 30 and a keyframe every 2 frames (fast random access for training);
# we keep its GOP and spend more bits: at crf 18 rendered Push-T (96x96) and Lift (84x84) frames come back at
# 39 dB PSNR, against 39.6 / 43.2 dB at crf 0 (what the yuv420p conversion alone loses) and 35.7 / 31.2 dB at
# LeRobot's crf 30 (tools/bench/lerobot_psnr.py, tools/bench/results/lerobot_psnr.json).
DEFAULT_CRF = 18
DEFAULT_GOP = 2

# The converters LeRobot ships, by the release that moved them (the module path changed in lerobot 0.5.1).
V21_CONVERTER = ("python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id=<name> --root={root} "
                 "--push-to-hub=false  (lerobot >= 0.5.1; in lerobot 0.4.x the module is "
                 "lerobot.datasets.v30.convert_dataset_v21_to_v30 and --root is the folder that holds <name>)")


class LeRobotFormatError(StoreError):
    """A LeRobot folder that cannot be read or written as asked; the message names the file and the feature."""


# ------------------------------------------------------------------------------------------------ small helpers
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 arrays in dB (inf when equal): how close decoded frames are."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _require(module: str) -> Any:
    """An optional dependency of this format (the ``io`` extra), or one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        try:
            from robolearn.extras import DISTRIBUTION
        except ImportError:
            DISTRIBUTION = "robolearn"
        raise LeRobotFormatError(f"the LeRobot format needs the Python package {module.split('.')[0]!r}, which "
                                 f"does not import ({e}): pip install '{DISTRIBUTION}[io]'") from None


def _pa() -> Any:
    pa = _require("pyarrow")
    _require("pyarrow.parquet")
    return pa


def _av() -> Any:
    return _require("av")


def _fps_fraction(fps: float) -> Fraction:
    """The frame rate as an exact fraction (video time bases must be exact: LeRobot matches frames to 1e-4 s)."""
    return Fraction(str(float(fps))).limit_denominator(1_000_000)


def _whole(x: float) -> int | float:
    """A number for info.json: an int, as LeRobot writes fps and file sizes, whenever it is whole."""
    return int(x) if float(x).is_integer() else float(x)


_json_fps = _whole


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    """LeRobot's update_chunk_file_indices: files 0..chunks_size-1 per chunk folder."""
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ the key plan
@dataclass(frozen=True)
class KeyMap:
    """Where one robolearn key lives in a LeRobot dataset.

    ``kind``: ``"column"`` (a parquet column; ``start``/``stop`` when the key is a slice of a concatenated
    feature such as ``observation.state``), ``"video"`` (an mp4 feature) or ``"image"`` (PNG bytes in parquet,
    LeRobot's ``image`` dtype; read only).
    """

    key: str
    spec: KeySpec
    feature: str
    kind: str = "column"
    start: int | None = None
    stop: int | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.spec.shape, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"feature": self.feature, "kind": self.kind}
        if self.start is not None:
            d.update(start=self.start, stop=self.stop)
        return d


def _video_ok(spec: KeySpec) -> bool:
    """yuv420p h264 needs three channels and even sides; other images travel as exact uint8 arrays."""
    return spec.is_image and spec.shape[2] == 3 and spec.shape[0] % 2 == 0 and spec.shape[1] % 2 == 0


def plan_export(schema: Mapping[str, KeySpec], video: bool = True) -> tuple[dict[str, dict[str, Any]], list[KeyMap],
                                                                            list[str]]:
    """LeRobot features for a robolearn schema: ``(features, key maps, synthesized features)``.

    Features are listed data first (``observation.state``, images, other observations, ``action``, rewards and
    flags, the rest), then LeRobot's default columns, as LeRobot orders them.
    """
    maps: list[KeyMap] = []
    state_keys = [k for k, s in schema.items() if s.role == "obs" and s.dtype == "float32" and len(s.shape) <= 1]
    names: list[str] = []
    offset = 0
    for k in state_keys:
        spec = schema[k]
        n = int(np.prod(spec.shape, dtype=np.int64))
        maps.append(KeyMap(k, spec, "observation.state", "column", offset, offset + n))
        names += [k] if spec.shape == () else [f"{k}.{i}" for i in range(n)]
        offset += n
    actions = [k for k, s in schema.items() if s.role == "action"]
    taken = {"observation.state"} if state_keys else set()
    taken |= set(DEFAULT_FEATURES)
    wanted: list[tuple[str, str, str]] = []  # (key, feature name, kind)
    for k, spec in schema.items():
        if k in state_keys:
            continue
        if spec.role == "obs":
            if spec.is_image and video and _video_ok(spec):
                wanted.append((k, f"observation.images.{k}", "video"))
            else:
                wanted.append((k, f"observation.{k}", "column"))
        elif spec.role == "action":
            wanted.append((k, "action" if (len(actions) == 1 or k == "action") else f"action.{k}", "column"))
        elif spec.role == "reward":
            wanted.append((k, "next.reward" if k == "reward" else f"next.{k}", "column"))
        elif spec.role == "flag" and k in ("done", "success"):
            wanted.append((k, f"next.{k}", "column"))
        else:
            wanted.append((k, k, "column"))
    order = {"obs": 0, "action": 1, "reward": 2, "flag": 3, "other": 4}
    wanted.sort(key=lambda w: (order[schema[w[0]].role], w[2] != "video"))
    for k, name, kind in wanted:
        if name in taken or "/" in name:  # a name LeRobot reserves, or one another key took
            name = f"robolearn.{k}".replace("/", "_")
        if name in taken:
            raise LeRobotFormatError(f"cannot name key {k!r} as a LeRobot feature: {name!r} is taken")
        taken.add(name)
        maps.append(KeyMap(k, schema[k], name, kind))
    features: dict[str, dict[str, Any]] = {}
    if state_keys:
        features["observation.state"] = {"dtype": "float32", "shape": [offset], "names": names}
    for m in maps:
        if m.feature == "observation.state":
            continue
        if m.kind == "video":
            h, w, c = m.spec.shape
            features[m.feature] = {"dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"]}
        else:
            features[m.feature] = {"dtype": m.spec.dtype, "shape": [max(1, m.size)], "names": None}
    synthesized = []
    if "next.done" not in features:
        features["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
        synthesized.append("next.done")
    features.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
    return features, maps, synthesized


def _foreign_key(feature: str) -> str:
    if feature.startswith("observation.images."):
        return feature[len("observation.images."):].replace(".", "_")
    if feature.startswith("observation."):
        return feature[len("observation."):].replace(".", "_")
    return {"next.reward": "reward", "next.done": "done", "next.success": "success"}.get(
        feature, feature.replace(".", "_").replace("/", "_"))


def _foreign_role(feature: str) -> str:
    if feature.startswith("observation."):
        return "obs"
    if feature == "action" or feature.startswith("action."):
        return "action"
    if feature == "next.reward":
        return "reward"
    if feature in ("next.done", "next.success", "next.truncated", "next.terminated") or feature.startswith("is_"):
        return "flag"
    return "other"


def _image_shape(feature: str, ft: Mapping[str, Any], where: Path) -> tuple[int, int, int]:
    """H x W x C of a video/image feature; info.json may list it channels-first (names say so)."""
    shape = [int(s) for s in ft.get("shape") or []]
    names = [str(n).lower() for n in (ft.get("names") or [])] if isinstance(ft.get("names"), list) else []
    if len(shape) != 3:
        raise LeRobotFormatError(f"{where}: feature {feature!r} is an image but its shape is {shape} "
                                 "(expected height, width, channels)")
    if names and names[0] in ("channel", "channels", "c"):
        return shape[1], shape[2], shape[0]
    return shape[0], shape[1], shape[2]


def plan_import(info: Mapping[str, Any], meta: Mapping[str, Any] | None, root: Path,
                notes: list[str] | None = None) -> list[KeyMap]:
    """robolearn keys for a LeRobot folder: from ``meta/robolearn.json`` when the folder was written by
    robolearn (checked against info.json), else from info.json's feature names (see the module docstring)."""
    features = info["features"]
    info_path = root / INFO_PATH
    if meta is not None:
        try:
            return _plan_from_meta(features, meta, root)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LeRobotFormatError(f"{root / ROBOLEARN_PATH} is not what robolearn writes ({e!r})") from None
    maps = []
    used: set[str] = set()
    for name, ft in features.items():
        if name in DEFAULT_FEATURES:
            continue
        dtype = str(ft.get("dtype"))
        key = _foreign_key(name)
        if dtype in ("video", "image"):
            shape = _image_shape(name, ft, info_path)
            if shape[2] not in (1, 3):
                raise LeRobotFormatError(f"{info_path}: image feature {name!r} has {shape[2]} channels; robolearn "
                                         "reads 1 (gray) or 3 (RGB)")
            if key in used:
                key = f"{key}_image"
            spec = KeySpec(shape, "uint8", "obs")
            kind = dtype
        elif dtype in ("string", "str", "large_string"):
            if notes is not None:
                notes.append(f"feature {name!r} holds text: not imported")
            continue
        else:
            try:
                np.dtype(dtype)
            except TypeError:
                raise LeRobotFormatError(f"{info_path}: feature {name!r} has dtype {dtype!r}, which robolearn "
                                         "cannot store") from None
            shape = tuple(int(s) for s in ft.get("shape") or [1])
            spec = KeySpec(() if shape == (1,) else shape, dtype, _foreign_role(name))
            kind = "column"
        if key in used:
            raise LeRobotFormatError(f"{info_path}: features {name!r} and another both map to robolearn key "
                                     f"{key!r}")
        used.add(key)
        maps.append(KeyMap(key, spec, name, kind))
    if not maps:
        raise LeRobotFormatError(f"{info_path}: no feature to import (features: {', '.join(features)})")
    return maps


def _plan_from_meta(features: Mapping[str, Any], meta: Mapping[str, Any], root: Path) -> list[KeyMap]:
    """The key maps ``meta/robolearn.json`` records, each checked against info.json's feature."""
    info_path = root / INFO_PATH
    schema = schema_from_json(meta["schema"])
    maps = []
    for k, spec in schema.items():
        m = meta["keys"].get(k)
        if m is None:
            raise LeRobotFormatError(f"{root / ROBOLEARN_PATH}: key {k!r} of the schema has no entry in 'keys'")
        ft = features.get(m["feature"])
        if ft is None:
            raise LeRobotFormatError(f"{info_path}: feature {m['feature']!r} (robolearn key {k!r}, per "
                                     f"{ROBOLEARN_PATH}) is missing from info.json's features")
        km = KeyMap(k, spec, m["feature"], m.get("kind", "column"), m.get("start"), m.get("stop"))
        size = int(np.prod([int(s) for s in ft["shape"]], dtype=np.int64))
        if km.kind == "video":
            fits = tuple(_image_shape(km.feature, ft, info_path)) == spec.shape
        elif km.start is not None:
            fits = km.stop - km.start == km.size and 0 <= km.start and km.stop <= size
        else:
            fits = size == max(1, km.size)
        if not fits:
            raise LeRobotFormatError(f"{info_path}: feature {km.feature!r} has shape {list(ft['shape'])}, which "
                                     f"does not hold robolearn key {k!r} (shape {list(spec.shape)}, per "
                                     f"{ROBOLEARN_PATH})")
        maps.append(km)
    for name in {m.feature for m in maps if m.start is not None}:  # a concatenation must fill its feature
        size = int(np.prod([int(s) for s in features[name]["shape"]], dtype=np.int64))
        used = sorted((m.start, m.stop, m.key) for m in maps if m.feature == name)
        if sum(b - a for a, b, _ in used) != size or max(b for _, b, _ in used) != size:
            raise LeRobotFormatError(f"{info_path}: feature {name!r} has shape {list(features[name]['shape'])} "
                                     f"but {ROBOLEARN_PATH} makes it of keys " +
                                     ", ".join(f"{k!r} [{a}:{b}]" for a, b, k in used))
    return maps


# ------------------------------------------------------------------------------------------------ reading
def read_info(root: str | os.PathLike) -> dict[str, Any]:
    """``meta/info.json`` of a LeRobot folder, refusing any format but v3.0 with what to do instead."""
    root = Path(root)
    path = root / INFO_PATH
    if not root.is_dir():
        raise LeRobotFormatError(f"no LeRobot dataset at {root}: not a folder")
    if not path.is_file():
        legacy = (root / "meta" / "episodes.jsonl").is_file()
        hint = (" (it has meta/episodes.jsonl, as LeRobot's v2 folders do: convert it with " +
                V21_CONVERTER.format(root=root) + ")") if legacy else \
            " (a LeRobot v3.0 dataset has meta/info.json, meta/episodes/, data/ and, for cameras, videos/)"
        raise LeRobotFormatError(f"{path} is missing: {root} is not a LeRobot dataset{hint}")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LeRobotFormatError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(info, dict):
        raise LeRobotFormatError(f"{path} is not a JSON object")
    version = str(info.get("codebase_version", "unknown"))
    if version.startswith(("v1", "v2")):
        first = ("" if version == "v2.1" else
                 " first to v2.1 with lerobot 0.3.x (lerobot.datasets.v21.convert_dataset_v20_to_v21), then")
        raise LeRobotFormatError(
            f"{path}: codebase_version is {version!r}; robolearn reads LeRobot format v3.0 only (v2.1 keeps one "
            f"parquet file per episode, data/chunk-000/episode_000000.parquet). Convert the folder with "
            f"LeRobot's converter{first}: " + V21_CONVERTER.format(root=root))
    if not version.startswith("v3."):
        raise LeRobotFormatError(f"{path}: codebase_version is {version!r}; robolearn reads LeRobot format v3.0")
    for key in ("fps", "features", "data_path"):
        if key not in info:
            raise LeRobotFormatError(f"{path}: key {key!r} is missing")
    if not isinstance(info["features"], dict):
        raise LeRobotFormatError(f"{path}: 'features' is not an object")
    for name, ft in info["features"].items():
        if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
            raise LeRobotFormatError(f"{path}: feature {name!r} lacks a dtype or a shape")
    try:
        if not float(info["fps"]) > 0:
            raise ValueError
    except (TypeError, ValueError):
        raise LeRobotFormatError(f"{path}: fps is {info['fps']!r}, not a positive number") from None
    return info


def _read_parquet(path: Path, what: str, columns: Sequence[str] | None = None) -> Any:
    pa = _pa()
    if not path.is_file():
        raise LeRobotFormatError(f"{path} is missing ({what})")
    try:
        return pa.parquet.read_table(str(path), columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise LeRobotFormatError(f"{path} cannot be read as parquet ({what}): {e}") from None


@dataclass
class _Episode:
    index: int
    length: int
    tasks: list[str]
    data_file: Path
    videos: dict[str, tuple[Path, float]] = field(default_factory=dict)  # feature -> (mp4, from_timestamp)
    attrs: dict[str, Any] | None = None


def _read_episodes(root: Path, info: Mapping[str, Any], video_features: Sequence[str]) -> list[_Episode]:
    """meta/episodes/*/*.parquet, in episode order, with each episode's data file and video files resolved."""
    folder = root / EPISODES_DIR
    files = sorted(Path(p) for p in glob.glob(str(folder / "*" / "*.parquet")))
    if not files:
        raise LeRobotFormatError(f"{folder} holds no episodes table (expected "
                                 f"{EPISODES_PATH.format(chunk_index=0, file_index=0)})")
    need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    need += [c.format(key=v) for v in video_features
             for c in ("videos/{key}/chunk_index", "videos/{key}/file_index", "videos/{key}/from_timestamp")]
    rows: list[dict[str, Any]] = []
    for f in files:
        names = set(_schema_names(f))
        missing = [c for c in need if c not in names]
        if missing:
            raise LeRobotFormatError(f"{f}: column {missing[0]!r} is missing from the episodes table")
        optional = [c for c in ("tasks", EPISODE_ATTRS_COLUMN) if c in names]
        rows += _read_parquet(f, "episodes table", need + optional).to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    indices = [r["episode_index"] for r in rows]
    if len(set(indices)) != len(indices):
        dup = next(i for i in indices if indices.count(i) > 1)
        raise LeRobotFormatError(f"{folder}: episode {dup} is listed twice")
    data_tpl, video_tpl = str(info["data_path"]), info.get("video_path")
    if video_features and not video_tpl:
        raise LeRobotFormatError(f"{root / INFO_PATH}: video features ({', '.join(video_features)}) but no "
                                 "video_path")
    out = []
    for r in rows:
        e = int(r["episode_index"])
        try:
            data_file = root / data_tpl.format(chunk_index=int(r["data/chunk_index"]),
                                               file_index=int(r["data/file_index"]))
            videos = {v: (root / str(video_tpl).format(video_key=v, chunk_index=int(r[f"videos/{v}/chunk_index"]),
                                                       file_index=int(r[f"videos/{v}/file_index"])),
                          float(r[f"videos/{v}/from_timestamp"])) for v in video_features}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise LeRobotFormatError(f"{folder}: episode {e}'s files cannot be located with info.json's "
                                     f"data_path/video_path ({err!r})") from None
        attrs = None
        if r.get(EPISODE_ATTRS_COLUMN) is not None:
            try:
                attrs = json.loads(r[EPISODE_ATTRS_COLUMN])
            except ValueError:
                raise LeRobotFormatError(f"{folder}: episode {e}'s {EPISODE_ATTRS_COLUMN} is not JSON") from None
        out.append(_Episode(e, int(r["length"]), [str(t) for t in (r.get("tasks") or [])], data_file, videos, attrs))
    return out


def _schema_names(path: Path) -> list[str]:
    pa = _pa()
    if not path.is_file():
        raise LeRobotFormatError(f"{path} is missing")
    try:
        return list(pa.parquet.read_schema(str(path)).names)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise LeRobotFormatError(f"{path} cannot be read as parquet: {e}") from None


def _flat_values(col: Any, rows: int, per_row: int, dtype: str, path: Path, feature: str, shape: Any) -> np.ndarray:
    """A parquet column as a (rows, per_row) array of ``dtype``; a column whose rows hold another number of
    values than info.json's shape says is refused, naming the file and the feature."""
    pa = _pa()
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if arr.null_count:
        raise LeRobotFormatError(f"{path}: feature {feature!r} has {arr.null_count} empty (null) rows")
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            found = arr.type.list_size
        else:
            lengths = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False))
            found = int(lengths[0]) if len(lengths) and (lengths == lengths[0]).all() else None
        arr = arr.flatten()
        if found is None:
            raise LeRobotFormatError(f"{path}: feature {feature!r} has rows of different lengths; info.json says "
                                     f"shape {list(shape)}")
    values = arr.to_numpy(zero_copy_only=False)
    if values.size != rows * per_row:
        got = values.size // rows if rows else 0
        raise LeRobotFormatError(f"{path}: feature {feature!r} holds {got} value(s) per row but info.json says "
                                 f"shape {list(shape)} ({per_row} value(s))")
    try:
        return values.astype(dtype, copy=False).reshape(rows, per_row)
    except (TypeError, ValueError) as e:
        raise LeRobotFormatError(f"{path}: feature {feature!r} cannot be read as {dtype} ({e})") from None


def _check_data_file(path: Path, maps: Sequence[KeyMap], features: Mapping[str, Any]) -> np.ndarray:
    """Check one data file against info.json without reading its data (column presence and, from the parquet
    schema, values per row; a variable-length list column is read to count); returns its episode_index column."""
    pa = _pa()
    try:
        schema = pa.parquet.read_schema(str(path))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise LeRobotFormatError(f"{path} cannot be read as parquet: {e}") from None
    wanted = sorted({m.feature for m in maps if m.kind in ("column", "image")})
    for c in ["episode_index", "frame_index", *wanted]:
        if c not in schema.names:
            raise LeRobotFormatError(f"{path}: column {c!r} is missing" +
                                     (f" (info.json lists feature {c!r})" if c in features else ""))
    table = _read_parquet(path, "data", ["episode_index"])
    for name in wanted:
        ft = features[name]
        typ = schema.field(name).type
        if ft["dtype"] == "image":
            if not pa.types.is_struct(typ) or typ.get_field_index("bytes") < 0:
                raise LeRobotFormatError(f"{path}: image feature {name!r} is not a struct with 'bytes'")
            continue
        per_row = int(np.prod([int(s) for s in ft["shape"]], dtype=np.int64))
        found = 1
        while pa.types.is_fixed_size_list(typ):
            found *= typ.list_size
            typ = typ.value_type
        if pa.types.is_list(typ) or pa.types.is_large_list(typ):  # sizes only in the data: count them
            _flat_values(_read_parquet(path, "data", [name]).column(name), table.num_rows, per_row,
                         str(ft["dtype"]), path, name, ft["shape"])
        elif found != per_row:
            raise LeRobotFormatError(f"{path}: feature {name!r} holds {found} value(s) per row but info.json says "
                                     f"shape {list(ft['shape'])} ({per_row} value(s))")
    return np.asarray(table.column("episode_index").to_numpy(), np.int64)


class _DataFile:
    """One data parquet file's columns, loaded once, sliced per episode."""

    def __init__(self, path: Path, maps: Sequence[KeyMap], features: Mapping[str, Any]) -> None:
        pa = _pa()
        self.path = path
        wanted = sorted({m.feature for m in maps if m.kind in ("column", "image")})
        names = set(_schema_names(path))
        for c in ["episode_index", "frame_index", *wanted]:
            if c not in names:
                raise LeRobotFormatError(f"{path}: column {c!r} is missing")
        extra = ["timestamp"] if "timestamp" in names else []
        table = _read_parquet(path, "data", ["episode_index", "frame_index", *extra, *wanted])
        n = table.num_rows
        self.episode = np.asarray(table.column("episode_index").to_numpy(), np.int64)
        self.frame = np.asarray(table.column("frame_index").to_numpy(), np.int64)
        # Where LeRobot looks for each frame in a video: from_timestamp + this row's timestamp.
        self.timestamp = np.asarray(table.column("timestamp").to_numpy(), np.float64) if extra else None
        self.values: dict[str, Any] = {}
        for name in wanted:
            ft = features[name]
            if ft["dtype"] == "image":
                col = table.column(name).combine_chunks()
                if not pa.types.is_struct(col.type) or col.type.get_field_index("bytes") < 0:
                    raise LeRobotFormatError(f"{path}: image feature {name!r} is not a struct with 'bytes'")
                self.values[name] = col.field("bytes").to_pylist()
                continue
            per_row = int(np.prod([int(s) for s in ft["shape"]], dtype=np.int64))
            self.values[name] = _flat_values(table.column(name), n, per_row, str(ft["dtype"]), path, name,
                                             ft["shape"])

    def rows(self, episode: int) -> np.ndarray:
        idx = np.nonzero(self.episode == episode)[0]
        return idx[np.argsort(self.frame[idx], kind="stable")]


class _Mp4Reader:
    """Frames of one mp4 at given times, decoding forward from where the last read stopped (episodes of a file
    are read in order, so a whole import decodes each file once)."""

    def __init__(self, path: Path, feature: str, shape: tuple[int, ...]) -> None:
        self.path, self.feature, self.shape = path, feature, tuple(shape)
        self._container: Any = None
        self._frames: Iterator[Any] | None = None
        self._pending: tuple[float, Any] | None = None
        self._last = -math.inf

    def _open(self, seek_s: float) -> None:
        av = _av()
        self.close()
        if not self.path.is_file():
            raise LeRobotFormatError(f"{self.path} is missing (video of feature {self.feature!r})")
        try:
            self._container = av.open(str(self.path))
            stream = self._container.streams.video[0]
            stream.thread_type = "AUTO"
            if seek_s > 0:
                self._container.seek(max(0, int(seek_s / stream.time_base) - 1), stream=stream, backward=True)
            self._tb = stream.time_base
            self._frames = self._container.decode(stream)
            self._last = -math.inf
        except (IndexError, av.FFmpegError, OSError) as e:
            self.close()
            raise LeRobotFormatError(f"{self.path} cannot be read as a video (feature {self.feature!r}): {e}") from None
        self._pending = None

    def _next(self) -> tuple[float, Any] | None:
        av = _av()
        if self._pending is not None:
            f, self._pending = self._pending, None
            return f
        assert self._frames is not None
        try:
            frame = next(self._frames)
        except StopIteration:
            return None
        except (av.FFmpegError, OSError) as e:
            raise LeRobotFormatError(f"{self.path} does not decode (feature {self.feature!r}): {e}") from None
        return float(frame.pts * self._tb), frame

    def read(self, times: np.ndarray, fps: float, episode: int) -> np.ndarray:
        h, w, c = self.shape
        out = np.empty((len(times), h, w, c), np.uint8)
        if len(times) == 0:
            return out
        tol = 0.5 / fps
        if self._container is None or float(times[0]) < self._last - tol:
            self._open(float(times[0]))
        for i, t in enumerate(times):
            while True:
                got = self._next()
                if got is None:
                    raise LeRobotFormatError(f"{self.path} ends before {t:.4f} s, frame {i} of episode {episode} "
                                             f"(feature {self.feature!r})")
                ft, frame = got
                if ft < t - tol:
                    continue
                if ft > t + tol:
                    self._pending = got
                    raise LeRobotFormatError(f"{self.path} has no frame at {t:.4f} s (frame {i} of episode "
                                             f"{episode}, feature {self.feature!r}; the next is at {ft:.4f} s)")
                if (frame.height, frame.width) != (h, w):
                    raise LeRobotFormatError(f"{self.path}: frames are {frame.height}x{frame.width} but info.json "
                                             f"gives feature {self.feature!r} {h}x{w}")
                # (reformat, then to_ndarray: the same pixels as to_ndarray(format=...), 80x faster in PyAV 18)
                out[i] = frame.reformat(format="rgb24" if c == 3 else "gray").to_ndarray().reshape(h, w, c)
                self._last = ft
                break
        return out

    def close(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
        self._container = None
        self._frames = None


def _decode_png(data: bytes, path: Path, feature: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        import io

        from PIL import Image
    except ImportError:  # pragma: no cover
        raise LeRobotFormatError(f"{path}: feature {feature!r} is stored as PNG images; reading them needs "
                                 "Pillow (pip install pillow)") from None
    try:
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB" if shape[2] == 3 else "L"))
    except Exception as e:  # noqa: BLE001 - any undecodable image is named
        raise LeRobotFormatError(f"{path}: an image of feature {feature!r} does not decode ({e})") from None
    img = img.reshape(img.shape[0], img.shape[1], -1)
    if img.shape != shape:
        raise LeRobotFormatError(f"{path}: an image of feature {feature!r} is {list(img.shape)}, info.json says "
                                 f"{list(shape)}")
    return img


class LeRobotReader:
    """A LeRobot v3.0 folder, checked whole on opening (every file the episodes need exists, every data
    column has the size info.json gives), then read episode by episode as robolearn arrays."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve() if Path(root).exists() else Path(root)
        self.info = read_info(self.root)
        self.features: dict[str, Any] = self.info["features"]
        self.fps = float(self.info["fps"])
        meta_path = self.root / ROBOLEARN_PATH
        self.meta: dict[str, Any] | None = None
        if meta_path.is_file():
            try:
                self.meta = json.loads(meta_path.read_text())
            except ValueError as e:
                raise LeRobotFormatError(f"{meta_path} cannot be read as JSON ({e})") from None
            if int(self.meta.get("format", 0)) > ROBOLEARN_FORMAT:
                raise LeRobotFormatError(f"{meta_path} has format {self.meta.get('format')}, newer than this "
                                         f"robolearn reads ({ROBOLEARN_FORMAT}): update robolearn")
        self.notes: list[str] = []
        self.maps = plan_import(self.info, self.meta, self.root, self.notes)
        self.schema = {m.key: m.spec for m in self.maps}
        self.video_features = [m.feature for m in self.maps if m.kind == "video"]
        self.episodes = _read_episodes(self.root, self.info, self.video_features)
        self._check_files()
        self._data: _DataFile | None = None
        self._videos: dict[str, _Mp4Reader] = {}
        self.info_sha256 = _sha256(self.root / INFO_PATH)

    def _check_files(self) -> None:
        """Every file referenced exists and every data column has the size info.json says: checked before
        anything is written, so bad input never leaves a store behind."""
        by_file: dict[Path, list[int]] = {}
        for ep in self.episodes:
            if ep.length <= 0:
                raise LeRobotFormatError(f"{self.root / EPISODES_DIR}: episode {ep.index} has length {ep.length}; "
                                         "an episode store holds no empty episodes")
            by_file.setdefault(ep.data_file, []).append(ep.index)
            for feature, (mp4, _) in ep.videos.items():
                if not mp4.is_file():
                    raise LeRobotFormatError(f"{mp4} is missing (video of feature {feature!r}, needed by episode "
                                             f"{ep.index})")
        for path, eps in by_file.items():
            if not path.is_file():
                raise LeRobotFormatError(f"{path} is missing (data of episode{'s' if len(eps) > 1 else ''} "
                                         f"{_span(eps)}, per {self.root / EPISODES_DIR})")
        lengths = {ep.index: ep.length for ep in self.episodes}
        for path, eps in by_file.items():
            episode = _check_data_file(path, self.maps, self.features)
            counts = np.bincount(episode[np.isin(episode, eps)], minlength=max(eps) + 1)
            for e in eps:
                if int(counts[e]) != lengths[e]:
                    raise LeRobotFormatError(f"{path} holds {int(counts[e])} rows of episode {e} but "
                                             f"{self.root / EPISODES_DIR} gives it length {lengths[e]}")

    def read_episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode ``i`` (position in episode order) as robolearn arrays."""
        ep = self.episodes[i]
        if self._data is None or self._data.path != ep.data_file:
            self._data = _DataFile(ep.data_file, self.maps, self.features)
        data = self._data
        rows = data.rows(ep.index)
        out: dict[str, np.ndarray] = {}
        times = data.timestamp[rows] if data.timestamp is not None else data.frame[rows] / self.fps
        for m in self.maps:
            if m.kind == "video":
                mp4, start = ep.videos[m.feature]
                reader = self._videos.get(m.feature)
                if reader is None or reader.path != mp4:
                    if reader is not None:
                        reader.close()
                    reader = self._videos[m.feature] = _Mp4Reader(mp4, m.feature, m.spec.shape)
                out[m.key] = reader.read(start + times, self.fps, ep.index)
            elif m.kind == "image":
                blobs = data.values[m.feature]
                out[m.key] = np.stack([_decode_png(blobs[r], data.path, m.feature, m.spec.shape) for r in rows]) \
                    if len(rows) else np.zeros((0, *m.spec.shape), np.uint8)
            else:
                vals = data.values[m.feature][rows]
                if m.start is not None:
                    vals = vals[:, m.start:m.stop]
                vals = vals.astype(m.spec.dtype, copy=False).reshape(len(rows), *m.spec.shape)
                out[m.key] = np.ascontiguousarray(vals)
        return out

    def close(self) -> None:
        for r in self._videos.values():
            r.close()
        self._videos.clear()
        self._data = None


def _span(eps: Sequence[int]) -> str:
    eps = sorted(eps)
    return str(eps[0]) if len(eps) == 1 else f"{eps[0]}-{eps[-1]}" if eps == list(range(eps[0], eps[-1] + 1)) \
        else ", ".join(map(str, eps[:8])) + (" ..." if len(eps) > 8 else "")


# ------------------------------------------------------------------------------------------------ import
def import_lerobot(source: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   task: str | None = None, progress: Callable[[int, int], Any] | None = None,
                   on_note: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Import a LeRobot v3.0 folder into a new episode store at ``out``, episode by episode (each appended
    whole); a store left by an interrupted import of the same folder is continued. ``progress(done, total)``
    is called after each episode. Returns a summary."""
    from robolearn.data.store import EpisodeStore

    reader = LeRobotReader(source)
    note = on_note or (lambda s: None)
    for n in reader.notes:
        note(n)
    src = str(reader.root)
    total = len(reader.episodes)
    meta = reader.meta
    mark = {"format": "lerobot", "path": src, "info_sha256": reader.info_sha256, "episodes": total}
    out = Path(out)
    try:
        start = 0
        store = None
        if (out.exists() or out.is_symlink()) and not overwrite:
            try:
                store = EpisodeStore.open(out, mode="a")
            except StoreError as e:
                raise LeRobotFormatError(f"{out} already exists and is not an unfinished import of {src} ({e}): "
                                         f"pass --overwrite to replace it, or give another --out") from None
            prev = store.attrs.get("import")
            if not (isinstance(prev, dict) and prev.get("format") == "lerobot"
                    and prev.get("info_sha256") == reader.info_sha256 and prev.get("episodes") == total):
                store.close()
                raise LeRobotFormatError(f"{out} already exists and is not an unfinished import of {src}: pass "
                                         f"--overwrite to replace it, or give another --out")
            start = store.n_episodes
            if start:
                last = store.episode_attrs(start - 1).get("import", {})
                if start > total or last.get("episode_index") != reader.episodes[start - 1].index:
                    store.close()
                    raise LeRobotFormatError(f"{out} holds {start} episodes but its last one is not episode "
                                             f"{reader.episodes[start - 1].index} of {src}: pass --overwrite")
            if start:
                note(f"{out} holds {start} of {total} episodes of {src}: continuing")
        if store is None:
            if meta is not None:
                root_attrs = dict(meta.get("root_attrs") or {})
                fps = meta.get("fps") if meta.get("fps") is not None else reader.fps
                store_task = task if task is not None else meta.get("task")
                env_config = dict(meta.get("env_config") or {})
            else:
                tasks = _task_texts(reader)
                root_attrs = {"source": {"kind": "lerobot", "dataset": src},
                              "lerobot": {"codebase_version": reader.info.get("codebase_version"),
                                          "robot_type": reader.info.get("robot_type"), "tasks": tasks,
                                          "features": {k: {kk: vv for kk, vv in v.items() if kk != "info"}
                                                       for k, v in reader.features.items()}}}
                fps, store_task, env_config = reader.fps, task, {}
            root_attrs["import"] = mark
            store = EpisodeStore.create(out, reader.schema, fps=fps, task=store_task, env_config=env_config,
                                        attrs=root_attrs, overwrite=overwrite)
        with store:
            for i in range(start, total):
                ep = reader.episodes[i]
                arrays = reader.read_episode(i)
                if meta is not None and ep.attrs is not None:
                    attrs = dict(ep.attrs)
                elif meta is not None:
                    attrs = {}
                else:
                    attrs = {"source": "lerobot", "tasks": ep.tasks}
                attrs["import"] = {"format": "lerobot", "path": src, "episode_index": ep.index}
                store.append_episode(arrays, attrs=attrs)
                if progress is not None:
                    progress(i + 1, total)
            summary = {"out": str(store.path), "source": src, "episodes": store.n_episodes, "steps": store.n_steps,
                       "imported": total - start, "resumed_from": start, "fps": store.fps, "task": store.task,
                       "written_by": "robolearn" if meta is not None else "lerobot",
                       "keys": {m.key: {"feature": m.feature, "shape": list(m.spec.shape), "dtype": m.spec.dtype,
                                        "role": m.spec.role} for m in reader.maps},
                       "notes": list(reader.notes)}
    finally:
        reader.close()
    return summary


def _task_texts(reader: LeRobotReader) -> list[str]:
    """Task texts in task_index order, from meta/tasks.parquet (its pandas index) or, without it, the episodes."""
    path = reader.root / TASKS_PATH
    if path.is_file():
        table = _read_parquet(path, "tasks")
        meta = table.schema.metadata or {}
        index_cols: list[str] = []
        with contextlib.suppress(Exception):
            index_cols = [c for c in json.loads(meta[b"pandas"])["index_columns"] if isinstance(c, str)]
        text_col = next((c for c in ["task", *index_cols, "__index_level_0__"] if c in table.column_names), None)
        if text_col is not None and "task_index" in table.column_names:
            pairs = sorted(zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist()))
            return [str(t) for _, t in pairs]
    seen: dict[str, None] = {}
    for ep in reader.episodes:
        for t in ep.tasks:
            seen.setdefault(t, None)
    return list(seen)


# ------------------------------------------------------------------------------------------------ writing
class _Mp4Writer:
    """One mp4 of a video feature: h264 (libx264), yuv420p, a keyframe every ``gop`` frames, frames at
    pts = frame number in a 1/fps time base (so frame k of the file is at exactly k / fps seconds)."""

    def __init__(self, path: Path, height: int, width: int, fps: float, crf: int, gop: int) -> None:
        av = _av()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.frames = 0
        self.bytes = 0
        self._container = av.open(str(path), mode="w")
        try:
            self._stream = self._container.add_stream("libx264", rate=_fps_fraction(fps),
                                                      options={"crf": str(int(crf)), "g": str(int(gop))})
        except (av.FFmpegError, ValueError) as e:  # pragma: no cover - PyAV's wheels ship libx264
            self._container.close()
            raise LeRobotFormatError(f"cannot write {path}: this PyAV has no h264 encoder ({e})") from None
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._av = av

    def write(self, frames: np.ndarray) -> None:
        for img in frames:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            for packet in self._stream.encode(frame):
                self.bytes += packet.size
                self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode(None):
            self.bytes += packet.size
            self._container.mux(packet)
        self._container.close()


class _Moments:
    """Mergeable per-dimension count / mean / M2 / min / max (Chan's update), for stats.json."""

    def __init__(self) -> None:
        self.n = 0.0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    @classmethod
    def of(cls, x: np.ndarray, axes: tuple[int, ...]) -> "_Moments":
        m = cls()
        x = x.astype(np.float64, copy=False)
        m.n = float(np.prod([x.shape[a] for a in axes]))
        if m.n:
            m.mean = x.mean(axis=axes)
            m.m2 = ((x - np.expand_dims(m.mean, axes)) ** 2).sum(axis=axes)
            m.min, m.max = x.min(axis=axes), x.max(axis=axes)
        return m

    def merge(self, o: "_Moments") -> None:
        if not o.n:
            return
        if not self.n:
            self.n, self.mean, self.m2, self.min, self.max = o.n, o.mean, o.m2, o.min, o.max
            return
        n = self.n + o.n
        delta = o.mean - self.mean
        self.mean = self.mean + delta * o.n / n
        self.m2 = self.m2 + o.m2 + delta**2 * self.n * o.n / n
        self.min, self.max = np.minimum(self.min, o.min), np.maximum(self.max, o.max)
        self.n = n

    def to_json(self, image: bool, frames: int) -> dict[str, Any]:
        """LeRobot's stats entry: images per channel in [0, 1], shaped (C, 1, 1); count = frames."""
        scale = 255.0 if image else 1.0
        std = np.sqrt(np.maximum(self.m2 / max(self.n, 1.0), 0.0))
        out = {"min": self.min / scale, "max": self.max / scale, "mean": self.mean / scale, "std": std / scale}
        shaped = {k: (v.reshape(-1, 1, 1) if image else v.reshape(-1)).tolist() for k, v in out.items()}
        shaped["count"] = [int(frames)]
        return shaped


def _arrow_column(values: np.ndarray, per_row: int, scalar: bool) -> Any:
    """A (rows, per_row) array as LeRobot's parquet type: a plain column for shape (1,), else a fixed-size list
    (what ``datasets.Sequence(length=d)`` writes)."""
    pa = _pa()
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return flat if scalar else pa.FixedSizeListArray.from_arrays(flat, per_row)


def _tasks_table(tasks: Sequence[str]) -> Any:
    """meta/tasks.parquet as pandas writes ``DataFrame({"task_index": ...}, index=tasks)``: LeRobot reads it
    with ``pd.read_parquet`` and takes each task's text from the index."""
    pa = _pa()
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema([("task_index", pa.int64()), ("__index_level_0__", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    return pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                     "__index_level_0__": pa.array(list(tasks), pa.string())}, schema=schema)


def _hidden(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_export_leftovers(out: str | os.PathLike) -> list[str]:
    """What a killed export left beside ``out``: its unfinished folder (removed) and, when it was replacing
    ``out`` and died between the two renames, the old folder (renamed back). Folders of a live export stay."""
    out = Path(out)
    notes = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(export|export-old)-(\d+)-[0-9a-f]{{8}}$")
    if not out.parent.is_dir():
        return notes
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "export-old" and not (out.exists() or out.is_symlink()):
            os.rename(p, out)
            notes.append(f"put back {out} from {p.name}, left by an export that died while replacing it")
        else:
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p.name}, left by an export that died")
    return notes


def export_lerobot(store: Any, out: str | os.PathLike, *, overwrite: bool = False, task_text: str | None = None,
                   fps: float | None = None, video: bool = True, crf: int = DEFAULT_CRF, gop: int = DEFAULT_GOP,
                   robot_type: str | None = None, data_file_mb: float = DATA_FILES_SIZE_IN_MB,
                   video_file_mb: float = VIDEO_FILES_SIZE_IN_MB,
                   progress: Callable[[int, int], Any] | None = None) -> dict[str, Any]:
    """Write an open :class:`EpisodeStore` as a LeRobot v3.0 folder at ``out`` (see the module docstring for
    the mapping). ``video=False`` keeps images as exact uint8 arrays instead of mp4. A data (video) file is
    closed and the next begun once it holds about ``data_file_mb`` (``video_file_mb``) megabytes, LeRobot's
    ``data_files_size_in_mb`` / ``video_files_size_in_mb``. Written under a hidden name and renamed into
    place: ``out`` is either absent, the old folder, or the whole new one."""
    out = Path(out)
    if store.n_episodes == 0:
        raise LeRobotFormatError(f"{store.path} holds no episodes: nothing to export")
    fps = float(fps if fps is not None else (store.fps or 0))
    if not fps > 0:
        raise LeRobotFormatError(f"{store.path} records no fps (it was written by another tool): pass --fps")
    if not 0 <= int(crf) <= 51 or int(gop) < 1 or not data_file_mb > 0 or not video_file_mb > 0:
        raise LeRobotFormatError(f"crf must be in [0, 51], gop >= 1 and file sizes > 0 (got crf={crf}, gop={gop}, "
                                 f"data_file_mb={data_file_mb}, video_file_mb={video_file_mb})")
    clean_export_leftovers(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise LeRobotFormatError(f"{out} already exists: pass --overwrite to replace it, or give another --out")
    features, maps, synthesized = plan_export(store.schema, video=video)
    task = task_text or store.task or "unknown task"
    tmp = _hidden(out, "export")
    tmp.mkdir(parents=True)
    try:
        _write(store, tmp, features, maps, synthesized, fps, task, crf, gop, robot_type,
               (float(data_file_mb), float(video_file_mb)), progress)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise LeRobotFormatError(f"{out} appeared while the export was being written: pass --overwrite")
            old = _hidden(out, "export-old")
            os.rename(out, old)
            os.rename(tmp, out)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": str(out), "store": str(store.path), "episodes": store.n_episodes, "frames": store.n_steps,
            "fps": _json_fps(fps), "task": task, "size_bytes": size,
            "features": {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in features.items()},
            "keys": {m.key: m.feature for m in maps}, "synthesized": synthesized,
            "video": {"codec": "h264", "pix_fmt": "yuv420p", "crf": int(crf), "g": int(gop)} if any(
                m.kind == "video" for m in maps) else None}


def _write(store: Any, root: Path, features: dict[str, dict[str, Any]], maps: list[KeyMap], synthesized: list[str],
           fps: float, task: str, crf: int, gop: int, robot_type: str | None, sizes_mb: tuple[float, float],
           progress: Callable[[int, int], Any] | None) -> None:
    pa = _pa()
    n_eps = store.n_episodes
    columns = [f for f, ft in features.items() if ft["dtype"] != "video"]
    by_feature: dict[str, list[KeyMap]] = {}
    for m in maps:
        by_feature.setdefault(m.feature, []).append(m)
    video_maps = [m for m in maps if m.kind == "video"]
    row_bytes = sum(np.dtype(features[c]["dtype"]).itemsize * int(features[c]["shape"][0]) for c in columns)
    limit = sizes_mb[0] * 1024 * 1024
    vlimit = sizes_mb[1] * 1024 * 1024

    data_loc = (0, 0)
    data_rows = 0
    buffer: dict[str, list[np.ndarray]] = {c: [] for c in columns}

    def flush() -> None:
        nonlocal data_rows
        if not data_rows:
            return
        arrays = {}
        for c in columns:
            ft = features[c]
            per_row = int(ft["shape"][0])
            arrays[c] = _arrow_column(np.concatenate(buffer[c]), per_row, scalar=per_row == 1)
            buffer[c] = []
        path = root / DATA_PATH.format(chunk_index=data_loc[0], file_index=data_loc[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        pa.parquet.write_table(pa.table(arrays), str(path), compression="snappy")
        data_rows = 0

    writers: dict[str, _Mp4Writer] = {}
    video_loc = {m.feature: (0, 0) for m in video_maps}
    stats = {f: _Moments() for f in features}
    episode_rows: list[dict[str, Any]] = []
    all_attrs = store.all_episode_attrs()
    global_index = 0
    try:
        for e in range(n_eps):
            ep = store.get_episode(e)
            n = len(next(iter(ep.values())))
            cols: dict[str, np.ndarray] = {}
            for feature, ms in by_feature.items():
                if ms[0].kind == "video":
                    continue
                if feature == "observation.state":
                    cols[feature] = np.concatenate([ep[m.key].reshape(n, -1) for m in ms], axis=1)
                else:
                    cols[feature] = ep[ms[0].key].reshape(n, -1)
            if "next.done" in synthesized:
                done = np.zeros((n, 1), bool)
                if n:
                    done[-1] = True
                cols["next.done"] = done
            cols["timestamp"] = (np.arange(n, dtype=np.float64) / fps).astype(np.float32).reshape(n, 1)
            cols["frame_index"] = np.arange(n, dtype=np.int64).reshape(n, 1)
            cols["episode_index"] = np.full((n, 1), e, np.int64)
            cols["index"] = np.arange(global_index, global_index + n, dtype=np.int64).reshape(n, 1)
            cols["task_index"] = np.zeros((n, 1), np.int64)
            if data_rows and (data_rows + n) * row_bytes >= limit:
                flush()
                data_loc = _next_file(*data_loc)
            for c in columns:
                buffer[c].append(cols[c])
            data_rows += n
            row: dict[str, Any] = {
                "episode_index": e, "tasks": [task], "length": n,
                "data/chunk_index": data_loc[0], "data/file_index": data_loc[1],
                "dataset_from_index": global_index, "dataset_to_index": global_index + n,
            }
            ep_stats: dict[str, dict[str, Any]] = {}
            for c in columns:
                m = _Moments.of(cols[c].astype(np.float64), (0,))
                stats[c].merge(m)
                ep_stats[c] = m.to_json(False, n)
            for vm in video_maps:
                f = vm.feature
                w = writers.get(f)
                if w is not None and w.bytes >= vlimit:
                    w.close()
                    del writers[f]
                    video_loc[f] = _next_file(*video_loc[f])
                    w = None
                if w is None:
                    w = writers[f] = _Mp4Writer(root / VIDEO_PATH.format(video_key=f, chunk_index=video_loc[f][0],
                                                                         file_index=video_loc[f][1]),
                                                vm.spec.shape[0], vm.spec.shape[1], fps, crf, gop)
                start = w.frames
                w.write(ep[vm.key])
                row[f"videos/{f}/chunk_index"], row[f"videos/{f}/file_index"] = video_loc[f]
                row[f"videos/{f}/from_timestamp"] = start / fps
                row[f"videos/{f}/to_timestamp"] = (start + n) / fps
                m = _Moments.of(ep[vm.key], (0, 1, 2))
                stats[f].merge(m)
                ep_stats[f] = m.to_json(True, n)
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = 0, 0
            for f, s in ep_stats.items():
                for name, v in s.items():
                    row[f"stats/{f}/{name}"] = v
            row[EPISODE_ATTRS_COLUMN] = json.dumps(all_attrs[e] if e < len(all_attrs) else {})
            episode_rows.append(row)
            global_index += n
            if progress is not None:
                progress(e + 1, n_eps)
        flush()
    finally:
        for w in writers.values():
            w.close()
    # Tables and metadata, after the data: a folder without meta/info.json is not a dataset.
    ep_path = root / EPISODES_PATH.format(chunk_index=0, file_index=0)
    ep_path.parent.mkdir(parents=True, exist_ok=True)
    pa.parquet.write_table(pa.Table.from_pylist(episode_rows), str(ep_path), compression="snappy")
    pa.parquet.write_table(_tasks_table([task]), str(root / TASKS_PATH))
    frames = global_index
    stats_json = {f: s.to_json(features[f]["dtype"] == "video", frames) for f, s in stats.items() if s.n}
    (root / STATS_PATH).write_text(json.dumps(stats_json, indent=4))
    info_features = {}
    for f, ft in features.items():
        ft = dict(ft)
        if ft["dtype"] == "video":
            h, w, c = ft["shape"]
            ft["info"] = {"video.height": h, "video.width": w, "video.codec": "h264", "video.pix_fmt": "yuv420p",
                          "video.is_depth_map": False, "video.fps": _json_fps(fps), "video.channels": c,
                          "has_audio": False}
        else:
            ft["fps"] = _json_fps(fps)
        info_features[f] = ft
    info = {
        "codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": n_eps,
        "total_frames": frames, "total_tasks": 1, "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": _whole(sizes_mb[0]), "video_files_size_in_mb": _whole(sizes_mb[1]),
        "fps": _json_fps(fps), "splits": {"train": f"0:{n_eps}"}, "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if video_maps else None, "features": info_features,
    }
    root_attrs = {k: v for k, v in store.attrs.items() if k not in ("robolearn", "fps", "task", "env_config")}
    meta = {
        "format": ROBOLEARN_FORMAT, "robolearn_version": __version__, "schema": schema_to_json(store.schema),
        "fps": store.fps if store.fps is not None else fps, "task": store.task, "env_config": store.env_config,
        "root_attrs": root_attrs, "keys": {m.key: m.to_json() for m in maps}, "synthesized": synthesized,
        "video": {"codec": "h264", "pix_fmt": "yuv420p", "crf": int(crf), "g": int(gop)} if video_maps else None,
    }
    (root / ROBOLEARN_PATH).write_text(json.dumps(meta, indent=2, default=_json_default))
    (root / INFO_PATH).write_text(json.dumps(info, indent=4))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serializable")
