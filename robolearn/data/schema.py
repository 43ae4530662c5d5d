"""What each array in an episode store means: shape per step, dtype and role."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

ROLES = ("obs", "action", "reward", "flag", "other")


class StoreError(Exception):
    """A store on disk is missing, corrupt, or does not fit what was asked of it.

    The message always names the store path and, where one is involved, the key and the episode.
    """


@dataclass(frozen=True)
class KeySpec:
    """One array of the store: ``shape`` is per step (time axis excluded)."""

    shape: tuple[int, ...]
    dtype: str
    role: str = "obs"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype).name)

    @property
    def is_image(self) -> bool:
        """uint8 ``H x W x C`` arrays are camera images: chunked by whole frames (16 to a chunk), per-channel
        statistics."""
        return np.dtype(self.dtype) == np.uint8 and len(self.shape) == 3

    @property
    def bytes_per_step(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "KeySpec":
        return cls(shape=tuple(d["shape"]), dtype=str(d["dtype"]), role=str(d.get("role", "obs")))


Schema = dict[str, KeySpec]


def schema_to_json(schema: Mapping[str, KeySpec]) -> dict[str, Any]:
    return {k: v.to_json() for k, v in schema.items()}


def schema_from_json(d: Mapping[str, Any]) -> Schema:
    return {k: KeySpec.from_json(v) for k, v in d.items()}


def guess_role(key: str) -> str:
    """Role for stores written without a schema (diffusion_policy's): by the key's name."""
    k = key.lower()
    if k in ("action", "actions") or k.startswith("action"):
        return "action"
    if k in ("reward", "rewards"):
        return "reward"
    if k in ("done", "dones", "terminal", "success", "intervention", "is_first", "is_last"):
        return "flag"
    return "obs"


def schema_mismatch(a: Mapping[str, KeySpec], b: Mapping[str, KeySpec], *,
                    missing_flags_ok: bool = False) -> str | None:
    """Human-readable first difference between two schemas, or None when they match. ``missing_flags_ok``: a
    ``flag`` key only one of them has is no difference (``data merge`` fills it with false)."""
    for key in sorted(set(a) | set(b)):
        if key not in a:
            if missing_flags_ok and b[key].role == "flag":
                continue
            return f"key {key!r} only in the second store"
        if key not in b:
            if missing_flags_ok and a[key].role == "flag":
                continue
            return f"key {key!r} only in the first store"
        if a[key].shape != b[key].shape:
            return f"key {key!r} has shape {a[key].shape} vs {b[key].shape}"
        if a[key].dtype != b[key].dtype:
            return f"key {key!r} has dtype {a[key].dtype} vs {b[key].dtype}"
        if a[key].role != b[key].role:
            return f"key {key!r} has role {a[key].role} vs {b[key].role}"
    return None
