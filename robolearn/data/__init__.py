"""Episode store on zarr, sequence windows, normalization and dataset statistics.

The store and schema import only numpy and zarr; the torch-facing parts (windows, normalizer) load on first
use, so ``robolearn data info`` starts without importing torch.
"""
from __future__ import annotations

from typing import Any

from robolearn.data.provenance import source_lines, store_sources
from robolearn.data.schema import KeySpec, StoreError
from robolearn.data.store import EpisodeStore, check_compatible, merge_stores
from robolearn.data.storeset import StoreSet, dataset_ref, open_stores

_LAZY = {
    "Normalizer": "robolearn.data.normalizer",
    "SequenceDataset": "robolearn.data.sequence",
    "WindowIndex": "robolearn.data.sequence",
    "split_episodes": "robolearn.data.sequence",
}

__all__ = ["EpisodeStore", "KeySpec", "StoreError", "StoreSet", "check_compatible", "dataset_ref", "merge_stores",
           "open_stores", "source_lines", "store_sources", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'robolearn.data' has no attribute {name!r}")
