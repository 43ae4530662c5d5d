"""Shared fixtures: small real episode stores on disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from datagen import SCHEMA, make_episode  # noqa: E402

from robolearn.data import EpisodeStore  # noqa: E402


@pytest.fixture
def store_factory(tmp_path: Path) -> Callable[..., EpisodeStore]:
    def make(lengths=(5, 7, 3), name: str = "store.zarr", schema=SCHEMA, **kw) -> EpisodeStore:
        store = EpisodeStore.create(tmp_path / name, schema, fps=10, task="unit", env_config={"a": 1}, **kw)
        for i, n in enumerate(lengths):
            store.append_episode(make_episode(n, seed=i, schema=schema))
        return store

    return make
