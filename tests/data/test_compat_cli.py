"""diffusion_policy's own store layout (zarr format 2, numcodecs Blosc) and the ``robolearn data`` commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

from robolearn.cli import main
from robolearn.data import EpisodeStore, SequenceDataset


def write_diffusion_policy_store(path: Path, lengths=(30, 20, 25)) -> None:
    """The layout diffusion_policy's ReplayBuffer writes for Push-T image data: zarr v2, Blosc, frames chunked."""
    n = sum(lengths)
    rng = np.random.default_rng(0)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    data = root.create_group("data")
    img = data.create_array("img", shape=(n, 96, 96, 3), chunks=(1, 96, 96, 3), dtype="float32", compressors=blosc)
    img[:] = rng.random((n, 96, 96, 3), dtype=np.float32) * 255
    data.create_array("state", shape=(n, 5), chunks=(n, 5), dtype="float32", compressors=blosc)[:] = rng.random((n, 5))
    data.create_array("action", shape=(n, 2), chunks=(n, 2), dtype="float32", compressors=blosc)[:] = (
        np.arange(n, dtype=np.float32)[:, None].repeat(2, 1)
    )
    meta = root.create_group("meta")
    meta.create_array("episode_ends", shape=(len(lengths),), chunks=(len(lengths),), dtype="int64",
                      compressors=blosc)[:] = np.cumsum(lengths)


def test_opens_diffusion_policy_store(tmp_path):
    path = tmp_path / "pusht_cchi_v7_replay.zarr"
    write_diffusion_policy_store(path)
    store = EpisodeStore.open(path)
    assert store.zarr_format == 2 and not store.is_robolearn
    assert (store.n_episodes, store.n_steps) == (3, 75)
    assert list(store.episode_lengths) == [30, 20, 25]
    assert store.schema["action"].role == "action" and store.schema["img"].role == "obs"
    assert store.schema["img"].shape == (96, 96, 3)
    np.testing.assert_array_equal(store.get_episode(1)["action"][:, 0], np.arange(30, 50))
    ds = SequenceDataset(store, horizon=16, n_obs_steps=2, n_action_steps=8, obs_keys=["state"])
    b = ds.get_batch(np.arange(len(ds)))
    assert b["obs"]["state"].shape == (len(ds), 2, 5) and b["action"].shape == (len(ds), 16, 2)


def test_data_info_json_reads_diffusion_policy_store(tmp_path):
    """Through the installed console script, as a user runs it."""
    path = tmp_path / "dp.zarr"
    write_diffusion_policy_store(path)
    exe = Path(sys.executable).with_name("robolearn")
    out = subprocess.run([str(exe), "data", "info", str(path), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and summary["steps"] == 75
    assert summary["keys"]["img"] == {"shape": [96, 96, 3], "dtype": "float32", "role": "obs"}
    assert summary["zarr_format"] == 2 and summary["size_bytes"] > 0
    assert "episodes  3" in out.stdout


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_validate_drop_merge(store_factory, tmp_path, capsys):
    store_factory(lengths=(5, 7, 3, 4), name="a.zarr").close()
    store_factory(lengths=(2,), name="b.zarr").close()
    a, b, c = (str(tmp_path / n) for n in ("a.zarr", "b.zarr", "c.zarr"))
    assert main(["data", "validate", a]) == 0
    assert _last_json(capsys)["episodes"] == 4
    assert main(["data", "drop", a, "--episodes", "0,2-3"]) == 0
    assert _last_json(capsys) == {"path": a, "dropped": [0, 2, 3], "episodes": 1}
    assert main(["data", "merge", a, b, "--out", c]) == 0
    assert _last_json(capsys)["episodes"] == 2
    assert main(["data", "merge", a, b, "--out", c]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "info", "{tmp}/missing.zarr"], "no store at"),
        (["data", "drop", "{tmp}/a.zarr", "--episodes", "9"], r"cannot drop episodes [9]"),
        (["data", "drop", "{tmp}/a.zarr", "--episodes", "x"], "'x' is not an episode index"),
    ],
)
def test_cli_errors_are_clear(store_factory, tmp_path, capsys, argv, message):
    store_factory(name="a.zarr").close()
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("robolearn: error:") and message in err
    assert "Traceback" not in err
    assert EpisodeStore.open(tmp_path / "a.zarr").n_episodes == 3  # nothing lost


def test_cli_validate_reports_nan(store_factory, tmp_path, capsys):
    store_factory(lengths=(4, 4)).close()
    zarr.open_group(str(tmp_path / "store.zarr"), mode="r+")["data"]["action"][5, 1] = np.nan
    assert main(["data", "validate", str(tmp_path / "store.zarr")]) == 1
    assert "key 'action' has NaN or inf in episode 1 (step 1)" in capsys.readouterr().err


def test_merge_from_v2_into_v3(tmp_path):
    write_diffusion_policy_store(tmp_path / "dp.zarr", lengths=(3, 4))
    assert main(["data", "merge", str(tmp_path / "dp.zarr"), str(tmp_path / "dp.zarr"), "--out",
                 str(tmp_path / "m.zarr")]) == 0
    m = EpisodeStore.open(tmp_path / "m.zarr")
    assert m.zarr_format == 3 and list(m.episode_lengths) == [3, 4, 3, 4]
    np.testing.assert_array_equal(m.get_episode(2)["action"][:, 1], [0, 1, 2])
