"""Drops and merges SIGKILLed at every step (issue 11): the next command finds either the store as it was before
or as it is after, never deletes a backup it did not make, and cleans the hidden copies dead writers left."""
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

from robolearn.cli import main
from robolearn.data import EpisodeStore, StoreError, merge_stores

TESTS = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("robolearn"))

# Runs `robolearn ARGV...` in-process and SIGKILLs itself at POINT:
#   copy               after the first episodes landed in the hidden copy
#   before-rename:N    just before the N-th rename of a folder
#   after-rename:N     just after the N-th rename of a folder
#   rmtree             half-way through deleting a hidden folder (its data/ is gone, the rest not)
#   pause              after the first episodes landed in the hidden copy, wait until stdin closes
KILLER = textwrap.dedent(
    """
    import os, shutil, signal, sys, time
    sys.path.insert(0, {tests!r})
    point, argv = sys.argv[1], sys.argv[2:]
    kind, _, n = point.partition(":")
    n = int(n or 1)
    count = [0]
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def rename(src, dst, *a, **k):
        if not os.path.isdir(src):
            return real_rename(src, dst, *a, **k)
        count[0] += 1
        if kind == "before-rename" and count[0] == n:
            die()
        real_rename(src, dst, *a, **k)
        if kind == "after-rename" and count[0] == n:
            die()

    def rmtree(p, *a, **k):
        if kind == "rmtree" and os.path.isdir(os.path.join(p, "data")):
            real_rmtree(os.path.join(p, "data"))
            die()
        return real_rmtree(p, *a, **k)

    os.rename, shutil.rmtree = rename, rmtree
    if kind in ("copy", "pause"):
        from robolearn.data import store as st
        real_append = st.EpisodeStore.append_episodes
        def append(self, *a, **k):
            out = real_append(self, *a, **k)
            if self.path.name.startswith("."):
                if kind == "copy":
                    die()
                print("paused", flush=True)
                sys.stdin.read()
            return out
        st.EpisodeStore.append_episodes = append
    from robolearn.cli import main
    sys.exit(main(argv))
    """
)


def run_killed(point: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER.format(tests=str(TESTS)), point, *argv],
                          capture_output=True, text=True, **kw)


def make_store(path: Path, lengths=(3, 4, 5, 6)) -> None:
    with EpisodeStore.create(path, SCHEMA, fps=10, task="unit") as s:
        for i, n in enumerate(lengths):
            s.append_episode(make_episode(n, seed=i))


def lengths_of(path: Path) -> list[int]:
    return [int(n) for n in EpisodeStore.open(path).episode_lengths]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------- drop
# What the next writer finds after a drop of episode 1 from [3, 4, 5, 6] was killed at each step.
DROP_POINTS = [
    ("copy", "before"),              # store + a partial hidden copy
    ("before-rename:1", "before"),   # store + a complete hidden copy
    ("after-rename:1", "before"),    # backup + hidden copy, no store: the backup is put back
    ("after-rename:2", "refused"),   # new store + backup: only the user can say which to keep
    ("after-rename:3", "after"),     # new store + the old copy on its way out
    ("rmtree", "after"),             # new store + a half-deleted old copy
]


@pytest.mark.parametrize("point, outcome", DROP_POINTS)
def test_drop_killed_at_each_step(tmp_path, capsys, point, outcome):
    path = tmp_path / "store.zarr"
    make_store(path)
    proc = run_killed(point, "data", "drop", str(path), "--episodes", "1")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert len(names(tmp_path)) > 1  # something was left beside the store
    want = {"before": [3, 4, 5, 6], "after": [3, 5, 6]}
    # Readers never change anything but say what they found.
    rc = main(["data", "info", str(path)])
    out, err = capsys.readouterr()
    if outcome == "before" and point == "after-rename:1":
        assert rc == 1 and ".store.zarr.drop-backup" in err and "rename" in err
    else:
        assert rc == 0 and "Traceback" not in err
    if outcome == "refused":
        assert ".store.zarr.drop-backup" in out
        with pytest.raises(StoreError, match=r"\.store\.zarr\.drop-backup") as e:
            EpisodeStore.open(path, mode="a")
        msg = str(e.value)
        assert "store.zarr holds 3 episodes" in msg and ".store.zarr.drop-backup holds 4 episodes" in msg
        assert main(["data", "drop", str(path), "--episodes", "0"]) == 1  # refused, backup kept
        assert (tmp_path / ".store.zarr.drop-backup" / "zarr.json").exists()
        assert lengths_of(tmp_path / ".store.zarr.drop-backup") == [3, 4, 5, 6]
        capsys.readouterr()
        # Follow the message's advice to undo the drop: put the backup back in place of the store.
        os.rename(path, tmp_path / "store.zarr.after-drop")
        os.rename(tmp_path / ".store.zarr.drop-backup", path)
        EpisodeStore.open(path, mode="a").close()
        assert lengths_of(path) == want["before"]
        return
    with EpisodeStore.open(path, mode="a") as w:  # resolves what is provably safe to resolve
        assert list(w.episode_lengths) == want[outcome]
    assert names(tmp_path) == ["store.zarr"]
    for i, n in enumerate(want[outcome]):
        seed = i if outcome == "before" or i == 0 else i + 1
        np.testing.assert_array_equal(EpisodeStore.open(path).get_episode(i)["state"],
                                      make_episode(n, seed=seed)["state"])


def test_collect_then_drop_after_a_drop_killed_between_its_renames(tmp_path, capsys):
    """The fault report's sequence: the original episodes must survive it."""
    path = tmp_path / "peg.zarr"
    argv = ["collect", "task=peg_insert", f"out={path}", "progress=false"]
    assert main([*argv, "episodes=2"]) == 0
    original = EpisodeStore.open(path).load()
    proc = run_killed("after-rename:1", "data", "drop", str(path), "--episodes", "0")
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    capsys.readouterr()
    assert main([*argv, "episodes=1"]) == 0
    store = EpisodeStore.open(path)
    assert store.n_episodes == 3
    for k, v in original.items():
        np.testing.assert_array_equal(store.load([k])[k][: len(v)], v)
    assert main(["data", "drop", str(path), "--episodes", "0"]) == 0
    assert EpisodeStore.open(path).n_episodes == 2
    assert names(tmp_path) == ["peg.zarr"]


def test_backup_held_by_a_live_drop_is_left_alone(tmp_path):
    """No store, a backup whose lock is held: a drop between its renames right now. Refuse, touch nothing."""
    path = tmp_path / "store.zarr"
    make_store(path)
    backup = tmp_path / ".store.zarr.drop-backup"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import fcntl, os, sys
            os.rename(sys.argv[1], sys.argv[2])
            fd = os.open(os.path.join(sys.argv[2], ".robolearn.lock"), os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.read()
            """), str(path), str(backup)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: EpisodeStore.open(path, mode="a"),
                        lambda: EpisodeStore.create(path, SCHEMA),
                        lambda: EpisodeStore.open_or_create(path, SCHEMA)):
            with pytest.raises(StoreError, match=r"in progress"):
                attempt()
        assert not path.exists() and backup.exists()
    finally:
        holder.stdin.close()
        holder.wait()
    with EpisodeStore.open_or_create(path, SCHEMA) as w:  # the holder is gone: put back, then appended to
        assert w.n_episodes == 4
        w.append_episode(make_episode(2, seed=9))
    assert names(tmp_path) == ["store.zarr"] and lengths_of(path) == [3, 4, 5, 6, 2]


def test_live_drop_copy_is_not_cleaned_dead_one_is(tmp_path, capsys):
    path = tmp_path / "store.zarr"
    make_store(path)
    proc = subprocess.Popen([sys.executable, "-c", KILLER.format(tests=str(TESTS)), "pause", "data", "drop",
                             str(path), "--episodes", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "paused"
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".store.zarr.drop-")]
        old = time.time() - 3600  # however old it looks, its writer lives
        os.utime(tmp, (old, old))
        assert main(["data", "info", str(path)]) == 0
        assert main(["data", "validate", str(path)]) == 0
        with pytest.raises(StoreError, match="already open for writing"):
            EpisodeStore.open(path, mode="a")
        assert tmp.exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    capsys.readouterr()
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"removed {tmp.name}" in out and "killed" in out
    assert names(tmp_path) == ["store.zarr"] and lengths_of(path) == [3, 4, 5, 6]


# --------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("point, outcome", [
    ("copy", "old"), ("before-rename:1", "old"), ("after-rename:1", "old"), ("after-rename:2", "refused"),
    ("after-rename:3", "new"), ("rmtree", "new"),
])
def test_merge_overwrite_killed_at_each_step(tmp_path, capsys, point, outcome):
    a, b, out = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "m.zarr"
    make_store(a, (3, 4))
    make_store(b, (5,))
    make_store(out, (2,))
    proc = run_killed(point, "data", "merge", str(a), str(b), "--out", str(out), "--overwrite")
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    if outcome == "refused":
        with pytest.raises(StoreError, match=r"\.m\.zarr\.merge-backup"):
            EpisodeStore.open(out, mode="a")
        assert lengths_of(tmp_path / ".m.zarr.merge-backup") == [2] and lengths_of(out) == [3, 4, 5]
        return
    EpisodeStore.open(out, mode="a").close()
    assert lengths_of(out) == {"old": [2], "new": [3, 4, 5]}[outcome]
    assert names(tmp_path) == ["a.zarr", "b.zarr", "m.zarr"]


def test_merge_killed_while_copying_is_cleaned_by_the_next_merge(tmp_path, capsys):
    a, out = tmp_path / "a.zarr", tmp_path / "m.zarr"
    make_store(a, (3, 4))
    assert run_killed("copy", "data", "merge", str(a), str(a), "--out", str(out)).returncode == -signal.SIGKILL
    (tmp,) = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.zarr.merge-")]
    assert main(["data", "info", str(out)]) == 1
    assert f"removed {tmp}" in capsys.readouterr().out
    assert names(tmp_path) == ["a.zarr"]
    make_store(tmp_path / "b.zarr", (2,))
    assert run_killed("copy", "data", "merge", str(a), str(a), "--out", str(out)).returncode == -signal.SIGKILL
    with merge_stores([a, tmp_path / "b.zarr"], out) as m:
        assert list(m.episode_lengths) == [3, 4, 2]
    assert names(tmp_path) == ["a.zarr", "b.zarr", "m.zarr"]


def test_backup_is_never_deleted_by_a_later_drop(tmp_path, capsys):
    """A store beside a backup it did not come from (the old bug made one): drop refuses, keeps both."""
    path = tmp_path / "store.zarr"
    make_store(path)
    os.rename(path, tmp_path / ".store.zarr.drop-backup")
    with pytest.raises(StoreError, match="already exists"):  # creating it now puts the backup back first
        EpisodeStore.create(path, SCHEMA)
    assert lengths_of(path) == [3, 4, 5, 6]
    os.rename(path, tmp_path / ".store.zarr.drop-backup")
    make_store(tmp_path / "other.zarr", (7,))
    os.rename(tmp_path / "other.zarr", path)  # what the old bug left: a new store beside the backup
    assert main(["data", "drop", str(path), "--episodes", "0"]) == 1
    err = capsys.readouterr().err
    assert ".store.zarr.drop-backup" in err and "Traceback" not in err
    assert lengths_of(tmp_path / ".store.zarr.drop-backup") == [3, 4, 5, 6] and lengths_of(path) == [7]
    r = subprocess.run([EXE, "collect", "task=peg_insert", "episodes=1", f"out={path}", "progress=false"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and ".store.zarr.drop-backup" in r.stderr
    assert json.loads((tmp_path / ".store.zarr.drop-backup" / "zarr.json").read_text())


CREATE_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import zarr
    from datagen import SCHEMA
    from robolearn.data import EpisodeStore
    real = zarr.Group.create_array
    count = [0]
    def create_array(self, *a, **k):
        count[0] += 1
        if count[0] == 3:  # part-way through making the arrays
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, *a, **k)
    zarr.Group.create_array = create_array
    EpisodeStore.create(sys.argv[1], SCHEMA, fps=10, task="unit")
    """
)


def test_a_store_killed_while_being_created_leaves_nothing_at_its_name(tmp_path):
    """Creating is atomic too: a collect killed while making its store must not leave a half-made store that
    blocks the next collect."""
    path = tmp_path / "s.zarr"
    proc = subprocess.run([sys.executable, "-c", CREATE_KILLER.format(tests=str(TESTS)), str(path)])
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".s.zarr.create"]
    with EpisodeStore.create(path, SCHEMA, fps=10, task="unit") as s:  # the next writer: works, cleans up
        s.append_episode(make_episode(4, seed=0))
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
    assert EpisodeStore.open(path).n_episodes == 1
