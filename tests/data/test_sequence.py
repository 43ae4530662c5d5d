"""Sequence windows (padding, coverage, splits) and the normalizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from robolearn.data import EpisodeStore, Normalizer, SequenceDataset, WindowIndex, split_episodes


def test_padding_hand_worked():
    # One episode of 4 steps (rows 10..13 after a 10-step episode), horizon 4, n_obs_steps 2, n_action_steps 3:
    # pad_before 1, pad_after 2 -> window offsets t0 = -1, 0, 1, 2; steps outside repeat the edge frame.
    idx = WindowIndex(np.array([10, 14]), horizon=4, pad_before=1, pad_after=2, episodes=[1])
    assert len(idx) == 4
    np.testing.assert_array_equal(
        idx.rows(np.arange(4)),
        [[10, 10, 11, 12],
         [10, 11, 12, 13],
         [11, 12, 13, 13],
         [12, 13, 13, 13]],
    )
    np.testing.assert_array_equal(idx.rows(np.arange(4), length=2), [[10, 10], [10, 11], [11, 12], [12, 13]])


def test_short_episode_still_gives_one_window():
    idx = WindowIndex(np.array([2]), horizon=8, pad_before=1, pad_after=0)
    np.testing.assert_array_equal(idx.rows(0), [[0, 0, 1, 1, 1, 1, 1, 1]])


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    horizon=st.integers(1, 20),
    n_obs=st.integers(1, 20),
    n_act=st.integers(1, 20),
)
def test_every_window_valid_and_every_step_reachable(lengths, horizon, n_obs, n_act):
    n_obs, n_act = min(n_obs, horizon), min(n_act, horizon)
    ends = np.cumsum(lengths)
    idx = WindowIndex(ends, horizon, pad_before=n_obs - 1, pad_after=n_act - 1)
    rows = idx.rows(np.arange(len(idx)))
    starts = np.concatenate([[0], ends[:-1]])
    episode_of_row = np.searchsorted(ends, rows, side="right")
    # Valid: inside the store, and one window never mixes episodes.
    assert rows.min() >= 0 and rows.max() < ends[-1]
    assert (episode_of_row == episode_of_row[:, :1]).all()
    # Monotone within a window, and only the edge frame repeats.
    d = np.diff(rows, axis=1)
    assert ((d == 0) | (d == 1)).all()
    ep = episode_of_row[:, 0]
    repeated = d == 0
    at_edge = (rows[:, 1:] == starts[ep][:, None]) | (rows[:, :-1] == ends[ep][:, None] - 1)
    assert (~repeated | at_edge).all()
    # Reachable: every step of every episode appears in some window.
    assert set(np.unique(rows)) == set(range(int(ends[-1])))
    # The current observation (last of the history) visits each episode's steps 0..L-1, except the tail of
    # horizon - n_obs - n_act + 1 steps that only ever serve as action targets.
    current = set(idx.rows(np.arange(len(idx)), length=n_obs)[:, -1].tolist())
    expected = set()
    for s, n in zip(starts, lengths):
        last = min(n - 1, max(0, n - horizon + n_act + n_obs - 2))
        expected |= set(range(int(s), int(s) + last + 1))
    assert current == expected


def test_split_by_episode_is_seeded_and_disjoint():
    tr, va = split_episodes(20, 0.25, seed=3)
    tr2, va2 = split_episodes(20, 0.25, seed=3)
    np.testing.assert_array_equal(tr, tr2)
    assert len(va) == 5 and not set(tr) & set(va) and set(tr) | set(va) == set(range(20))
    assert not np.array_equal(va, split_episodes(20, 0.25, seed=4)[1])
    assert len(split_episodes(2, 0.01, 0)[1]) == 1  # at least one validation episode when asked for
    with pytest.raises(ValueError, match="val_ratio"):
        split_episodes(5, 1.0, 0)


def test_dataset_batches_in_memory_and_streaming_agree(store_factory):
    store = store_factory(lengths=(9, 12, 7, 10))
    ds = SequenceDataset(store, horizon=6, n_obs_steps=2, n_action_steps=4, val_ratio=0.25, seed=1)
    val = ds.split("val")
    assert len(ds.episodes) == 3 and len(val.episodes) == 1 and not set(ds.episodes) & set(val.episodes)
    stream = SequenceDataset(store, horizon=6, n_obs_steps=2, n_action_steps=4, val_ratio=0.25, seed=1,
                             in_memory=False)
    i = np.arange(len(ds))
    a, b = ds.get_batch(i), stream.get_batch(i)
    for k in ("state", "image"):
        np.testing.assert_array_equal(a["obs"][k], b["obs"][k])
    np.testing.assert_array_equal(a["action"], b["action"])
    assert a["obs"]["image"].shape == (len(ds), 2, 12, 12, 3) and a["action"].shape == (len(ds), 6, 2)
    # The state column 0 holds the episode seed: a window's rows come from one of the training episodes.
    assert set(np.unique(a["obs"]["state"][..., 0])) == set(ds.episodes.astype(float))
    batches = list(ds.batches(8, shuffle=True, seed=0))
    assert all(isinstance(x["action"], torch.Tensor) and x["action"].shape == (8, 6, 2) for x in batches)
    item = ds[0]
    assert item["obs"]["state"].shape == (2, 3) and item["action"].shape == (6, 2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert next(iter(loader))["obs"]["image"].shape == (4, 2, 12, 12, 3)


def test_dataset_errors_name_the_key(store_factory):
    store = store_factory()
    with pytest.raises(Exception, match=r"has no key 'joint_pos'; it has: state \(obs\)"):
        SequenceDataset(store, horizon=4, obs_keys=["joint_pos"])
    with pytest.raises(ValueError, match=r"n_obs_steps must be in \[1, horizon=4\]"):
        SequenceDataset(store, horizon=4, n_obs_steps=5)


def test_normalizer_minmax_meanstd_constant_and_round_trip(tmp_path):
    x = np.array([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [4.0, 5.0, 2.0]])
    stats = {"a": {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}}
    n = Normalizer.from_stats(stats, {"a": "minmax"})
    y = n.normalize("a", torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(y[:, 0], [-1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(y[:, 1], [0, 0, 0], atol=1e-6)  # constant dimension: no division by zero
    assert torch.isfinite(y).all() and y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    torch.testing.assert_close(n.unnormalize("a", y), torch.tensor(x, dtype=torch.float32))
    # A dimension constant in the data is held: whatever a sampler outputs there, the action is the constant.
    wild = torch.tensor([[0.7, -0.9, 0.3]])
    assert n.unnormalize("a", wild)[0, 1].item() == pytest.approx(5.0)
    assert n.unnormalize("a", wild)[0, 0].item() == pytest.approx(2.0 + 0.7 * 2.0)
    m = Normalizer.from_stats(stats, {"a": "meanstd"})
    z = m.normalize("a", torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(0, unbiased=False)[[0, 2]], 1, atol=1e-5)
    assert torch.isfinite(z).all()
    # Serializable: JSON form and the safetensors state dict both give the same transform back.
    again = Normalizer.from_dict(n.to_dict())
    torch.testing.assert_close(again.normalize("a", torch.tensor(x, dtype=torch.float32)), y)
    save_file(n.state_dict(), str(tmp_path / "n.safetensors"))
    fresh = Normalizer.from_dict(n.to_dict())
    fresh.load_state_dict(load_file(str(tmp_path / "n.safetensors")))
    torch.testing.assert_close(fresh.normalize("a", torch.tensor(x, dtype=torch.float32)), y)


def test_normalizer_from_store_stats_and_images(store_factory):
    store: EpisodeStore = store_factory()
    n = Normalizer.from_stats(store.stats(), {"state": "minmax", "image": "image", "action": "meanstd"})
    img = torch.from_numpy(store.load(["image"])["image"])
    y = n.normalize("image", img)
    assert y.dtype == torch.float32 and y.min() >= -1 and y.max() <= 1
    state = torch.from_numpy(store.load(["state"])["state"])
    s = n.normalize("state", state)
    np.testing.assert_allclose(s.min(0).values, -1, atol=1e-5)
    np.testing.assert_allclose(s.max(0).values, 1, atol=1e-5)
    with pytest.raises(KeyError, match="no statistics for key 'joint'"):
        Normalizer.from_stats(store.stats(), {"joint": "minmax"})
    with pytest.raises(ValueError, match="unknown normalization mode 'zscore'"):
        Normalizer.from_stats(store.stats(), {"state": "zscore"})
