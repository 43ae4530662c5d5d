"""A writer SIGKILLed mid-episode loses only that episode: the store opens, validates and takes appends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from datagen import SCHEMA, make_episode

from robolearn.data import EpisodeStore

TESTS = Path(__file__).resolve().parents[1]

# Appends three whole episodes, then dies by its own SIGKILL at a chosen point of the fourth append,
# going through the same zarr writes that EpisodeStore.append_episodes makes, in the same order.
WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from datagen import SCHEMA, make_episode
    from robolearn.data import EpisodeStore

    where = sys.argv[2]
    store = EpisodeStore.create(sys.argv[1], SCHEMA, fps=10, task="crash")
    for i, n in enumerate((6, 4, 5)):
        store.append_episode(make_episode(n, seed=i))
    ep = make_episode(9, seed=3)
    n0 = store.n_steps
    for j, key in enumerate(SCHEMA):
        arr = store.array(key)
        arr.resize((n0 + 9, *SCHEMA[key].shape))
        if where == "mid-data" and j == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        arr[n0:] = ep[key]
    if where == "after-data":
        os.kill(os.getpid(), signal.SIGKILL)
    ends = store._ends_array()
    ends.resize((4,))  # allocated, value not yet written: reads as the fill value -1
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

# Appends episodes forever; the test kills it at an arbitrary moment.
LOOPER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from datagen import SCHEMA, make_episode
    from robolearn.data import EpisodeStore

    store = EpisodeStore.create(sys.argv[1], SCHEMA, fps=10, task="crash")
    i = 0
    while True:
        store.append_episode(make_episode(50 + i % 7, seed=i))
        i += 1
    """
)


def _check_survivor(path: Path, expected_lengths: list[int]) -> None:
    store = EpisodeStore.open(path)  # validates
    assert list(store.episode_lengths) == expected_lengths
    for i, n in enumerate(expected_lengths):
        np.testing.assert_array_equal(store.get_episode(i)["state"], make_episode(n, seed=i)["state"])
    # Reopen for append: the dead writer's lock is gone, its orphan rows trimmed, and a new episode lands
    # exactly after the last committed one.
    with EpisodeStore.open(path, mode="a") as w:
        assert all(w.array(k).shape[0] == w.n_steps for k in SCHEMA)
        w.append_episode(make_episode(3, seed=42))
    after = EpisodeStore.open(path)
    assert after.validate()["uncommitted_rows"] == {}
    assert list(after.episode_lengths) == expected_lengths + [3]
    np.testing.assert_array_equal(after.get_episode(-1)["image"], make_episode(3, seed=42)["image"])
    stats = after.stats()["state"]
    every = after.load(["state"])["state"].astype(np.float64)
    np.testing.assert_allclose(stats["mean"], every.mean(0), atol=1e-9)


@pytest.mark.parametrize("where", ["mid-data", "after-data", "ends-allocated"])
def test_sigkill_at_each_point_of_an_append(tmp_path, where):
    path = tmp_path / "crash.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", WRITER.format(tests=str(TESTS)), str(path), where], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    report = EpisodeStore.open(path).validate()
    if where == "ends-allocated":
        assert report["uncommitted_episode_ends"] == 1
    else:
        assert report["uncommitted_rows"], report
    _check_survivor(path, [6, 4, 5])


def test_sigkill_at_a_random_moment(tmp_path):
    path = tmp_path / "loop.zarr"
    proc = subprocess.Popen([sys.executable, "-c", LOOPER.format(tests=str(TESTS)), str(path)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if (path / "meta" / "episode_ends" / "zarr.json").exists():
                try:
                    if EpisodeStore.open(path, validate=False).n_episodes >= 5:
                        break
                except Exception:
                    pass  # created but not yet complete
        time.sleep(0.013)  # land somewhere inside an append
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    store = EpisodeStore.open(path)
    n = store.n_episodes
    assert n >= 5
    _check_survivor(path, [50 + i % 7 for i in range(n)])


# Dies by SIGKILL inside the real EpisodeStore.append_episodes, just before its first write to episode_ends:
# the ends array has grown into a chunk that does not exist yet (the first append to an empty store).
FIRST_APPEND = textwrap.dedent(
    """
    import os, signal, sys
    import zarr
    sys.path.insert(0, {tests!r})
    from datagen import SCHEMA, make_episode
    from robolearn.data import EpisodeStore

    store = EpisodeStore.create(sys.argv[1], SCHEMA, fps=10, task="crash")
    real = zarr.Array.__setitem__
    def setitem(self, sel, value):
        if self.path == "meta/episode_ends":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, sel, value)
    zarr.Array.__setitem__ = setitem
    store.append_episode(make_episode(4, seed=0))
    """
)


def test_sigkill_in_the_first_append_before_its_end_lands(tmp_path):
    """The one legitimate missing chunk of episode_ends: an append grew it into a new chunk and died."""
    path = tmp_path / "first.zarr"
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_APPEND.format(tests=str(TESTS)), str(path)], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ends = path / "meta" / "episode_ends"
    assert not (ends / "c" / "0").exists() and json.loads((ends / "zarr.json").read_text())["shape"] == [1]
    report = EpisodeStore.open(path).validate()
    assert report["episodes"] == 0 and report["uncommitted_rows"]
    _check_survivor(path, [])
