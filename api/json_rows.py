"""The lookup's JSON body, written without a per-float pydantic pass (the hot path).

Serialising the floats is most of what a JSON lookup costs beyond the store read: orjson writes
a float32 NumPy matrix in one call (the shortest text that reads back as the same float32),
with no Python list of floats in between. Only when rows are missing (`null`) does it go
through one NumPy view per row.
"""

from __future__ import annotations

import json

import numpy as np
import orjson


def embeddings_json(matrix: np.ndarray, missing: list[int]) -> bytes:
    """`[[...], null, ...]` for a float32 [n, dim] matrix, null for the `missing` rows."""
    if not missing:
        return orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY)
    # Row views with None between them: measured faster than writing runs of rows as
    # sub-matrices (orjson takes a slower path for sliced arrays).
    gone = set(missing)
    rows = [None if i in gone else r for i, r in enumerate(matrix)]
    return orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)


def lookup_json(version: str, dim: int, matrix: np.ndarray, missing: list[int],
                computed: list[int]) -> bytes:
    """A LookupResponse body: {"fm_version", "dim", "embeddings" ([n][dim] floats, null for
    missing rows), "missing", "computed"}. Every float reads back as the same float32."""
    head = json.dumps({"fm_version": version, "dim": dim}, separators=(",", ":"))[:-1].encode()
    tail = json.dumps({"missing": missing, "computed": computed}, separators=(",", ":"))[1:]
    return head + b',"embeddings":' + embeddings_json(matrix, missing) + b"," + tail.encode()
