"""Shared fixtures: small real episode stores on disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist): each worker, and every command it starts, gets one
    # torch/OpenMP thread, so the workers never oversubscribe the cores (torch beside another torch job ran 7x slower
    # on this project's 2-core machines).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

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
