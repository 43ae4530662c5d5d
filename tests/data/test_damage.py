"""Damaged stores (issue 11): chunk files missing, truncated or garbage, metadata cut short, empty stores, and
drops that would leave a bad episode behind. Each must stop with a StoreError naming the file and what to do --
never read as zeros, never be trimmed away, never end in a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from datagen import SCHEMA, make_episode

from robolearn.cli import main
from robolearn.data import EpisodeStore, SequenceDataset, StoreError

LENGTHS = (300, 250, 257)  # 807 rows, as in the fault report


def _store(tmp_path: Path, zarr_format: int = 3, lengths=LENGTHS) -> Path:
    path = tmp_path / "store.zarr"
    with EpisodeStore.create(path, SCHEMA, fps=10, task="unit", zarr_format=zarr_format) as s:
        for i, n in enumerate(lengths):
            s.append_episode(make_episode(n, seed=i))
    return path


def _chunk(path: Path, array: str, coords: tuple[int, ...]) -> Path:
    """The chunk file holding row ``coords[0]`` (images: several frames to a file) at ``coords[1:]``."""
    arr = zarr.open_group(str(path), mode="r")[array]
    return path / array / arr.metadata.encode_chunk_key((coords[0] // arr.chunks[0], *coords[1:]))


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ missing chunks
def test_missing_episode_ends_chunk_is_damage_not_uncommitted(tmp_path, capsys):
    path = _store(tmp_path)
    _chunk(path, "meta/episode_ends", (0,)).unlink()
    before = _files(path)
    with pytest.raises(StoreError, match=r"meta/episode_ends.*chunk c/0 .*is missing"):
        EpisodeStore.open(path)
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("robolearn: error:") and "meta/episode_ends/c/0" in err and "Traceback" not in err
    # A writer must not take the 807 intact rows for orphans of a killed append and trim them.
    with pytest.raises(StoreError, match=r"meta/episode_ends"):
        EpisodeStore.open(path, mode="a")
    with pytest.raises(StoreError, match=r"meta/episode_ends"):
        EpisodeStore.open(path, mode="a", validate=False)
    assert main(["data", "drop", str(path), "--episodes", "0"]) == 1
    capsys.readouterr()
    after = _files(path)
    after.pop(".robolearn.lock", None)
    before.pop(".robolearn.lock", None)
    assert after == before  # nothing trimmed, nothing rewritten


@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("array, coords", [("data/action", (0, 0)), ("data/state", (0, 0)),
                                           ("data/image", (400, 0, 0, 0))])
def test_missing_data_chunk_is_named_never_read_as_zeros(tmp_path, capsys, zarr_format, array, coords):
    path = _store(tmp_path, zarr_format)
    chunk = _chunk(path, array, coords)
    key = str(chunk.relative_to(path / array))
    chunk.unlink()
    if array == "data/image":  # opening checks only an image key's last chunk (a file per 16 frames: cheap to read,
        EpisodeStore.open(path).close()  # costly to stat 60,000 of); reading, info and validate check them all
    else:
        with pytest.raises(StoreError, match=rf"{array}.*chunk {key} .*is missing"):
            EpisodeStore.open(path)
    store = EpisodeStore.open(path, validate=False)  # inspecting it works; reading the hole does not
    with pytest.raises(StoreError, match=rf"{array}.*{key}"):
        store.load()
    for argv in (["data", "validate", str(path)], ["data", "info", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{array}/{key}" in err and "Traceback" not in err
    if array != "data/image":  # an append into the chunk of the hole would write zeros over it for good
        with pytest.raises(StoreError, match=rf"{array}.*{key}"):
            EpisodeStore.open(path, mode="a")
    assert not chunk.exists()


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_dropping_the_episode_of_a_missing_frame_repairs_the_store(tmp_path, capsys, zarr_format):
    path = _store(tmp_path, zarr_format)
    _chunk(path, "data/image", (400, 0, 0, 0)).unlink()  # a frame of episode 1
    assert main(["data", "info", str(path)]) == 1
    assert "or drop episode 1 (robolearn data drop" in capsys.readouterr().err
    assert main(["data", "drop", str(path), "--episodes", "0"]) == 1  # would keep episode 1: refused
    err = capsys.readouterr().err
    assert "episode 1 would stay, but it lies partly in data/image chunk" in err and "drop it too" in err
    assert main(["data", "drop", str(path), "--episodes", "1"]) == 0
    store = EpisodeStore.open(path)
    assert list(store.episode_lengths) == [300, 257] and store.validate()["ok"]
    np.testing.assert_array_equal(store.get_episode(1)["image"], make_episode(257, seed=2)["image"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


def test_every_chunk_is_written_even_when_it_holds_only_the_fill_value(tmp_path):
    """zarr 3 skips chunks equal to the fill value; the store must not, or an all-zero chunk looks missing."""
    path = tmp_path / "zeros.zarr"
    with EpisodeStore.create(path, SCHEMA) as s:
        ep = make_episode(3, seed=0)
        ep["image"][:] = 0
        ep["reward"][:] = 0
        s.append_episode(ep)
    store = EpisodeStore.open(path)
    assert store.validate()["episodes"] == 1
    assert _chunk(path, "data/image", (2, 0, 0, 0)).exists()


# ------------------------------------------------------------------------------- unreadable chunks, metadata
@pytest.mark.parametrize("zarr_format", [3, 2])
@pytest.mark.parametrize("how", ["garbage", "truncated"])
@pytest.mark.parametrize("array, coords", [("data/action", (0, 0)), ("data/image", (3, 0, 0, 0)),
                                           ("meta/episode_ends", (0,))])
def test_unreadable_chunk_names_the_file(tmp_path, capsys, how, array, coords, zarr_format):
    """A truncated frame of random pixels is the hard case: blosc stores it uncompressed and, cut short, decodes
    it without complaint. The zarr 3 store's checksum catches it; for zarr 2, validate checks blosc's header."""
    path = _store(tmp_path, zarr_format, lengths=(5, 7, 3))
    chunk = _chunk(path, array, coords)
    data = chunk.read_bytes()
    chunk.write_bytes(b"\x00garbage!" * 7 if how == "garbage" else data[: len(data) // 2])
    assert main(["data", "validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("robolearn: error:") and str(chunk) in err and "Traceback" not in err
    assert "cannot be read" in err
    assert chunk.exists()


def test_garbage_observation_chunk_stops_reading(tmp_path):
    path = _store(tmp_path, lengths=(16, 16, 3))
    EpisodeStore.open(path).stats()  # cached: training reads the frames, not the statistics
    chunk = _chunk(path, "data/image", (20, 0, 0, 0))  # episode 1's frames, 16 to a chunk
    chunk.write_bytes(b"not blosc at all")
    store = EpisodeStore.open(path)  # the cheap checks pass; the frame is read when used
    with pytest.raises(StoreError, match=rf"{chunk}.*cannot be read.*episode 1"):
        store.load(["image"])
    with pytest.raises(StoreError, match=rf"{chunk}"):
        store.get_episode(1)
    store.get_episode(0)
    with pytest.raises(StoreError, match=rf"{chunk}"):
        SequenceDataset(store, horizon=4, n_obs_steps=2, n_action_steps=2, obs_keys=["image"])
    stream = SequenceDataset(store, horizon=4, n_obs_steps=2, n_action_steps=2, obs_keys=["image"],
                             in_memory=False, split="all")
    with pytest.raises(StoreError, match=rf"{chunk}"):
        stream.get_batch(np.arange(len(stream)))


@pytest.mark.parametrize("meta", ["data/action/zarr.json", "meta/episode_ends/zarr.json", "zarr.json"])
def test_truncated_metadata_names_the_file(tmp_path, capsys, meta):
    path = _store(tmp_path, lengths=(5,))
    f = path / meta
    f.write_text(f.read_text()[:40])
    for argv in (["data", "validate", str(path)], ["data", "info", str(path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("robolearn: error:") and str(f) in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- item 8, 9
def test_stats_of_an_empty_store(tmp_path):
    EpisodeStore.create(tmp_path / "empty.zarr", SCHEMA).close()
    store = EpisodeStore.open(tmp_path / "empty.zarr")
    with pytest.raises(StoreError, match=r"empty\.zarr holds no episodes"):
        store.stats()


def test_drop_leaving_another_nan_episode_names_it(tmp_path, capsys):
    path = _store(tmp_path, lengths=(3, 3, 3, 3, 3, 3, 3, 3))
    root = zarr.open_group(str(path), mode="r+")
    root["data"]["action"][3 * 3 + 1, 0] = np.nan  # episode 3
    root["data"]["action"][7 * 3 + 2, 1] = np.inf  # episode 7
    assert main(["data", "drop", str(path), "--episodes", "3"]) == 1
    err = capsys.readouterr().err
    assert "episode 7 still has NaN or inf in 'action' after dropping [3]; drop it too" in err
    assert ".drop-" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]
    assert EpisodeStore.open(path, validate=False).n_episodes == 8
    assert main(["data", "drop", str(path), "--episodes", "3,7"]) == 0
    assert EpisodeStore.open(path).n_episodes == 6


def test_validate_json_report_of_a_sound_store(tmp_path, capsys):
    path = _store(tmp_path, lengths=(5, 7))
    assert main(["data", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["episodes"] == 2
    shutil.rmtree(path)


def test_a_store_from_before_every_chunk_was_written_reads_absent_chunks_as_zeros(tmp_path):
    """A zarr-3 store of an older robolearn (no ``every_chunk`` mark) skipped chunks holding only the fill value:
    its absent data chunks keep reading as zeros, as they always did (its episode_ends is still checked); a drop
    rewrites it as a marked store, where an absent chunk is damage."""
    path = tmp_path / "old.zarr"
    with EpisodeStore.create(path, SCHEMA, fps=10, task="unit") as s:
        ep = make_episode(20, seed=0)
        ep["reward"][:] = 0.0  # an all-zero chunk: an older zarr-3 writer skipped its file
        s.append_episode(ep)
        s.append_episode(make_episode(5, seed=1))
    root = zarr.open_group(str(path), mode="r+")
    info = dict(root.attrs["robolearn"])
    info.pop("every_chunk")
    root.attrs["robolearn"] = info
    _chunk(path, "data/reward", (0,)).unlink()
    store = EpisodeStore.open(path)
    assert not store.every_chunk_written
    assert np.all(store.get_episode(0)["reward"] == 0) and store.validate()["ok"]
    store.close()
    assert main(["data", "drop", str(path), "--episodes", "1"]) == 0
    rewritten = EpisodeStore.open(path)
    assert rewritten.every_chunk_written and _chunk(path, "data/reward", (0,)).exists()
