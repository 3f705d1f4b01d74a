"""Order-independent digests of table rows: the sum (mod 2**64) of a 64-bit hash of each row's
``split``, ``id`` and one column's value in a canonical text form, so a source split and the
published tables can be compared block by block (any blocking, any order) without bringing rows
together. Imports neither torch nor Ray.

The canonical form keeps every value exactly (integers as digits, floats in their shortest
round-trip form, bytes as hex, nested values as JSON) and tells a null from every value; the type
itself is compared apart (a digest says whether the values agree).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["value_text", "row_digest", "add_digests", "DIGEST_MOD"]

DIGEST_MOD = 1 << 64


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


def _framed(text: Any) -> list[Any]:
    """``<length>:<text>``: fields joined this way never run into each other, whatever they hold."""
    return [pc.cast(pc.utf8_length(text), pa.string()), ":", text]


def row_digest(split: Any, ids: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray | None = None) -> int:
    """Sum (mod 2**64) over the rows of a hash of ``split``, ``id`` and (if given) the value.
    ``split``: one name for every row, or an array."""
    import pandas as pd

    n = len(ids)
    if n == 0:
        return 0
    sp = pa.array([split] * n, pa.string()) if isinstance(split, str) else pc.cast(split, pa.string())
    parts = _framed(sp) + _framed(pc.cast(ids, pa.string()))
    if values is not None:
        parts.append(value_text(values))
    joined = pc.binary_join_element_wise(*parts, "")
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    h = pd.util.hash_array(joined.to_numpy(zero_copy_only=False), categorize=False)
    return int(np.sum(h, dtype=np.uint64))  # unsigned sums wrap: mod 2**64


def add_digests(*digests: int) -> int:
    """Digests of disjoint row sets combined (their sum mod 2**64)."""
    return sum(digests) % DIGEST_MOD
