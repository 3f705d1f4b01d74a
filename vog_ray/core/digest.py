"""Order-independent digests of table rows: the sum (mod 2**64) of a 64-bit hash of each row's
``split``, ``id`` and one column's value in a canonical text form, so a source split and the
published tables can be compared block by block (any blocking, any order) without bringing rows
together. Imports neither torch nor Ray.

The canonical form keeps every value exactly (integers as digits, floats in their shortest
round-trip form, bytes as hex, nested values as JSON) and tells a null from every value; the type
itself is compared apart (a digest says whether the values agree). The hash runs in numpy over
the Arrow string buffers (no Python object per row): a row's text hashes to the sum of
``weight[position] × (byte + 1)`` (odd 64-bit weights from splitmix64), mixed again with its
length — two different texts of one length collide with probability about 2**-56.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["value_text", "row_digest", "add_digests", "hash_strings", "DIGEST_MOD"]

DIGEST_MOD = 1 << 64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's constants (Steele, Lea & Flood 2014)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_LENGTH_SALT = np.uint64(0xD6E8FEB86659FD93)  # keeps a row's length apart from its bytes' sum


def _plain(arr: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    return arr


def _castable(t: pa.DataType) -> bool:
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t)
            or pa.types.is_temporal(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_null(t))


def value_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Each value as a string: ``"n"`` for null, ``"v<text>"`` otherwise (exact for every type)."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    arr = _plain(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.array(["n"] * len(arr), pa.string())
    if _castable(t):
        text = pc.cast(arr, pa.string())
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        text = pa.array([None if b is None else b.hex() for b in arr.to_pylist()], pa.string())
    else:  # lists, structs, maps …: JSON of the Python values (exact for ints, repr for floats)
        text = pa.array([None if v is None else json.dumps(v, sort_keys=True, default=repr)
                         for v in arr.to_pylist()], pa.string())
    return pc.if_else(pc.is_valid(arr), pc.binary_join_element_wise("v", text, ""), "n")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


_WEIGHTS = {"w": np.zeros(0, np.uint64)}  # odd per-position weights, grown on demand (prefix-stable)


def _weights(n: int) -> np.ndarray:
    w = _WEIGHTS["w"]
    if len(w) < n:
        with np.errstate(over="ignore"):
            w = _mix(np.arange(max(n, 2 * len(w), 64), dtype=np.uint64)) | np.uint64(1)
        _WEIGHTS["w"] = w
    return w


def hash_strings(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each (non-null) string, from the Arrow buffers."""
    arr = pc.cast(values, pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[arr.offset:arr.offset + n + 1]
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    data = np.frombuffer(data_buf, np.uint8)[offsets[0]:offsets[-1]] if data_buf is not None else \
        np.zeros(0, np.uint8)
    sums = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        if len(data):
            pos = np.arange(len(data), dtype=np.int64)
            pos -= np.repeat(starts, lengths)
            cells = _weights(int(lengths.max()))[pos]
            cells *= data.astype(np.uint64) + np.uint64(1)
            full = lengths > 0
            sums[full] = np.add.reduceat(cells, starts[full])
        return _mix(sums ^ _mix(lengths.astype(np.uint64) ^ _LENGTH_SALT))


def _framed(text: Any) -> list[Any]:
    """``<length>:<text>``: fields joined this way never run into each other, whatever they hold."""
    return [pc.cast(pc.utf8_length(text), pa.string()), ":", text]


def row_digest(split: Any, ids: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray | None = None) -> int:
    """Sum (mod 2**64) over the rows of a hash of ``split``, ``id`` and (if given) the value.
    ``split``: one name for every row, or an array."""
    n = len(ids)
    if n == 0:
        return 0
    sp = pa.array([split] * n, pa.string()) if isinstance(split, str) else pc.cast(split, pa.string())
    parts = _framed(sp) + _framed(pc.cast(ids, pa.string()))
    if values is not None:
        parts.append(value_text(values))
    h = hash_strings(pc.binary_join_element_wise(*parts, ""))
    return int(np.sum(h, dtype=np.uint64))  # unsigned sums wrap: mod 2**64


def add_digests(*digests: int) -> int:
    """Digests of disjoint row sets combined (their sum mod 2**64)."""
    return sum(digests) % DIGEST_MOD
