"""Several stores read as one (``train dataset=[a.zarr,b.zarr]``): windows, episodes, split, statistics, checks."""
from __future__ import annotations

import numpy as np
import pytest
from datagen import SCHEMA

from robolearn.data import KeySpec, SequenceDataset, StoreError, StoreSet, merge_stores, split_episodes

KW = dict(horizon=4, n_obs_steps=2, n_action_steps=3, obs_keys=["state"])


def test_several_stores_read_as_one(tmp_path, store_factory):
    a = store_factory(lengths=(5, 7), name="a.zarr")
    b = store_factory(lengths=(3, 6, 4), name="b.zarr")
    ds = SequenceDataset([a.path, b.path], split="all", **KW)
    assert isinstance(ds.store, StoreSet) and ds.store.n_episodes == 5
    np.testing.assert_array_equal(ds.store.episode_ends, [5, 12, 15, 21, 25])
    # Every window of a, then every window of b, reading the same rows.
    one = [SequenceDataset(s, split="all", **KW) for s in (a, b)]
    assert len(ds) == len(one[0]) + len(one[1])
    whole = ds.get_batch(np.arange(len(ds)))
    parts = [d.get_batch(np.arange(len(d))) for d in one]
    for key in ("action",):
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    np.testing.assert_array_equal(whole["obs"]["state"], np.concatenate([p["obs"]["state"] for p in parts]))
    # Streaming reads the same; episode 3 of the set is episode 1 of b.
    stream = SequenceDataset([a.path, b.path], split="all", in_memory=False, **KW)
    np.testing.assert_array_equal(stream.get_batch(np.arange(len(ds)))["action"], whole["action"])
    np.testing.assert_array_equal(ds.store.get_episode(3)["action"], b.get_episode(1)["action"])
    # The validation split is drawn over all five episodes.
    train = SequenceDataset([a.path, b.path], val_ratio=0.4, seed=3, **KW)
    want_train, want_val = split_episodes(5, 0.4, 3)
    np.testing.assert_array_equal(train.episodes, want_train)
    np.testing.assert_array_equal(train.split("val").episodes, want_val)
    # Statistics over both equal those of the merged store.
    a.close()
    b.close()
    with merge_stores([a.path, b.path], tmp_path / "ab.zarr") as merged:
        want = merged.stats()
    got = ds.stats()
    for key in SCHEMA:
        for f in ("min", "max", "mean", "std", "count"):
            np.testing.assert_allclose(got[key][f], want[key][f], rtol=1e-9, atol=1e-9, err_msg=f"{key}.{f}")


def test_stores_that_do_not_fit_together_are_refused_naming_both(store_factory):
    a = store_factory(lengths=(5,), name="a.zarr")
    other = {**SCHEMA, "action": KeySpec((3,), "float32", "action")}
    b = store_factory(lengths=(5,), name="b.zarr", schema=other)
    with pytest.raises(StoreError) as e:
        SequenceDataset([a.path, b.path], **KW)
    assert str(e.value) == (f"cannot train on {a.path} and {b.path}: schemas differ (key 'action' has shape (2,) "
                            f"vs (3,))")
    with pytest.raises(StoreError, match="is given twice"):
        SequenceDataset([a.path, a.path], **KW)
