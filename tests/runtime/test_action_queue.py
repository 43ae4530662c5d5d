"""Action queue (stale dropping, blending, ACT temporal ensembling) and the msgpack-numpy wire format."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robolearn.runtime import msgpack_numpy
from robolearn.runtime.action_queue import ActionQueue, ticks_for


def test_stale_actions_are_dropped_and_the_rest_align_to_their_ticks() -> None:
    q = ActionQueue("none")
    # chunk computed from the observation of tick 10, arriving at tick 13: actions for ticks 10, 11, 12 are stale
    dropped, replaced = q.add(np.arange(6.0)[:, None], first_tick=10, now_tick=13)
    assert (dropped, replaced) == (3, 0)
    assert q.remaining(13) == 3
    assert q.pop(13)[0] == 3.0 and q.pop(14)[0] == 4.0
    assert q.pop(16) is None  # tick 15 was skipped: its action is forgotten, and nothing is due at 16
    assert q.remaining(15) == 0


def test_newest_chunk_replaces_queued_actions_without_blending() -> None:
    q = ActionQueue("none")
    q.add(np.zeros((4, 1)), first_tick=0, now_tick=0)
    dropped, replaced = q.add(np.ones((4, 1)), first_tick=2, now_tick=2)
    assert (dropped, replaced) == (0, 2)  # the old chunk's actions for ticks 2 and 3
    assert [q.pop(t)[0] for t in (2, 3, 4, 5)] == [1.0, 1.0, 1.0, 1.0]


def test_temporal_ensembling_hand_worked_example() -> None:
    # Three chunks predict tick 2: A (from tick 0) says 0, B (from tick 1) says 10, C (from tick 2) says 20.
    # With m = ln 2, weights oldest-first are exp(0)=1, exp(-ln2)=1/2, exp(-2 ln2)=1/4: sum 7/4, so the action is
    # (1*0 + 0.5*10 + 0.25*20) / 1.75 = 10 / 1.75 = 5.714285...
    q = ActionQueue("ensemble", ensemble_m=math.log(2))
    q.add(np.array([[-1.0], [-1.0], [0.0]]), first_tick=0, now_tick=0)
    q.add(np.array([[-1.0], [10.0], [11.0]]), first_tick=1, now_tick=1)
    q.add(np.array([[20.0], [21.0]]), first_tick=2, now_tick=2)
    assert q.pop(2)[0] == pytest.approx(10 / 1.75)
    # tick 3: B says 11, C says 21 -> (11 + 0.5 * 21) / 1.5 = 14.333...
    assert q.pop(3)[0] == pytest.approx((11 + 10.5) / 1.5)
    np.testing.assert_allclose(q.weights(3), np.array([4, 2, 1]) / 7)


def test_ensemble_with_m_zero_is_the_plain_mean_and_negative_m_favours_newest() -> None:
    for m, expected in ((0.0, 5.0), (-10.0, 10.0)):
        q = ActionQueue("ensemble", ensemble_m=m)
        q.add(np.array([[0.0]]), first_tick=0, now_tick=0)
        q.add(np.array([[10.0]]), first_tick=0, now_tick=0)
        assert q.pop(0)[0] == pytest.approx(expected, abs=1e-3)


def test_ticks_for_rounds_exact_multiples_correctly() -> None:
    assert ticks_for(0.3, 0.1) == 3 and ticks_for(0.30001, 0.1) == 4
    assert ticks_for(0.25, 0.1, round_up=False) == 2 and ticks_for(0.0, 0.1) == 0


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
       dtype=st.sampled_from(["<f4", "<f8", "<i8", "|u1", "|b1", ">f4"]))
def test_msgpack_numpy_round_trip(shape: list[int], dtype: str) -> None:
    a = (np.arange(int(np.prod(shape)) if shape else 1) % 3).astype(dtype).reshape(shape)
    msg = {"x": a, "s": np.float32(1.5), "nested": {"y": [a, 2]}}
    out = msgpack_numpy.unpackb(msgpack_numpy.packb(msg))
    assert out["x"].dtype == a.dtype and out["x"].shape == a.shape
    np.testing.assert_array_equal(out["x"], a)
    assert out["s"] == np.float32(1.5) and isinstance(out["s"], np.float32)
    np.testing.assert_array_equal(out["nested"]["y"][0], a)


def test_msgpack_numpy_wire_format_is_openpis() -> None:
    raw = msgpack.unpackb(msgpack_numpy.packb(np.array([1.0, 2.0], dtype=np.float32)))
    assert raw == {b"__ndarray__": True, b"data": np.array([1.0, 2.0], np.float32).tobytes(), b"dtype": "<f4",
                   b"shape": [2]}
    raw = msgpack.unpackb(msgpack_numpy.packb(np.int64(7)))
    assert raw == {b"__npgeneric__": True, b"data": 7, b"dtype": "<i8"}


def test_msgpack_numpy_refuses_object_dtypes_and_bad_headers() -> None:
    with pytest.raises(TypeError, match="not allowed"):
        msgpack_numpy.packb(np.array([object()], dtype=object))
    evil = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "|O", b"shape": [1]})
    with pytest.raises(msgpack_numpy.DecodeError, match="not allowed"):
        msgpack_numpy.unpackb(evil)
    short = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 7, b"dtype": "<f8", b"shape": [1]})
    with pytest.raises(msgpack_numpy.DecodeError, match="needs 8 bytes"):
        msgpack_numpy.unpackb(short)
    with pytest.raises(msgpack_numpy.DecodeError):
        msgpack_numpy.unpackb(b"\xc1")


def test_delay_postpones_what_is_queued_and_forgets_what_is_past() -> None:
    q = ActionQueue("ensemble")
    q.add(np.arange(4.0)[:, None], first_tick=0, now_tick=0)  # ticks 0..3
    q.pop(0)
    q.delay(1, 2)  # the robot waited two ticks from tick 1 on: what was due at 1..3 is now due at 3..5
    assert q.pop(1) is None and q.pop(2) is None
    assert [q.pop(t)[0] for t in (3, 4, 5)] == [1.0, 2.0, 3.0]
