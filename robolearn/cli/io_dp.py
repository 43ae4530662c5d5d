"""``robolearn data export dp STORE --out OUT.zarr``: a store Diffusion Policy's ``ReplayBuffer`` opens as it is.

robolearn writes zarr format 3; Diffusion Policy reads zarr format 2 through zarr-python 2. The writer
(:mod:`robolearn.data.formats.dp`) says what the export holds and why. Import needs no command: robolearn opens
Diffusion Policy's stores directly (``robolearn train dataset=pusht_cchi_v7_replay.zarr``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_import_parser(sub: Any) -> None:
    """No ``data import dp``: robolearn reads Diffusion Policy's stores as they are."""


def add_export_parser(sub: Any) -> None:
    """``data export dp``."""
    p = sub.add_parser(
        "dp", help="write a store in Diffusion Policy's zarr-2 ReplayBuffer layout",
        description="Write an episode store as a zarr format 2 store in Diffusion Policy's ReplayBuffer layout\n"
                    "(data/<key>, meta/episode_ends, Blosc lz4 like its default, time-only chunks of ~2 MB, one\n"
                    "frame per chunk for images), which ReplayBuffer.create_from_path opens as it is. Written under\n"
                    "a hidden name and renamed into place. robolearn reads the result back unchanged (roles, fps,\n"
                    "task and per-episode attributes are kept in its attributes).",
        epilog="example:\n  robolearn data export dp data/lift.zarr --out exports/lift_dp.zarr",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", type=Path, help="the episode store to export")
    p.add_argument("--out", type=Path, required=True, help="the zarr-2 store to write (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_export_dp)


def cmd_export_dp(args: argparse.Namespace) -> None:
    from robolearn.cli import print_json
    from robolearn.data.formats.dp import export_dp

    summary = export_dp(args.store, args.out, overwrite=args.overwrite, progress=args.progress)
    print(f"exported {summary['episodes']} episodes ({summary['steps']} steps) of {summary['source']} to "
          f"{summary['out']} (zarr format 2, Diffusion Policy's ReplayBuffer layout)")
    print_json(summary)
