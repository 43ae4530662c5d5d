"""Episode store: round trip, layout, statistics, drop, merge, locking and every bad input's error."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from robolearn import __version__
from robolearn.data import EpisodeStore, KeySpec, StoreError, merge_stores
from robolearn.data.store import time_chunk_len

from datagen import SCHEMA, make_episode


def test_round_trip(store_factory, tmp_path):
    store = store_factory(lengths=(5, 7, 3))
    store.close()
    r = EpisodeStore.open(tmp_path / "store.zarr")
    assert r.n_episodes == 3 and r.n_steps == 15
    np.testing.assert_array_equal(r.episode_ends, [5, 12, 15])
    assert r.schema == SCHEMA
    assert (r.fps, r.task, r.env_config) == (10, "unit", {"a": 1})
    assert r.attrs["robolearn"]["version"] == __version__
    assert r.zarr_format == 3
    for i, n in enumerate((5, 7, 3)):
        ep = r.get_episode(i)
        want = make_episode(n, seed=i)
        for k in SCHEMA:
            np.testing.assert_array_equal(ep[k], want[k])
    np.testing.assert_array_equal(r.get_episode(-1)["state"], make_episode(3, 2)["state"])


def test_layout_is_diffusion_policy_replay_buffer(store_factory, tmp_path):
    store_factory()
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="r")
    assert set(root["data"].array_keys()) == set(SCHEMA)
    assert root["meta"]["episode_ends"].dtype == np.int64
    assert root["data"]["state"].shape == (15, 3)
    # Images: uint8, 16 frames per chunk (fewer when 16 exceed 1 MiB), compressed. Low-dim: time chunks of ~2 MB.
    img = root["data"]["image"]
    assert img.dtype == np.uint8 and img.chunks == (16, 12, 12, 3)
    assert [type(c).__name__ for c in img.compressors] == ["BloscCodec", "Crc32cCodec"]  # compressed, checksummed
    state_chunk = root["data"]["state"].chunks[0]
    assert 1 * 2**20 <= state_chunk * 3 * 4 <= 4 * 2**20
    assert time_chunk_len(KeySpec((84, 84, 3), "uint8")) == 16
    assert time_chunk_len(KeySpec((224, 224, 3), "uint8")) == 6
    assert time_chunk_len(KeySpec((480, 640, 3), "uint8")) == 1


def test_stats_cached_and_refreshed(store_factory):
    store = store_factory(lengths=(5, 7, 3))
    all_state = store.load(["state"])["state"].astype(np.float64)
    s = store.stats()["state"]
    np.testing.assert_allclose(s["mean"], all_state.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["std"], all_state.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(s["min"], all_state.min(0))
    np.testing.assert_allclose(s["max"], all_state.max(0))
    assert store._root["meta"].attrs["stats"]["n_steps"] == 15  # cached, incrementally updated by append
    img = store.stats()["image"]
    assert img["mean"].shape == (3,)  # per channel
    store.append_episode(make_episode(4, seed=9))
    store.drop_episodes([0])
    state = store.load(["state"])["state"].astype(np.float64)
    np.testing.assert_allclose(store.stats()["state"]["mean"], state.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(store.stats()["state"]["max"], state.max(0))


def test_drop_and_merge(store_factory, tmp_path):
    a = store_factory(lengths=(5, 7, 3, 4), name="a.zarr")
    a.drop_episodes([1, 3])
    assert a.n_episodes == 2 and list(a.episode_lengths) == [5, 3]
    np.testing.assert_array_equal(a.get_episode(1)["state"], make_episode(3, 2)["state"])
    a.append_episode(make_episode(6, seed=7))  # still writable after the swap
    a.close()
    assert EpisodeStore.open(tmp_path / "a.zarr").n_episodes == 3
    b = store_factory(lengths=(2,), name="b.zarr")
    b.close()
    m = merge_stores([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "m.zarr")
    assert m.n_episodes == 4 and list(m.episode_lengths) == [5, 3, 6, 2]
    np.testing.assert_array_equal(m.get_episode(3)["image"], make_episode(2, 0)["image"])
    assert m.attrs["merged_from"][1].endswith("b.zarr")


def test_merge_refuses_mismatched_schema(store_factory, tmp_path):
    store_factory(name="a.zarr").close()
    other = dict(SCHEMA, state=KeySpec((4,), "float32", "obs"))
    store_factory(name="b.zarr", schema=other).close()
    with pytest.raises(StoreError, match=r"schemas differ \(key 'state' has shape \(3,\) vs \(4,\)\)"):
        merge_stores([tmp_path / "a.zarr", tmp_path / "b.zarr"], tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


def test_drop_bad_index_names_it(store_factory):
    store = store_factory(lengths=(5, 7))
    with pytest.raises(StoreError, match=r"cannot drop episodes \[7\].*episodes 0\.\.1"):
        store.drop_episodes([0, 7])
    assert store.n_episodes == 2  # nothing lost


def test_second_writer_refused_reader_not_blocked(store_factory, tmp_path):
    writer = store_factory()
    with pytest.raises(StoreError, match=r"already open for writing by pid \d+"):
        EpisodeStore.open(tmp_path / "store.zarr", mode="a")
    reader = EpisodeStore.open(tmp_path / "store.zarr")
    writer.append_episode(make_episode(2, 5))
    assert reader.n_episodes == 3
    reader.refresh()
    assert reader.n_episodes == 4
    writer.close()
    EpisodeStore.open(tmp_path / "store.zarr", mode="a").close()


def test_read_only_store_refuses_writes(store_factory, tmp_path):
    store_factory().close()
    r = EpisodeStore.open(tmp_path / "store.zarr")
    with pytest.raises(StoreError, match="open read-only"):
        r.append_episode(make_episode(2, 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ep: ep.pop("reward"), r"episode 0 lacks key\(s\) \['reward'\]"),
        (lambda ep: ep.update(extra=np.zeros(4)), r"key\(s\) \['extra'\] not in the schema"),
        (lambda ep: ep.update(state=np.zeros((4, 5), "f4")), r"key 'state' has per-step shape \(5,\)"),
        (lambda ep: ep.update(state=np.zeros((3, 3), "f4")), r"keys disagree on the episode's length \(state 3, image 4, action 4, reward 4\)"),
        (lambda ep: ep["action"].__setitem__((2, 1), np.nan), r"key 'action' has NaN or inf at step 2"),
        (lambda ep: ep.update(image=np.zeros((4, 12, 12, 3), "f4")), r"key 'image' is float32, schema says uint8"),
    ],
)
def test_append_bad_episode_is_refused_and_nothing_written(store_factory, mutate, message):
    store = store_factory(lengths=(5,))
    ep = make_episode(4, seed=3)
    mutate(ep)
    with pytest.raises(StoreError, match=message):
        store.append_episode(ep)
    assert store.n_episodes == 1 and store.array("state").shape[0] == 5


def test_validate_lengths_disagree(store_factory, tmp_path):
    store_factory(lengths=(5, 7, 3)).close()
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="r+")
    root["data"]["action"].resize((10, 2))
    with pytest.raises(StoreError, match=r"key 'action' has 10 rows but meta/episode_ends says 15: episode 1"):
        EpisodeStore.open(tmp_path / "store.zarr")


def test_validate_non_increasing_ends(store_factory, tmp_path):
    store_factory(lengths=(5, 7, 3)).close()
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="r+")
    root["meta"]["episode_ends"][:] = [5, 4, 15]
    with pytest.raises(StoreError, match=r"episode_ends is not increasing at episode 1 \(5 then 4\)"):
        EpisodeStore.open(tmp_path / "store.zarr")


def test_validate_missing_schema_key(store_factory, tmp_path):
    store_factory().close()
    shutil.rmtree(tmp_path / "store.zarr" / "data" / "reward")
    with pytest.raises(StoreError, match=r"schema key 'reward' has no array data/reward"):
        EpisodeStore.open(tmp_path / "store.zarr")


def test_validate_nan_in_actions_names_episode(store_factory, tmp_path):
    store_factory(lengths=(5, 7, 3)).close()
    root = zarr.open_group(str(tmp_path / "store.zarr"), mode="r+")
    root["data"]["action"][8, 0] = np.inf  # episode 1, step 3
    with pytest.raises(StoreError, match=r"key 'action' has NaN or inf in episode 1 \(step 3\)"):
        EpisodeStore.open(tmp_path / "store.zarr")
    # Opening without validation still works, so a user can inspect and drop the bad episode.
    s = EpisodeStore.open(tmp_path / "store.zarr", mode="a", validate=False)
    s.drop_episodes([1])
    assert s.validate()["episodes"] == 2


def test_corrupt_and_missing_stores(tmp_path, store_factory):
    with pytest.raises(StoreError, match=r"no store at .*nowhere\.zarr"):
        EpisodeStore.open(tmp_path / "nowhere.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match=r"plain is not a zarr store"):
        EpisodeStore.open(tmp_path / "plain")
    store_factory().close()
    (tmp_path / "store.zarr" / "meta" / "episode_ends" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"cannot read store .*store\.zarr"):
        EpisodeStore.open(tmp_path / "store.zarr")


def test_create_refuses_existing_and_bad_schema(store_factory, tmp_path):
    store_factory().close()
    with pytest.raises(StoreError, match="already exists"):
        EpisodeStore.create(tmp_path / "store.zarr", SCHEMA)
    with pytest.raises(ValueError, match="role 'observation' is not one of"):
        KeySpec((2,), "float32", "observation")


def test_open_or_create_resumes_and_checks_schema(store_factory, tmp_path):
    store_factory(lengths=(3,)).close()
    s = EpisodeStore.open_or_create(tmp_path / "store.zarr", SCHEMA, fps=10)
    assert s.n_episodes == 1
    s.close()
    other = dict(SCHEMA, action=KeySpec((3,), "float32", "action"))
    with pytest.raises(StoreError, match=r"schema differs .*key 'action' has shape \(2,\) vs \(3,\)"):
        EpisodeStore.open_or_create(tmp_path / "store.zarr", other, fps=10)
    with pytest.raises(StoreError, match=r"fps 10 in the store vs 20"):
        EpisodeStore.open_or_create(tmp_path / "store.zarr", SCHEMA, fps=20)
    # The refused open released its lock.
    EpisodeStore.open(tmp_path / "store.zarr", mode="a").close()


def test_env_config_must_be_json(tmp_path):
    with pytest.raises(StoreError, match="its attributes are not JSON-serializable"):
        EpisodeStore.create(tmp_path / "x.zarr", SCHEMA, env_config={"f": object()})
    assert not (tmp_path / "x.zarr").exists()


def test_overwrite_and_merge_never_delete_what_is_not_a_store(store_factory, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(StoreError, match="is not an episode store"):
        EpisodeStore.create(tmp_path / "notes", SCHEMA, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").exists()
    store_factory(name="a.zarr").close()
    with pytest.raises(StoreError, match="contains or lies inside the source"):
        merge_stores([tmp_path / "a.zarr"], tmp_path, overwrite=True)
    held = EpisodeStore.open(tmp_path / "a.zarr", mode="a")
    with pytest.raises(StoreError, match="already open for writing"):
        EpisodeStore.create(tmp_path / "a.zarr", SCHEMA, overwrite=True)
    held.close()
    assert EpisodeStore.open(tmp_path / "a.zarr").n_episodes == 3


def test_unfinished_append_to_a_store_with_zero_fill(tmp_path):
    """diffusion_policy's stores fill episode_ends with 0: an end allocated but never written reads as 0."""
    root = zarr.open_group(str(tmp_path / "dp.zarr"), mode="w", zarr_format=2)
    root.create_group("data").create_array("action", shape=(9, 2), dtype="float32")[:] = 1.0
    ends = root.create_group("meta").create_array("episode_ends", shape=(3,), dtype="int64", fill_value=0)
    ends[:2] = [4, 9]  # the third end was allocated by a killed writer, never written
    store = EpisodeStore.open(tmp_path / "dp.zarr")
    assert store.n_episodes == 2 and store.validate()["uncommitted_episode_ends"] == 1


def test_store_with_nan_opens_for_dropping(store_factory, tmp_path):
    store_factory(lengths=(3, 3)).close()
    zarr.open_group(str(tmp_path / "store.zarr"), mode="r+")["data"]["action"][4, 0] = np.nan
    with EpisodeStore.open(tmp_path / "store.zarr", mode="a") as s:
        s.drop_episodes([1])
    assert EpisodeStore.open(tmp_path / "store.zarr").n_episodes == 1


def test_drop_beside_a_backup_is_refused_and_the_backup_kept(store_factory, tmp_path):
    """A store beside a drop's backup: which one is wanted cannot be proven, so nothing deletes the backup
    (the old behaviour deleted it, and with it the original episodes: issue 11)."""
    store = store_factory(lengths=(3, 4, 5))
    (tmp_path / ".store.zarr.drop-backup").mkdir()
    (tmp_path / ".store.zarr.drop-backup" / "x").write_text("old")
    with pytest.raises(StoreError, match=r"delete \.store\.zarr\.drop-backup; to go back to the backup"):
        store.drop_episodes([0])
    assert list(store.episode_lengths) == [3, 4, 5]
    assert (tmp_path / ".store.zarr.drop-backup" / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.zarr.drop-backup", "store.zarr"]
