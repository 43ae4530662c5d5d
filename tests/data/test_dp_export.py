"""``robolearn data export dp``: a zarr-2 store in Diffusion Policy's ReplayBuffer layout, checked through its
metadata files and zarr's format-2 reader (what zarr-python 2 reads), and read back by robolearn unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from robolearn.cli import main
from robolearn.data import EpisodeStore, KeySpec, StoreError
from robolearn.data.formats import dp

from datagen import make_episode

SCHEMA = {
    "state": KeySpec((3,), "float32", "obs"),
    "image": KeySpec((8, 8, 3), "uint8", "obs"),
    "action": KeySpec((2,), "float32", "action"),
    "reward": KeySpec((), "float32", "reward"),
    "done": KeySpec((), "uint8", "flag"),
    "states": KeySpec((5,), "float64", "other"),
}
LENGTHS = (7, 5, 9, 4)


@pytest.fixture
def source(tmp_path):
    """A robolearn store with images, flags, an all-zero reward and per-episode attributes."""
    path = tmp_path / "src.zarr"
    with EpisodeStore.create(path, SCHEMA, fps=20, task="lift", env_config={"control_freq": 20},
                             attrs={"source": {"kind": "robomimic", "file": "x.hdf5"}}) as s:
        for i, n in enumerate(LENGTHS):
            ep = make_episode(n, seed=i, schema=SCHEMA)
            ep["reward"][:] = 0  # an all-zero chunk must still be written
            s.append_episode(ep, attrs={"source": "robomimic", "demo": f"demo_{i}"})
    return path


def _json(path):
    return json.loads(path.read_text())


def test_export_is_diffusion_policy_layout_and_reads_back(source, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dp, "TARGET_CHUNK_BYTES", 40)  # several low-dim chunks in a small store
    out = tmp_path / "dp.zarr"
    assert main(["data", "export", "dp", str(source), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n = sum(LENGTHS)
    assert (summary["episodes"], summary["steps"], summary["zarr_format"]) == (4, n, 2)
    for group in ("", "data", "meta"):
        assert _json(out / group / ".zgroup") == {"zarr_format": 2}
    assert not (out / "zarr.json").exists()
    ends = _json(out / "meta" / "episode_ends" / ".zarray")
    assert (ends["dtype"], ends["shape"], ends["chunks"], ends["compressor"]) == ("<i8", [4], [4], None)
    for key, spec in SCHEMA.items():
        meta = _json(out / "data" / key / ".zarray")
        c = 1 if spec.is_image else min(n, -(-40 // spec.bytes_per_step))
        assert meta["zarr_format"] == 2 and meta["shape"] == [n, *spec.shape]
        assert meta["chunks"] == [c, *spec.shape], key  # time-only chunks
        assert meta["compressor"] == {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 0, "blocksize": 0}
        assert len(list((out / "data" / key).glob("[0-9]*"))) == -(-n // c)  # every chunk file written
    root = zarr.open_group(str(out), mode="r", zarr_format=2)  # the format-2 reader
    np.testing.assert_array_equal(root["meta/episode_ends"][:], np.cumsum(LENGTHS))
    src = EpisodeStore.open(source)
    for key in SCHEMA:
        np.testing.assert_array_equal(root["data"][key][:], src.load([key])[key])
    back = EpisodeStore.open(out)  # robolearn's own reader: the same store
    assert (back.zarr_format, back.schema, back.fps, back.task) == (2, src.schema, 20, "lift")
    assert back.all_episode_attrs() == src.all_episode_attrs() and back.env_config == {"control_freq": 20}
    assert back.validate(read_all=True)["ok"]
    np.testing.assert_array_equal(back.get_episode(2)["image"], src.get_episode(2)["image"])


def test_existing_output_refused_unless_overwrite(source, tmp_path, capsys):
    out = tmp_path / "dp.zarr"
    dp.export_dp(source, out)
    assert main(["data", "export", "dp", str(source), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"robolearn: error: cannot export to {out}: it already exists (pass --overwrite to replace it)"
    with EpisodeStore.open(source, mode="a") as s:
        s.drop_episodes([0])
    dp.export_dp(source, out, overwrite=True)
    assert EpisodeStore.open(out).n_episodes == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dp.zarr")]  # nothing left beside it
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a zarr store \\(refusing to delete it\\)"):
        dp.export_dp(source, folder, overwrite=True)
    assert (folder / "keep.txt").exists()
    with pytest.raises(StoreError, match="lies inside the store itself"):
        dp.export_dp(source, source / "inner.zarr")
    empty = tmp_path / "empty.zarr"
    EpisodeStore.create(empty, SCHEMA).close()
    with pytest.raises(StoreError, match="holds no episodes"):
        dp.export_dp(empty, tmp_path / "e_dp.zarr")
    assert not (tmp_path / "e_dp.zarr").exists()


def test_chunk_lengths_follow_diffusion_policy():
    assert dp.dp_chunk_len(KeySpec((84, 84, 3), "uint8"), 10_000) == 1
    assert dp.dp_chunk_len(KeySpec((10,), "float32"), 1_000_000) == 50_000  # 2 MB of 40-byte steps
    assert dp.dp_chunk_len(KeySpec((10,), "float32"), 300) == 300  # never longer than the array
