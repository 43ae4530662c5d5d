"""Per-episode attributes: kept with their episode through append, drop, merge, reopen and a writer killed
between writing them and committing the episode."""
from __future__ import annotations

import json

import pytest
import zarr

from robolearn.data import EpisodeStore, StoreError, merge_stores

from datagen import make_episode


def test_attrs_follow_their_episodes(store_factory, tmp_path):
    store = store_factory(lengths=(4, 5))  # scripted-style: no attrs, and no list is written for them
    assert "episode_attrs" not in zarr.open_group(str(store.path / "meta"), mode="r").attrs
    assert store.all_episode_attrs() == [{}, {}]
    assert store.append_episode(make_episode(3, seed=2), attrs={"device": "keyboard", "seed": 7}) == 2
    store.append_episode(make_episode(6, seed=3))  # none given: {}
    store.append_episodes([make_episode(2, seed=4), make_episode(2, seed=5)], [{"n": 4}, None])
    assert store.all_episode_attrs() == [{}, {}, {"device": "keyboard", "seed": 7}, {}, {"n": 4}, {}]
    assert store.episode_attrs(-4) == {"device": "keyboard", "seed": 7}
    with pytest.raises(IndexError):
        store.episode_attrs(6)
    store.drop_episodes([0, 3])
    assert store.all_episode_attrs() == [{}, {"device": "keyboard", "seed": 7}, {"n": 4}, {}]
    store.close()
    reopened = EpisodeStore.open(store.path)
    assert reopened.episode_attrs(1) == {"device": "keyboard", "seed": 7}
    other = EpisodeStore.create(tmp_path / "other.zarr", store.schema, fps=10, task="unit")
    other.append_episode(make_episode(3, seed=9))
    other.close()
    merged = merge_stores([store.path, tmp_path / "other.zarr"], tmp_path / "merged.zarr")
    assert merged.all_episode_attrs() == [{}, {"device": "keyboard", "seed": 7}, {"n": 4}, {}, {}]


def test_bad_attrs_are_refused_and_nothing_written(store_factory):
    store = store_factory(lengths=(3,))
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.append_episode(make_episode(2, seed=1), attrs={"when": object()})
    with pytest.raises(StoreError, match="2 episodes but 1 attrs"):
        store.append_episodes([make_episode(2, seed=1), make_episode(2, seed=2)], [{}])
    assert store.n_episodes == 1 and store.all_episode_attrs() == [{}]


def test_attrs_of_an_episode_that_never_committed_are_ignored_and_replaced(store_factory):
    store = store_factory(lengths=(3,))
    store.append_episode(make_episode(2, seed=1), attrs={"i": 1})
    # A writer killed after writing the attrs of episode 2 but before its episode_ends entry: a third entry.
    meta = zarr.open_group(str(store.path / "meta"), mode="r+")
    meta.attrs["episode_attrs"] = [{}, {"i": 1}, {"orphan": True}]
    store.close()
    reader = EpisodeStore.open(store.path)
    assert reader.n_episodes == 2 and reader.all_episode_attrs() == [{}, {"i": 1}]
    writer = EpisodeStore.open(store.path, mode="a")  # trims the orphan entry
    assert json.loads((store.path / "meta" / "zarr.json").read_text())["attributes"]["episode_attrs"] == [{}, {"i": 1}]
    writer.append_episode(make_episode(2, seed=2))  # the next episode does not inherit the orphan's attrs
    assert writer.all_episode_attrs() == [{}, {"i": 1}, {}]
