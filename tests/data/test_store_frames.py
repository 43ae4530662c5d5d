"""The store writes image chunks (16 frames each) itself (zarr's per-chunk bookkeeping capped imports near 800
frames/s): the files must be byte for byte what zarr writes, in zarr 3 (blosc + crc32c) and zarr 2 (blosc), also
when an append begins inside a chunk that holds committed frames, and the per-channel statistics of uint8 images
must match the float64 computation."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from robolearn.data import EpisodeStore, KeySpec
from robolearn.data.store import _frame_writer, _Welford

SCHEMA = {"cam_image": KeySpec((6, 5, 3), "uint8", "obs"), "action": KeySpec((2,), "float32", "action")}


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_frames_written_as_zarr_writes_them(tmp_path, zarr_format):
    rng = np.random.default_rng(zarr_format)
    eps = [{"cam_image": rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8),
            "action": rng.standard_normal((n, 2)).astype(np.float32)} for n in (4, 3, 130, 5)]
    eps[1]["cam_image"][1] = 0  # an all-zero frame is written too
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, SCHEMA, zarr_format=zarr_format) as s:
        assert s.array("cam_image").chunks[0] == 16
        assert _frame_writer(s.array("cam_image"), path) is not None  # the store's own path, not zarr's
        assert _frame_writer(s.array("action"), path) is None
        s.append_episodes(eps[:2])  # 7 frames: chunk 0 padded
        first = path / "data" / "cam_image" / s.array("cam_image").metadata.encode_chunk_key((0, 0, 0, 0))
        old = first.stat().st_ino
        s.append_episodes(eps[2:3])  # starts inside chunk 0: its 7 committed frames are read and rewritten
        assert first.stat().st_ino != old  # replaced through a renamed file, never rewritten in place
        s.append_episode(eps[3])  # 137 -> 142: inside the last chunk again
    ours = sorted(p for p in (path / "data" / "cam_image").rglob("*") if p.is_file() and not p.name.startswith("."))
    frames = [p for p in ours if p.name not in ("zarr.json", ".zarray", ".zattrs")]
    assert len(frames) == 9 and not list(path.rglob("*.partial"))  # ceil(142 / 16)
    copy = tmp_path / "zarr_wrote.zarr"
    shutil.copytree(path, copy)
    for f in (copy / "data" / "cam_image").rglob("*"):
        if f.is_file() and f.name not in ("zarr.json", ".zarray", ".zattrs"):
            f.unlink()
    arr = zarr.open_array(str(copy / "data" / "cam_image"), mode="r+").with_config({"write_empty_chunks": True})
    block = np.concatenate([e["cam_image"] for e in eps])
    arr[:] = block  # zarr's own write path
    for f in frames:
        assert f.read_bytes() == (copy / f.relative_to(path)).read_bytes(), f
    back = EpisodeStore.open(path)
    np.testing.assert_array_equal(back.load(["cam_image"])["cam_image"], block)
    np.testing.assert_array_equal(back.get_episode(3)["cam_image"], eps[3]["cam_image"])
    assert back.validate(read_all=True)["ok"]


def test_writer_refuses_a_start_inside_a_chunk_without_its_earlier_rows(tmp_path):
    with EpisodeStore.create(tmp_path / "s.zarr", SCHEMA) as s:
        arr = s.array("cam_image")
        write = _frame_writer(arr, s.path)
        with pytest.raises(ValueError, match=r"cam_image: rows from 5 start inside a chunk of 16: the 5 rows"):
            write(5, [np.zeros((3, 6, 5, 3), np.uint8)], None)


def test_uint8_channel_statistics_match_float64():
    x = np.random.default_rng(0).integers(0, 256, (9, 7, 5, 3), dtype=np.uint8)
    fast = _Welford.of(x, (0, 1, 2))
    xf = x.astype(np.float64)
    assert fast["count"] == 9 * 7 * 5
    np.testing.assert_allclose(fast["mean"], xf.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(fast["m2"], ((xf - xf.mean(axis=(0, 1, 2))) ** 2).sum(axis=(0, 1, 2)), rtol=1e-10)
    np.testing.assert_array_equal(fast["min"], xf.min(axis=(0, 1, 2)))
    np.testing.assert_array_equal(fast["max"], xf.max(axis=(0, 1, 2)))


def test_uint8_statistics_over_several_blocks_and_episodes(tmp_path):
    """Sums run in blocks of 128 frames and the store merges them episode by episode: the stored statistics of
    a threaded append (300 frames in 3 episodes) equal the float64 ones of all frames."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (300, 6, 5, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = 255  # sums near the uint32 bound of a block
    fast = _Welford.of(x, (0, 1, 2))
    xf = x.astype(np.float64)
    np.testing.assert_allclose(fast["mean"], xf.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(fast["m2"], ((xf - xf.mean(axis=(0, 1, 2))) ** 2).sum(axis=(0, 1, 2)), rtol=1e-10)
    eps = [{"cam_image": x[a:b], "action": np.zeros((b - a, 2), np.float32)} for a, b in ((0, 90), (90, 200),
                                                                                           (200, 300))]
    with EpisodeStore.create(tmp_path / "s.zarr", SCHEMA) as s:
        s.append_episodes(eps)
        stats = s.stats()["cam_image"]
    np.testing.assert_allclose(stats["mean"], xf.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], xf.std(axis=(0, 1, 2)), rtol=1e-9)


def test_a_frame_that_cannot_be_written_commits_nothing(tmp_path):
    """Frames are written in background threads; one that fails (here a folder stands where its file goes) stops
    the append before its commit: the episodes saved before are intact and the failed ones are not there."""
    rng = np.random.default_rng(2)
    ep = {"cam_image": rng.integers(0, 256, (70, 6, 5, 3), dtype=np.uint8), "action": np.zeros((70, 2), np.float32)}
    path = tmp_path / "s.zarr"
    with EpisodeStore.create(path, SCHEMA) as s:
        s.append_episode(ep)
        arr = s.array("cam_image")
        blocker = path / "data" / "cam_image" / arr.metadata.encode_chunk_key(((70 + 40) // 16, 0, 0, 0))
        blocker.mkdir(parents=True)
        with pytest.raises(OSError):
            s.append_episodes([ep, ep])
        assert s.n_episodes == 1
    back = EpisodeStore.open(path)
    assert back.n_episodes == 1
    np.testing.assert_array_equal(back.load(["cam_image"])["cam_image"], ep["cam_image"])
