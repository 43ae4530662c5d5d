"""LeRobot format v3.0 in and out (robolearn/data/formats/lerobot.py, ``robolearn data import|export lerobot``).

Small stores and folders the tests write (3 episodes of about 20 steps, one 16x16 camera), read back with pyarrow
and PyAV. LeRobot's own loader cannot run in robolearn's venv (its torchvision cannot load beside the CPU torch):
``test_lerobot_loader_*`` run it in another interpreter named by ROBOLEARN_LEROBOT_PYTHON and are skipped
without one; ``test_export_has_every_field_lerobots_loader_reads`` checks the same fields without it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from robolearn.cli import main
from robolearn.data import EpisodeStore, KeySpec
from robolearn.data.formats.lerobot import import_lerobot, psnr

SCHEMA = {
    "agent_pos": KeySpec((2,), "float32", "obs"),
    "speed": KeySpec((), "float32", "obs"),
    "keypoint": KeySpec((4, 2), "float32", "obs"),
    "image": KeySpec((16, 16, 3), "uint8", "obs"),
    "action": KeySpec((2,), "float32", "action"),
    "reward": KeySpec((), "float32", "reward"),
    "intervention": KeySpec((), "bool", "flag"),
}
LENGTHS = (20, 17, 23)
FPS = 10
PSNR_MIN_DB = 30.0  # measured 38-40 dB at the default crf 18 on these frames; rendered frames: README

# What LeRobot's loader reads (lerobot 0.4.4 / ledataset 0.4.4): LeRobotDatasetMetadata (load_info's
# info.json keys, its properties fps/features/total_*/chunks_size/data_path/video_path/robot_type,
# get_data_file_path, get_video_file_path), LeRobotDataset (load_hf_dataset, _get_query_indices,
# _query_videos, __getitem__), load_tasks, load_stats.
LOADER_INFO_KEYS = ("codebase_version", "fps", "features", "total_episodes", "total_frames", "total_tasks",
                    "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb", "data_path", "video_path",
                    "robot_type", "splits")
LOADER_EPISODE_COLUMNS = ("episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
                          "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index",
                          "meta/episodes/file_index")
LOADER_VIDEO_COLUMNS = ("videos/{key}/chunk_index", "videos/{key}/file_index", "videos/{key}/from_timestamp",
                        "videos/{key}/to_timestamp")
LOADER_DEFAULT_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64",
                           "index": "int64", "task_index": "int64"}


def frames(n: int, seed: int) -> np.ndarray:
    """Smooth moving patterns, like rendered frames (random noise would say nothing about a video codec)."""
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float64)
    t = np.arange(n, dtype=np.float64)[:, None, None]
    red = 96 + 80 * np.sin((xx + t + 3 * seed) / 6)
    green = 96 + 80 * np.cos((yy - t) / 7)
    blue = np.full_like(red, 40.0 * seed + 30)
    return np.stack([red, green, blue], -1).astype(np.uint8)


def make_store(path: Path) -> None:
    rng = np.random.default_rng(0)
    with EpisodeStore.create(path, SCHEMA, fps=FPS, task="push_t", env_config={"obs_mode": "image", "size": 16},
                             attrs={"source": {"kind": "scripted_expert", "noise": 0.1}}) as store:
        for i, n in enumerate(LENGTHS):
            ep = {k: rng.standard_normal((n, *s.shape)).astype(s.dtype) for k, s in SCHEMA.items()
                  if s.dtype == "float32"}
            ep["image"] = frames(n, i)
            ep["intervention"] = rng.random(n) > 0.5
            store.append_episode(ep, attrs={"source": "scripted", "noise": 0.1, "seed": i, "success": i != 1})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(store, its LeRobot export), written once through the command line."""
    root = tmp_path_factory.mktemp("lerobot")
    store, out = root / "src.zarr", root / "exported"
    make_store(store)
    assert main(["data", "export", "lerobot", str(store), "--out", str(out)]) == 0
    return store, out


def copy_of(exported: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "le"
    shutil.copytree(exported[1], dst)
    return dst


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("robolearn: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_round_trip_exact_and_keeps_everything(exported, tmp_path, capsys):
    store_path, folder = exported
    back = tmp_path / "back.zarr"
    assert main(["data", "import", "lerobot", str(folder), "--out", str(back)]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["imported"] == 3 and summary["written_by"] == "robolearn"
    a, b = EpisodeStore.open(store_path), EpisodeStore.open(back)
    assert b.schema == a.schema
    assert (b.fps, b.task, b.env_config) == (FPS, "push_t", {"obs_mode": "image", "size": 16})
    np.testing.assert_array_equal(b.episode_ends, a.episode_ends)
    assert b.attrs["source"] == a.attrs["source"] == {"kind": "scripted_expert", "noise": 0.1}
    for i in range(a.n_episodes):
        ea, eb = a.get_episode(i), b.get_episode(i)
        for k in SCHEMA:
            assert eb[k].dtype == ea[k].dtype and eb[k].shape == ea[k].shape, k
            if k != "image":
                np.testing.assert_array_equal(eb[k], ea[k], err_msg=k)  # bit for bit
        assert psnr(ea["image"], eb["image"]) > PSNR_MIN_DB
        attrs = b.episode_attrs(i)
        assert attrs.pop("import") == {"format": "lerobot", "path": str(folder.resolve()), "episode_index": i}
        assert attrs == a.episode_attrs(i)
    assert b.attrs["import"]["episodes"] == 3


def test_export_has_every_field_lerobots_loader_reads(exported):
    store_path, folder = exported
    store = EpisodeStore.open(store_path)
    info = json.loads((folder / "meta/info.json").read_text())
    assert set(LOADER_INFO_KEYS) <= set(info) and info["codebase_version"] == "v3.0"
    assert (info["fps"], info["total_episodes"], info["total_frames"]) == (FPS, 3, sum(LENGTHS))
    assert info["splits"] == {"train": "0:3"} and info["total_tasks"] == 1
    feats = info["features"]
    for name, dtype in LOADER_DEFAULT_FEATURES.items():
        assert feats[name]["dtype"] == dtype and feats[name]["shape"] == [1]
    assert feats["observation.state"] == {"dtype": "float32", "shape": [3], "names": ["agent_pos.0", "agent_pos.1",
                                                                                     "speed"], "fps": FPS}
    video = feats["observation.images.image"]
    assert video["dtype"] == "video" and video["shape"] == [16, 16, 3]
    assert video["names"] == ["height", "width", "channels"] and video["info"]["video.codec"] == "h264"
    assert feats["action"]["shape"] == [2] and feats["next.reward"]["shape"] == [1]
    assert feats["next.done"]["dtype"] == "bool" and feats["observation.keypoint"]["shape"] == [8]
    assert all("/" not in name for name in feats)  # LeRobot refuses feature names with '/'

    episodes = pq.read_table(folder / "meta/episodes/chunk-000/file-000.parquet")
    want = list(LOADER_EPISODE_COLUMNS) + [c.format(key="observation.images.image") for c in LOADER_VIDEO_COLUMNS]
    assert set(want) <= set(episodes.column_names)
    rows = episodes.to_pylist()
    assert [r["episode_index"] for r in rows] == [0, 1, 2] and [r["length"] for r in rows] == list(LENGTHS)
    assert [r["dataset_from_index"] for r in rows] == [0, 20, 37] and rows[-1]["dataset_to_index"] == 60
    assert all(r["tasks"] == ["push_t"] for r in rows)

    # Data files: every non-video feature, LeRobot's parquet types (scalar for shape (1,), fixed lists else).
    data = pq.read_table(folder / info["data_path"].format(chunk_index=0, file_index=0))
    assert set(data.column_names) == {k for k, v in feats.items() if v["dtype"] != "video"}
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), 3)
    assert data.schema.field("next.reward").type == pa.float32()
    assert data.schema.field("timestamp").type == pa.float32()
    np.testing.assert_array_equal(data.column("index").to_numpy(), np.arange(60))
    done = data.column("next.done").to_numpy(zero_copy_only=False)
    assert list(np.nonzero(done)[0]) == [19, 36, 59]

    # Tasks: the text is the pandas index, which LeRobot reads back with pd.read_parquet.
    tasks = pq.read_table(folder / "meta/tasks.parquet")
    pandas_meta = json.loads(tasks.schema.metadata[b"pandas"])
    assert tasks.column(pandas_meta["index_columns"][0]).to_pylist() == ["push_t"]
    assert tasks.column("task_index").to_pylist() == [0]

    stats = json.loads((folder / "meta/stats.json").read_text())
    for name in feats:
        assert {"min", "max", "mean", "std", "count"} <= set(stats[name]), name
    np.testing.assert_allclose(stats["action"]["mean"], store.load(["action"])["action"].mean(0), rtol=1e-6)
    assert np.array(stats["observation.images.image"]["mean"]).shape == (3, 1, 1)

    # Video: each frame at from_timestamp + timestamp within LeRobot's tolerance (1e-4 s).
    mp4 = folder / info["video_path"].format(video_key="observation.images.image", chunk_index=0, file_index=0)
    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        times = [float(f.pts * s.time_base) for f in c.decode(s)]
    ts = data.column("timestamp").to_numpy()
    want_times = [rows[e]["videos/observation.images.image/from_timestamp"] + float(ts[i])
                  for e in range(3) for i in range(rows[e]["dataset_from_index"], rows[e]["dataset_to_index"])]
    assert len(times) == 60 and np.max(np.abs(np.array(times) - want_times)) < 1e-4


def test_import_lerobot_folder_without_robolearn_metadata(exported, tmp_path, capsys):
    """What a folder recorded by LeRobot gives: LeRobot's feature names, mapped (observation.state stays whole)."""
    folder = copy_of(exported, tmp_path)
    (folder / "meta/robolearn.json").unlink()
    out = tmp_path / "foreign.zarr"
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out), "--task", "my_robot"]) == 0
    capsys.readouterr()
    a, b = EpisodeStore.open(exported[0]).load(), EpisodeStore.open(out)
    assert b.schema == {"state": KeySpec((3,), "float32", "obs"), "image": KeySpec((16, 16, 3), "uint8", "obs"),
                        "keypoint": KeySpec((8,), "float32", "obs"), "action": KeySpec((2,), "float32", "action"),
                        "reward": KeySpec((), "float32", "reward"), "intervention": KeySpec((), "bool", "other"),
                        "done": KeySpec((), "bool", "flag")}
    got = b.load()
    np.testing.assert_array_equal(got["state"], np.concatenate([a["agent_pos"], a["speed"][:, None]], 1))
    np.testing.assert_array_equal(got["keypoint"], a["keypoint"].reshape(-1, 8))
    np.testing.assert_array_equal(got["action"], a["action"])
    assert (b.fps, b.task, b.attrs["source"]["kind"]) == (FPS, "my_robot", "lerobot")
    assert b.episode_attrs(2)["tasks"] == ["push_t"] and b.attrs["lerobot"]["tasks"] == ["push_t"]


def test_several_files_and_an_interrupted_import_resumes(exported, tmp_path, capsys):
    """Small file limits split data and video over several files; an import stopped after 2 episodes
    continues from there (seeking into the middle of an mp4) and ends equal to an uninterrupted one."""
    folder = tmp_path / "split"
    assert main(["data", "export", "lerobot", str(exported[0]), "--out", str(folder), "--data-file-mb", "0.00001",
                 "--video-file-mb", "0.0001"]) == 0
    assert len(list((folder / "data").rglob("*.parquet"))) == 3
    assert len(list((folder / "videos").rglob("*.mp4"))) >= 2
    out = tmp_path / "resumed.zarr"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_lerobot(folder, out, progress=stop_after_two)
    assert EpisodeStore.open(out).n_episodes == 2  # whole episodes only
    capsys.readouterr()
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out)]) == 0
    summary = last_json(capsys.readouterr().out)
    assert (summary["resumed_from"], summary["imported"], summary["episodes"]) == (2, 1, 3)
    a, b = EpisodeStore.open(exported[0]), EpisodeStore.open(out)
    for i in range(3):
        np.testing.assert_array_equal(b.get_episode(i)["action"], a.get_episode(i)["action"])
        assert psnr(b.get_episode(i)["image"], a.get_episode(i)["image"]) > PSNR_MIN_DB
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out)]) == 0  # complete: nothing to do
    assert last_json(capsys.readouterr().out)["imported"] == 0


def test_v21_folder_is_refused_naming_the_converter(tmp_path, capsys):
    folder = tmp_path / "old"
    (folder / "meta").mkdir(parents=True)
    (folder / "data/chunk-000").mkdir(parents=True)
    pq.write_table(pa.table({"action": [0.0]}), folder / "data/chunk-000/episode_000000.parquet")
    (folder / "meta/info.json").write_text(json.dumps({
        "codebase_version": "v2.1", "fps": 10, "features": {},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"}))
    out = tmp_path / "out.zarr"
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out)]) == 1
    line = one_error(capsys.readouterr().err)
    assert "'v2.1'" in line and "v3.0 only" in line and str(folder / "meta/info.json") in line
    assert "python -m lerobot.scripts.convert_dataset_v21_to_v30" in line
    assert "lerobot.datasets.v30.convert_dataset_v21_to_v30" in line  # its 0.4.x name
    assert not out.exists()


def _break(folder: Path, how: str) -> tuple[str, ...]:
    """Damage a copy of the export; returns what the error must name."""
    info_path = folder / "meta/info.json"
    info = json.loads(info_path.read_text())
    if how == "missing data file":
        f = folder / "data/chunk-000/file-000.parquet"
        f.unlink()
        return str(f), "missing", "episodes 0-2"
    if how == "missing video file":
        f = folder / "videos/observation.images.image/chunk-000/file-000.mp4"
        f.unlink()
        return str(f), "missing", "'observation.images.image'"
    if how == "missing info.json":
        info_path.unlink()
        return str(info_path), "missing"
    if how == "shape disagrees with info.json":  # LeRobot's own folder: the data file is named
        (folder / "meta/robolearn.json").unlink()
        info["features"]["action"]["shape"] = [3]
        info_path.write_text(json.dumps(info))
        return str(folder / "data/chunk-000/file-000.parquet"), "'action'", "2 value(s) per row", "[3]"
    if how == "shape disagrees with robolearn.json":
        info["features"]["observation.state"]["shape"] = [5]
        info_path.write_text(json.dumps(info))
        return str(info_path), "'observation.state'", "'speed'"
    if how == "episode length disagrees":
        ep = folder / "meta/episodes/chunk-000/file-000.parquet"
        t = pq.read_table(ep)
        t = t.set_column(t.column_names.index("length"), "length", pa.array([20, 18, 23], pa.int64()))
        pq.write_table(t, ep)
        return str(folder / "data/chunk-000/file-000.parquet"), "episode 1", "length 18"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing data file", "missing video file", "missing info.json",
                                 "shape disagrees with info.json", "shape disagrees with robolearn.json",
                                 "episode length disagrees"])
def test_bad_input_is_one_clear_error_and_no_store(exported, tmp_path, capsys, how):
    folder = copy_of(exported, tmp_path)
    names = _break(folder, how)
    out = tmp_path / "out.zarr"
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out)]) == 1
    line = one_error(capsys.readouterr().err)
    for part in names:
        assert part in line, (part, line)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["le"]  # nothing half-written


def test_existing_outputs_need_overwrite(exported, tmp_path, capsys):
    store_path, folder = exported
    out_dir = tmp_path / "le_out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    assert main(["data", "export", "lerobot", str(store_path), "--out", str(out_dir)]) == 1
    line = one_error(capsys.readouterr().err)
    assert str(out_dir) in line and "--overwrite" in line and (out_dir / "old.txt").exists()
    assert main(["data", "export", "lerobot", str(store_path), "--out", str(out_dir), "--overwrite"]) == 0
    assert not (out_dir / "old.txt").exists() and (out_dir / "meta/info.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["le_out"]  # no hidden copy left

    other = tmp_path / "other.zarr"
    shutil.copytree(store_path, other)  # a store that is not an import of the folder
    assert main(["data", "import", "lerobot", str(folder), "--out", str(other)]) == 1
    line = one_error(capsys.readouterr().err)
    assert str(other) in line and "--overwrite" in line and "not an unfinished import" in line
    assert EpisodeStore.open(other).n_episodes == 3
    assert main(["data", "import", "lerobot", str(folder), "--out", str(other), "--overwrite"]) == 0
    assert EpisodeStore.open(other).attrs["import"]["path"] == str(folder.resolve())


def test_killed_export_leaves_nothing_and_its_leftovers_are_cleaned(exported, tmp_path):
    from robolearn.data.formats.lerobot import export_lerobot

    out = tmp_path / "le"

    def die(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with EpisodeStore.open(exported[0]) as store, pytest.raises(KeyboardInterrupt):
        export_lerobot(store, out, progress=die)
    assert list(tmp_path.iterdir()) == []
    dead = tmp_path / ".le.export-999999999-0123abcd"  # what a writer killed with SIGKILL leaves (no such pid)
    dead.mkdir()
    with EpisodeStore.open(exported[0]) as store:
        export_lerobot(store, out)
    assert [p.name for p in tmp_path.iterdir()] == ["le"]


# ------------------------------------------------------------------------- LeRobot's own loader (another venv)
LEROBOT_PYTHON = os.environ.get("ROBOLEARN_LEROBOT_PYTHON")
needs_lerobot = pytest.mark.skipif(
    not LEROBOT_PYTHON, reason="set ROBOLEARN_LEROBOT_PYTHON to a python with lerobot-dataset (ledataset) and a "
                               "torchvision/torchcodec that load (see the README); robolearn's venv cannot")
CHECK = str(Path(__file__).with_name("lerobot_loader_check.py"))


@needs_lerobot
def test_lerobot_loader_reads_our_export(exported, tmp_path):
    store_path, folder = exported
    d = EpisodeStore.open(store_path).load()
    done = np.zeros(sum(LENGTHS), bool)
    done[np.cumsum(LENGTHS) - 1] = True
    expected = {"observation.state": np.concatenate([d["agent_pos"], d["speed"][:, None]], 1),
                "observation.images.image": d["image"], "observation.keypoint": d["keypoint"].reshape(-1, 8),
                "action": d["action"], "next.reward": d["reward"], "intervention": d["intervention"],
                "next.done": done}
    np.savez(tmp_path / "expected.npz", **expected)
    subprocess.run([LEROBOT_PYTHON, CHECK, "read", str(folder), str(tmp_path / "expected.npz"),
                    str(tmp_path / "report.json")], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["frames"] == 60 and report["episodes"] == 3 and report["fps"] == FPS
    assert report["missing"] == [] and report["tasks"] == ["push_t"]
    assert report["episode_lengths"] == list(LENGTHS)
    assert all(v == 0.0 for v in report["diff"].values()), report["diff"]  # bit for bit through LeRobot
    assert report["psnr"]["observation.images.image"] > PSNR_MIN_DB


@needs_lerobot
def test_lerobot_loader_written_folder_imports(tmp_path, capsys):
    folder = tmp_path / "written"
    subprocess.run([LEROBOT_PYTHON, CHECK, "write", str(folder), str(tmp_path / "given.npz")], check=True,
                   capture_output=True, timeout=300)
    given = np.load(tmp_path / "given.npz")
    out = tmp_path / "from_lerobot.zarr"
    assert main(["data", "import", "lerobot", str(folder), "--out", str(out)]) == 0
    store = EpisodeStore.open(out)
    got = store.load()
    assert list(store.episode_lengths) == list(given["lengths"]) and store.fps == int(given["fps"])
    np.testing.assert_array_equal(got["state"], given["observation.state"])
    np.testing.assert_array_equal(got["action"], given["action"])
    np.testing.assert_array_equal(got["reward"], given["next.reward"][:, 0])
    np.testing.assert_array_equal(got["done"], given["next.done"][:, 0])
    assert psnr(got["cam"], given["observation.images.cam"]) > 28.0  # LeRobot's own crf 30
    assert [store.episode_attrs(i)["tasks"] for i in range(3)] == [["push the block"], ["pull the block"],
                                                                   ["push the block"]]
    assert store.attrs["lerobot"]["tasks"] == ["push the block", "pull the block"]
