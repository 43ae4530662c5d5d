"""msgpack with numpy arrays, in the wire format openpi's policy server and ``openpi-client`` use.

Why this format: it lets any existing openpi client talk to :class:`~robolearn.runtime.server.PolicyServer`
unchanged, and it is safe to decode from an untrusted peer (no pickle; object dtypes are refused both ways).

- an ``ndarray`` travels as the map ``{b"__ndarray__": True, b"data": <raw bytes>, b"dtype": <dtype.str>,
  b"shape": <tuple>}`` (C order; ``dtype.str`` such as ``"<f4"`` carries the byte order);
- a numpy scalar (``np.float32(1)``...) as ``{b"__npgeneric__": True, b"data": <python value>, b"dtype": ...}``;
- dtypes of kind object (``O``), void/structured (``V``) and complex (``c``) are refused, as openpi refuses them.

Decoding validates what a hostile peer could get wrong: the dtype string, the shape (non-negative ints), and that
``len(data)`` equals ``prod(shape) * itemsize``. Decoded arrays are read-only views of the message buffer.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = frozenset("OVc")


class DecodeError(ValueError):
    """A message that is not valid msgpack-numpy (bad array header, refused dtype, size mismatch...)."""


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind in _REFUSED_KINDS:
        raise TypeError(f"dtype {dtype} (kind {dtype.kind!r}) is not allowed in messages")


def pack_array(obj: Any) -> Any:
    """``default`` hook for msgpack: numpy arrays and scalars to maps; anything else unchanged."""
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype)
        return {
            b"__ndarray__": True,
            b"data": np.ascontiguousarray(obj).tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": tuple(int(s) for s in obj.shape),
        }
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype)
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _dtype_from(raw: Any) -> np.dtype:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        raise DecodeError(f"array dtype must be a string, got {type(raw).__name__}")
    try:
        dtype = np.dtype(raw)
    except TypeError as exc:  # numpy raises TypeError for unknown dtype strings
        raise DecodeError(f"unknown dtype {raw!r}") from exc
    if dtype.kind in _REFUSED_KINDS:
        raise DecodeError(f"dtype {raw!r} (kind {dtype.kind!r}) is not allowed in messages")
    return dtype


def unpack_array(obj: dict) -> Any:
    """``object_hook`` for msgpack: maps written by :func:`pack_array` back to numpy; other maps unchanged."""
    if b"__ndarray__" in obj:
        dtype = _dtype_from(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        data = obj.get(b"data")
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise DecodeError(f"array shape must be a list of non-negative ints, got {shape!r}")
        if not isinstance(data, (bytes, bytearray)):
            raise DecodeError(f"array data must be bytes, got {type(data).__name__}")
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise DecodeError(f"array of shape {tuple(shape)} and dtype {dtype} needs {expected} bytes, "
                              f"got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        dtype = _dtype_from(obj.get(b"dtype"))
        try:
            return dtype.type(obj.get(b"data"))
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"bad numpy scalar of dtype {dtype}: {exc}") from exc
    return obj


Packer = functools.partial(msgpack.Packer, default=pack_array)
packb = functools.partial(msgpack.packb, default=pack_array)


def unpackb(data: bytes, **kwargs: Any) -> Any:
    """Decode a message; any malformation surfaces as :class:`DecodeError` (a ``ValueError``)."""
    try:
        return msgpack.unpackb(data, object_hook=unpack_array, **kwargs)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, TypeError...)
        raise DecodeError(f"not a valid msgpack message: {type(exc).__name__}: {exc}") from exc
