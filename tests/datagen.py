"""Generators of small episodes shared by the tests (importable: tests/ is on pytest's pythonpath)."""
from __future__ import annotations

import numpy as np

from robolearn.data import KeySpec

SCHEMA = {
    "state": KeySpec((3,), "float32", "obs"),
    "image": KeySpec((12, 12, 3), "uint8", "obs"),
    "action": KeySpec((2,), "float32", "action"),
    "reward": KeySpec((), "float32", "reward"),
}


def make_episode(length: int, seed: int, schema: dict[str, KeySpec] = SCHEMA) -> dict[str, np.ndarray]:
    """A random episode whose values also encode (seed, step) so tests can tell episodes apart."""
    rng = np.random.default_rng(seed)
    ep: dict[str, np.ndarray] = {}
    for key, spec in schema.items():
        shape = (length, *spec.shape)
        if spec.dtype == "uint8":
            ep[key] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            ep[key] = rng.standard_normal(shape).astype(spec.dtype)
    if "state" in ep:
        ep["state"][:, 0] = seed
        ep["state"][:, 1] = np.arange(length)
    return ep
