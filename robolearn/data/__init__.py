"""Episode store on zarr, sequence windows, normalization and dataset statistics.

The store and schema import only numpy and zarr; the torch-facing parts (windows, normalizer) load on first
use, so ``robolearn data info`` starts without importing torch.
"""
from __future__ import annotations

from typing import Any

from robolearn.data.schema import KeySpec, StoreError
from robolearn.data.store import EpisodeStore, merge_stores

_LAZY = {
    "Normalizer": "robolearn.data.normalizer",
    "SequenceDataset": "robolearn.data.sequence",
    "WindowIndex": "robolearn.data.sequence",
    "split_episodes": "robolearn.data.sequence",
}

__all__ = ["EpisodeStore", "KeySpec", "StoreError", "merge_stores", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robolearn.data' has no attribute {name!r}")
