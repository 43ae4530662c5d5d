"""``robolearn data import lerobot DIR --out STORE`` and ``robolearn data export lerobot STORE --out DIR``.

The reading and writing live in the data room (:mod:`robolearn.data.formats.lerobot`, where the key mapping
is documented); this module is the command line around them: arguments, a progress bar, the one-line JSON
summary, and errors as ``robolearn: error: ...`` (exit status 1) through :class:`StoreError`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

IMPORT_EXAMPLES = """\
examples:
  robolearn data import lerobot ~/.cache/huggingface/lerobot/lerobot/pusht --out data/pusht_lerobot.zarr
  robolearn data import lerobot exported/ --out data/back.zarr --overwrite
  robolearn data import lerobot my_robot_data/ --out data/mine.zarr --task my_robot   # name the task

Reads LeRobot dataset format v3.0 (meta/info.json codebase_version "v3.0"). A v2.1 folder is refused with
the command of LeRobot's converter. A folder written by 'robolearn data export lerobot' comes back with its
keys, schema, fps, task, env_config and per-episode attributes; any other keeps LeRobot's feature names
(observation.state -> state, observation.images.top -> top, action, next.reward -> reward, ...).
An interrupted import continues when run again with the same arguments.
"""

EXPORT_EXAMPLES = """\
examples:
  robolearn data export lerobot data/push_t.zarr --out exported/push_t
  robolearn data export lerobot data/lift.zarr --out exported/lift --crf 23 --task-text "lift the cube"
  robolearn data export lerobot data/lift.zarr --out exported/lift_exact --no-video     # images as arrays

Writes LeRobot dataset format v3.0, which LeRobot's LeRobotDataset(repo_id, root=DIR) loads as it is:
float32 observations concatenated into observation.state (names say which is which), RGB images as
observation.images.<key> h264 videos, action, next.reward, next.done; the rest keeps its name.
"""


def add_import_parser(sub: Any) -> None:
    """``data import lerobot``."""
    p = sub.add_parser("lerobot", help="a LeRobot dataset folder (format v3.0) into a new episode store",
                       description="Import a LeRobot dataset (format v3.0: parquet tables, mp4 videos, JSON "
                                   "metadata) into an episode store, one whole episode at a time.",
                       epilog=IMPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, metavar="DIR", help="the LeRobot dataset folder (holds meta/info.json)")
    p.add_argument("--out", type=Path, required=True, help="the episode store to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--task", default=None,
                   help="robolearn task name to record (default: the exported store's, or none)")
    p.set_defaults(func=cmd_import)


def add_export_parser(sub: Any) -> None:
    """``data export lerobot``."""
    from robolearn.data.formats.lerobot import (DATA_FILES_SIZE_IN_MB, DEFAULT_CRF, DEFAULT_GOP,
                                                VIDEO_FILES_SIZE_IN_MB)

    p = sub.add_parser("lerobot", help="an episode store as a LeRobot dataset folder (format v3.0)",
                       description="Export an episode store as a LeRobot dataset (format v3.0) that LeRobot's "
                                   "own LeRobotDataset loads unchanged.",
                       epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=Path, help="the episode store to export")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--task-text", default=None,
                   help="LeRobot's task text for every episode (default: the store's task name)")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate, for a store that records none (written by another tool)")
    p.add_argument("--robot-type", default=None, help="info.json's robot_type (default: none)")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF,
                   help=f"h264 quality, 0 to 51: lower is larger and closer (0 loses only the yuv420p "
                        f"conversion; default {DEFAULT_CRF})")
    p.add_argument("--gop", type=int, default=DEFAULT_GOP,
                   help=f"a keyframe every N frames (default {DEFAULT_GOP}, as LeRobot: fast random access)")
    p.add_argument("--no-video", dest="video", action="store_false",
                   help="keep images as exact uint8 arrays in the parquet files instead of mp4 videos")
    p.add_argument("--data-file-mb", type=float, default=DATA_FILES_SIZE_IN_MB,
                   help=f"start a new data parquet file past this size (default {DATA_FILES_SIZE_IN_MB}, as LeRobot)")
    p.add_argument("--video-file-mb", type=float, default=VIDEO_FILES_SIZE_IN_MB,
                   help=f"start a new mp4 past this size (default {VIDEO_FILES_SIZE_IN_MB}, as LeRobot)")
    p.set_defaults(func=cmd_export)


def _bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A progress callback ``(done, total)`` on robolearn's one progress reporter, and its closer."""
    from robolearn.progress import progress_bar

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = progress_bar(total, desc=desc, unit="episode", initial=done - 1)
        bar.update(done - bar.n)

    def close() -> None:
        if state.get("bar") is not None:
            state["bar"].close()

    return update, close


def cmd_import(args: argparse.Namespace) -> None:
    from robolearn.cli import print_json
    from robolearn.data.formats.lerobot import import_lerobot

    update, close = _bar("import lerobot")
    try:
        summary = import_lerobot(args.source, args.out, overwrite=args.overwrite, task=args.task, progress=update,
                                 on_note=lambda s: print(f"note: {s}", file=sys.stderr))
    finally:
        close()
    done = "nothing left to import" if summary["imported"] == 0 else f"imported {summary['imported']} episode(s)"
    print(f"{done}: {summary['out']} holds {summary['episodes']} episodes, {summary['steps']} steps "
          f"(fps {summary['fps']}, task {summary['task'] or 'none'})")
    print_json(summary)


def cmd_export(args: argparse.Namespace) -> None:
    from robolearn.cli import print_json
    from robolearn.data import EpisodeStore
    from robolearn.data.formats.lerobot import export_lerobot

    update, close = _bar("export lerobot")
    try:
        with EpisodeStore.open(args.store) as store:
            summary = export_lerobot(store, args.out, overwrite=args.overwrite, task_text=args.task_text,
                                     fps=args.fps, video=args.video, crf=args.crf, gop=args.gop,
                                     robot_type=args.robot_type, data_file_mb=args.data_file_mb,
                                     video_file_mb=args.video_file_mb, progress=update)
    finally:
        close()
    videos = [k for k, v in summary["features"].items() if v["dtype"] == "video"]
    print(f"wrote {summary['out']}: LeRobot v3.0, {summary['episodes']} episodes, {summary['frames']} frames, "
          f"fps {summary['fps']}" + (f", videos {', '.join(videos)}" if videos else ""))
    print_json(summary)
