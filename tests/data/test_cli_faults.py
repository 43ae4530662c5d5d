"""What the file system can do to the ``robolearn`` commands (issue 11): a full disk, a read-only store, a closed
pipe, a damaged dataset under ``train``. Each ends in one line ``robolearn: error: ...`` (or, for the pipe,
quietly), exit status 1, and the saved data intact."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from datagen import SCHEMA, make_episode

from robolearn.cli import main
from robolearn.data import EpisodeStore

EXE = str(Path(sys.executable).with_name("robolearn"))


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real file system that really fills up (ENOSPC from the kernel)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    yield disk
    _umount(disk)


def _fill(disk: Path, leave: int) -> None:
    """Leave about ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _make_store(path: Path, lengths=(40, 40, 40), seed0: int = 0) -> None:
    with EpisodeStore.create(path, SCHEMA, fps=10, task="unit") as s:
        for i, n in enumerate(lengths):
            s.append_episode(make_episode(n, seed=seed0 + i))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("robolearn: error:"), err
    assert "Traceback" not in err
    return lines[0]


# -------------------------------------------------------------------------------------------------- disk full
def test_collect_on_a_full_disk_says_what_it_saved(small_disk, capsys):
    out = small_disk / "peg.zarr"
    collect = lambda n: main(["collect", "task=peg_insert", f"episodes={n}", f"out={out}", "progress=false"])  # noqa: E731
    assert collect(1) == 0
    _fill(small_disk, 24 * 1024)
    capsys.readouterr()
    assert collect(200) == 1
    r = capsys.readouterr()
    line = _one_error_line(r.err)
    assert "no space left" in line.lower() and str(out) in line
    summary = json.loads(r.out.strip().splitlines()[-1])  # what it saved, although it stopped
    store = EpisodeStore.open(out)  # valid
    assert summary["store_episodes"] == store.n_episodes and summary["episodes"] == store.n_episodes - 1
    assert f"it now holds {store.n_episodes}" in r.out
    (small_disk / "filler").unlink()
    assert collect(1) == 0  # space again: it continues
    assert EpisodeStore.open(out).n_episodes == store.n_episodes + 1


def test_drop_and_merge_on_a_full_disk_change_nothing(small_disk, tmp_path, capsys):
    store = small_disk / "s.zarr"
    _make_store(store)
    before = EpisodeStore.open(store).load()
    _fill(small_disk, 16 * 1024)
    assert main(["data", "drop", str(store), "--episodes", "0"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left" in line.lower() and str(store) in line and "unchanged" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "s.zarr"]
    after = EpisodeStore.open(store).load()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    src = tmp_path / "src.zarr"
    _make_store(src, (60, 60, 60))
    assert main(["data", "merge", str(src), str(src), "--out", str(small_disk / "m.zarr")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "no space left" in line.lower() and "m.zarr" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "s.zarr"]


# ------------------------------------------------------------------------------------------------- read-only
def test_read_only_store(small_disk, capsys):
    store = small_disk / "s.zarr"
    _make_store(store)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert main(["data", "drop", str(store), "--episodes", "0"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "read-only" in line and str(store) in line
    assert main(["collect", "task=peg_insert", "episodes=1", f"out={store}", "progress=false"]) == 1
    assert "read-only" in _one_error_line(capsys.readouterr().err)
    assert main(["data", "info", str(store)]) == 0  # reading needs no writing
    assert main(["data", "validate", str(store)]) == 0
    assert EpisodeStore.open(store).n_episodes == 3


# ------------------------------------------------------------------------------------------------ broken pipe
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_info_into_a_closed_pipe_exits_quietly(tmp_path, extra):
    store = tmp_path / "s.zarr"
    _make_store(store)
    proc = subprocess.Popen([EXE, "data", "info", str(store), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does once it has read what it wants
    err = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert err == ""


# ------------------------------------------------------------------------------------------ train on bad data
@pytest.fixture(scope="module")
def peg_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peg") / "peg.zarr"
    assert main(["collect", "task=peg_insert", "episodes=2", f"out={out}", "progress=false"]) == 0
    EpisodeStore.open(out).stats()
    return out


def _train(data: Path, run: Path) -> int:
    return main(["train", "task=peg_insert", f"dataset={data}", f"run_dir={run}", "policy.backbone.preset=tiny",
                 "training.steps=1", "training.batch_size=4", "training.progress=false", "eval.episodes=0"])


@pytest.mark.parametrize("damage", ["missing-chunk", "garbage-chunk", "empty"])
def test_train_on_a_damaged_store_stops_with_an_error(peg_store, tmp_path, capsys, damage):
    data = tmp_path / "peg.zarr"
    if damage == "empty":
        src = EpisodeStore.open(peg_store)
        EpisodeStore.create(data, src.schema, fps=src.fps, task=src.task, env_config=src.env_config).close()
        want = "holds no episodes"
    else:
        shutil.copytree(peg_store, data)
        chunk = data / "data" / "hole_pos" / "c" / "0" / "0"
        if damage == "missing-chunk":
            chunk.unlink()
        else:
            chunk.write_bytes(b"garbage" * 9)
        want = str(chunk)
    capsys.readouterr()
    assert _train(data, tmp_path / "run") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert want in line
    assert not (tmp_path / "run" / "checkpoints").exists()
