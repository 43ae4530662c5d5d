"""robomimic HDF5 import: files written here with h5py in robomimic's layout, read back exactly; mask filters;
an import stopped by a damaged demo resumes once the file is fixed; every bad input is one clear error naming the
file and the key, exit status 1, and leaves no half-written store. One test goes through the CLI with robosuite
(the task mapping and the environment settings); the rest need no simulator."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from robolearn.cli import main
from robolearn.data import EpisodeStore, StoreError
from robolearn.data.formats import robomimic as rm

# robosuite 1.4's OSC_POSE config, as robomimic's v1.4.1 datasets record it.
OSC_14 = {"type": "OSC_POSE", "input_max": 1, "input_min": -1, "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
          "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], "kp": 150, "damping_ratio": 1,
          "impedance_mode": "fixed", "kp_limits": [0, 300], "damping_ratio_limits": [0, 10],
          "position_limits": None, "orientation_limits": None, "uncouple_pos_ori": True, "control_delta": True,
          "interpolation": None, "ramp_ratio": 0.2}
LOW_DIM = {"object": 10, "robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}


def env_args(env_name: str = "Lift", **kw) -> dict:
    return {"env_name": env_name, "env_version": "1.4.1", "type": 1,
            "env_kwargs": {"has_renderer": False, "has_offscreen_renderer": True, "ignore_done": True,
                           "use_object_obs": True, "use_camera_obs": True, "control_freq": 20,
                           "controller_configs": OSC_14, "robots": ["Panda"], "camera_names": ["agentview"],
                           "camera_heights": 8, "camera_widths": 8, "reward_shaping": False, **kw}}


def demo_arrays(i: int, n: int, image: bool = True, extra: dict | None = None) -> dict[str, np.ndarray]:
    """One demo's arrays (float64 as robomimic writes them, holding float32-exact values), keyed by HDF5 path."""
    rng = np.random.default_rng(i)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32).astype(np.float64)  # noqa: E731
    out = {f"obs/{k}": f32(n, d) for k, d in LOW_DIM.items()}
    out["obs/object"][:, 0] = i  # tells demos apart
    if image:
        out["obs/agentview_image"] = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for k, d in (extra or {}).items():
        out[f"obs/{k}"] = f32(n, d)
    out["actions"] = np.clip(f32(n, 7), -1, 1)
    out["rewards"] = (np.arange(n) == n - 1).astype(np.float64)
    out["dones"] = (np.arange(n) == n - 1).astype(np.int64)
    out["states"] = rng.standard_normal((n, 32))  # float64, not float32-exact: kept as float64
    return out


def write_robomimic(path: Path, lengths=(20, 22, 19, 21, 20), names=None, masks=None, args=None, image=True,
                    extra=None, compression=None) -> dict[str, dict[str, np.ndarray]]:
    """A robomimic file as its dataset_states_to_obs.py writes one; returns what each demo holds."""
    names = names or [f"demo_{i}" for i in range(len(lengths))]
    demos = {}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(args if args is not None else env_args())
        data.attrs["total"] = int(sum(lengths))
        for i, (name, n) in enumerate(zip(names, lengths)):
            g = data.create_group(name)
            g.attrs["num_samples"] = n
            g.attrs["model_file"] = "<mujoco/>"
            arrays = demo_arrays(i, n, image, extra)
            for key, value in arrays.items():
                g.create_dataset(key, data=value, compression=compression if key.startswith("obs/") else None)
            demos[name] = arrays
        for mask, members in (masks or {}).items():
            f[f"mask/{mask}"] = np.array([m.encode() for m in members], dtype="S")
    return demos


def import_plain(path: Path, out: Path, **kw) -> rm.ImportResult:
    """The data room's import, every observation as 'obs' (the CLI asks the task which ones it produces)."""
    header = rm.read_header(path, filter=kw.pop("filter", None))
    schema = rm.store_schema(header, {})
    return rm.import_file(header, out, schema=schema, task="lift", fps=20, env_config={"obs_keys": list(LOW_DIM)},
                          progress=False, **kw)


def assert_episode_is_demo(store: EpisodeStore, index: int, demo: dict[str, np.ndarray]) -> None:
    ep = store.get_episode(index)
    for key, value in demo.items():
        if key.startswith("obs/"):
            got = ep[key[4:]]
        else:
            got = ep[{"actions": "action", "rewards": "reward", "dones": "done", "states": "states"}[key]]
        np.testing.assert_array_equal(got, value, err_msg=key)


def test_round_trip_is_exact_and_in_robomimic_order(tmp_path):
    path = tmp_path / "lift.hdf5"
    demos = write_robomimic(path, lengths=(20, 18, 21, 19), names=["demo_10", "demo_2", "demo_1", "demo_3"])
    result = import_plain(path, tmp_path / "lift.zarr")
    assert result.imported == ["demo_1", "demo_2", "demo_3", "demo_10"]  # by number, as robomimic sorts them
    store = EpisodeStore.open(tmp_path / "lift.zarr")
    assert list(store.episode_lengths) == [21, 18, 19, 20] and result.steps == 78
    for i, name in enumerate(result.imported):
        assert_episode_is_demo(store, i, demos[name])
        assert store.episode_attrs(i) == {"source": "robomimic", "robomimic_file": str(path.resolve()),
                                          "demo": name, "num_samples": len(demos[name]["actions"])}
    s = store.schema
    assert (s["object"].dtype, s["agentview_image"].dtype) == ("float32", "uint8")
    assert s["agentview_image"].shape == (8, 8, 3)
    assert [s[k].role for k in ("action", "reward", "done", "states")] == ["action", "reward", "flag", "other"]
    assert (s["states"].dtype, s["done"].dtype) == ("float64", "uint8")
    assert (store.task, store.fps, store.attrs["source"]["kind"]) == ("lift", 20, "robomimic")
    assert store.attrs["robomimic"]["env_args"]["env_name"] == "Lift"


def test_mask_filter_imports_its_demos_only(tmp_path):
    path = tmp_path / "lift.hdf5"
    demos = write_robomimic(path, masks={"train": ["demo_3", "demo_0", "demo_4"], "valid": ["demo_1"]}, image=False)
    result = import_plain(path, tmp_path / "train.zarr", filter="train")
    assert result.imported == ["demo_0", "demo_3", "demo_4"]
    store = EpisodeStore.open(tmp_path / "train.zarr")
    assert_episode_is_demo(store, 1, demos["demo_3"])
    assert store.attrs["robomimic"]["filter"] == "train"
    with pytest.raises(StoreError, match=r"lift.hdf5: no filter mask/test \(its filters: train, valid\)"):
        rm.read_header(path, filter="test")


def _corrupt(path: Path, dataset: str) -> None:
    """Overwrite the first compressed chunk of ``dataset`` with zeros: metadata intact, data unreadable."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\0" * info.size)


def test_import_stopped_by_a_damaged_demo_resumes_after_the_fix(tmp_path):
    path, out = tmp_path / "lift.hdf5", tmp_path / "lift.zarr"
    write_robomimic(path, compression="gzip")
    _corrupt(path, "data/demo_2/obs/object")
    with pytest.raises(StoreError) as e:
        import_plain(path, out)
    msg = str(e.value)
    assert "lift.hdf5: cannot read data/demo_2/obs/object" in msg and "holds the 2 demos imported before it" in msg
    store = EpisodeStore.open(out)  # whole episodes only, and valid
    assert [a["demo"] for a in store.all_episode_attrs()] == ["demo_0", "demo_1"]
    store.close()
    demos = write_robomimic(path, compression="gzip")  # a good copy of the file
    result = import_plain(path, out)
    assert (result.resumed, result.skipped, result.imported) == (True, ["demo_0", "demo_1"],
                                                                  ["demo_2", "demo_3", "demo_4"])
    store = EpisodeStore.open(out)
    assert [a["demo"] for a in store.all_episode_attrs()] == [f"demo_{i}" for i in range(5)]
    for i in range(5):
        assert_episode_is_demo(store, i, demos[f"demo_{i}"])
    store.close()
    again = import_plain(path, out)  # nothing left to do
    assert again.imported == [] and again.episodes == 5


def test_existing_store_is_refused_unless_overwrite(tmp_path, store_factory):
    path = tmp_path / "lift.hdf5"
    write_robomimic(path, lengths=(20, 20), image=False)
    store_factory(lengths=(5,), name="taken.zarr").close()
    out = tmp_path / "taken.zarr"
    with pytest.raises(StoreError, match=r"taken.zarr already exists and it was not made by importing a robomimic "
                                         r"file; pass --overwrite"):
        import_plain(path, out)
    assert EpisodeStore.open(out).n_episodes == 1  # untouched
    result = import_plain(path, out, overwrite=True)
    assert result.episodes == 2 and EpisodeStore.open(out).task == "lift"
    other = tmp_path / "other.hdf5"
    write_robomimic(other, lengths=(30, 20), image=False)  # another file: not a resume
    with pytest.raises(StoreError, match=r"imported from .*lift.hdf5, whose environment or demos differ"):
        import_plain(other, out)


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("robolearn: error: ") and "\n" not in err
    return err


def test_bad_files_are_one_clear_error_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out.zarr"
    good = tmp_path / "good.hdf5"
    write_robomimic(good, lengths=(20, 21, 22), image=False)

    def err(path: Path, *extra: str) -> str:
        return _cli_error(capsys, ["data", "import", "robomimic", str(path), "--out", str(out), *extra])

    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert f"{cut}: it is truncated" in err(cut)
    text = tmp_path / "notes.hdf5"
    text.write_text("not hdf5")
    assert f"{text}: it is not an HDF5 file" in err(text)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f["observations"] = np.zeros(3)
    assert "is an HDF5 file but not a robomimic dataset: it has no group 'data' (its top level holds observations)" \
        in err(other)
    assert f"{tmp_path / 'absent.hdf5'} does not exist" in err(tmp_path / "absent.hdf5")
    missing = tmp_path / "missing.hdf5"
    write_robomimic(missing, lengths=(20, 21, 22), image=False)
    with h5py.File(missing, "a") as f:
        del f["data/demo_1/obs/robot0_eef_pos"]
    assert (f"{missing}: data/demo_1/obs/robot0_eef_pos is missing (data/demo_0 has it; every demo must hold the "
            f"same keys)") in err(missing)
    no_args = tmp_path / "no_args.hdf5"
    write_robomimic(no_args, lengths=(20,), image=False)
    with h5py.File(no_args, "a") as f:
        del f["data"].attrs["env_args"]
    assert f"{no_args}: data.attrs['env_args'] is missing" in err(no_args)
    short = tmp_path / "short.hdf5"
    write_robomimic(short, lengths=(20, 21), image=False)
    with h5py.File(short, "a") as f:
        f["data/demo_1"].attrs["num_samples"] = 25
    assert f"{short}: data/demo_1/obs/object has 21 steps but data/demo_1.attrs['num_samples'] says 25" in err(short)
    assert f"{good}: no observation 'joint' in data/demo_0/obs" in err(good, "--obs-keys", "object,joint")
    assert not out.exists() and not list(tmp_path.glob(".out.zarr*"))


def test_cli_maps_lift_and_the_store_fits_the_task(tmp_path, capsys):
    """Through robosuite: Lift -> lift with the file's settings (robosuite 1.4's controller is 1.5's default), keys
    the task does not produce kept as 'other' and named; the environment training would make accepts the store."""
    import sim

    from robolearn.cli.io_robomimic import robosuite_kwargs
    from robolearn.cli.train import check_dataset_matches_env

    path, out = tmp_path / "lift.hdf5", tmp_path / "lift.zarr"
    write_robomimic(path, lengths=(20, 21), extra={"robot0_eef_vel_lin": 3})
    assert main(["data", "import", "robomimic", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "observation 'robot0_eef_vel_lin' does not exist in task lift" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert (summary["task"], summary["imported"], summary["not_in_task"]) == ("lift", 2, ["robot0_eef_vel_lin"])
    store = EpisodeStore.open(out)
    cfg = store.env_config
    assert (cfg["obs_keys"], cfg["camera_names"], cfg["camera_size"]) == (list(LOW_DIM), ["agentview"], [8, 8])
    assert (cfg["robosuite_kwargs"], cfg["control_freq"], cfg["robots"], store.fps) == ({}, 20, "Panda", 20)
    assert store.schema["robot0_eef_vel_lin"].role == "other" and store.schema["agentview_image"].role == "obs"
    env = sim.make("lift", **{**cfg, "camera_names": []})  # no renderer in the tests; images checked above
    try:
        check_dataset_matches_env(store, env, list(LOW_DIM), "lift")  # what train checks
    finally:
        env.close()
    # A controller other than robosuite's default, and a kwarg that differs from Lift's default, are recorded.
    kw, notes = robosuite_kwargs(path, "Lift", "Panda", {"controller_configs": {**OSC_14, "kp": 200},
                                                         "table_friction": [1.0, 0.005, 0.0001],
                                                         "initialization_noise": None, "no_such_kwarg": 1})
    assert kw["controller_configs"]["body_parts"]["right"]["kp"] == 200
    assert "table_friction" not in kw and kw["initialization_noise"] is None and "no_such_kwarg" not in kw
    assert any("no_such_kwarg" in n and "ignored" in n for n in notes)
    bad = tmp_path / "bad_env.hdf5"
    write_robomimic(bad, lengths=(20,), args=env_args("Liftt"), image=False)
    e = _cli_error(capsys, ["data", "import", "robomimic", str(bad), "--out", str(tmp_path / "x.zarr")])
    assert f"{bad}: data.attrs['env_args'] names the robosuite environment 'Liftt'" in e and "'Lift'?" in e
    assert not (tmp_path / "x.zarr").exists()


def test_mapping_of_environments():
    assert [rm.task_for_env(e) for e in ("Lift", "PickPlaceCan", "NutAssemblySquare", "Stack")] == \
        ["lift", "can", "square", "robosuite/Stack"]


def test_prefetch_hands_over_items_errors_and_stops_early():
    """The import reads its next batch in a thread: items arrive in order, an error of the reader is raised where
    its item would have been, and a consumer that stops early stops the reader (close() returns)."""
    import threading

    from robolearn.data.formats.robomimic import _read_ahead

    assert list(_read_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield "a"
        raise ValueError("demo_7 is damaged")

    got = []
    with pytest.raises(ValueError, match="demo_7"):
        for item in _read_ahead(failing()):
            got.append(item)
    assert got == ["a"]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    p = _read_ahead(endless())
    for item in p:
        if item == 2:
            break
    p.close()
    assert not any(t.name.startswith("robolearn-prefetch") and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 5  # the reader runs one item ahead at most
