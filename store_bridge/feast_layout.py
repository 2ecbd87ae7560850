"""Feast's Redis layout, encoded and decoded in bulk.

Feast's Redis online store keeps one hash per entity key; the hash key is the serialized entity
key (join keys sorted, v3 encoding) followed by the project name, every feature is a field named
by murmur3 of `view:feature` holding a serialized `feast.types.Value`, and `_ts:view` holds the
row's event time as a serialized `google.protobuf.Timestamp`. Writing and reading exactly that
layout keeps `FeatureStore.get_online_features`, `feast serve` and `feast materialize`
interoperable with foundex's own fast paths.

A `float_list_val` Value is a fixed header (field tag + two varint lengths, which depend only on
the vector length) followed by the packed little-endian float32 values, so a batch of vectors of
one dimension encodes and decodes as one NumPy reshape.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import mmh3
import numpy as np
from feast.protos.feast.types.Value_pb2 import FloatList, Value
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

# Entity-key value type ids from feast.types.Value (ValueType enum).
_STRING = 2
_INT64 = 4


def feature_field(view: str, feature: str) -> bytes:
    """The hash field Feast uses for `view:feature` (murmur3-32, little endian)."""
    return struct.pack("<I", mmh3.hash(f"{view}:{feature}", signed=False))


def ts_field(view: str) -> bytes:
    return f"_ts:{view}".encode()


@lru_cache(maxsize=16)
def _key_prefix(join_keys: tuple[str, ...]) -> bytes:
    parts = [struct.pack("<I", len(join_keys))]
    for k in join_keys:
        raw = k.encode()
        parts += [struct.pack("<II", _STRING, len(raw)), raw]
    return b"".join(parts)


def entity_key_prefix(join_keys: list[str] | tuple[str, ...]) -> bytes:
    """The bytes every Redis key of these join keys starts with (Feast scans by it)."""
    return _key_prefix(tuple(sorted(join_keys)))


def entity_keys(project: str, columns: dict[str, np.ndarray]) -> list[bytes]:
    """Redis keys for int64 entity rows, e.g. {"user_id": users, "item_id": items}.

    Equal to Feast's `serialize_entity_key(..., 3) + project` for every row (tested against it).
    """
    names = tuple(sorted(columns))
    n = len(next(iter(columns.values())))
    # One record per row: for every key (sorted by name) type, length, int64 value.
    dtype = np.dtype([(f"{p}{i}", "<u4" if p != "v" else "<i8") for i in range(len(names)) for p in ("t", "l", "v")])
    rec = np.empty(n, dtype=dtype)
    for i, name in enumerate(names):
        rec[f"t{i}"] = _INT64
        rec[f"l{i}"] = 8
        rec[f"v{i}"] = np.asarray(columns[name], dtype=np.int64)
    prefix = _key_prefix(names)
    suffix = project.encode()
    raw = rec.tobytes()
    width = dtype.itemsize
    return [prefix + raw[i * width : (i + 1) * width] + suffix for i in range(n)]


@lru_cache(maxsize=64)
def float_list_header(dim: int) -> bytes:
    """Bytes that precede `dim` packed float32 values in a serialized float_list Value."""
    full = Value(float_list_val=FloatList(val=[0.0] * dim)).SerializeToString()
    return full[: len(full) - 4 * dim]


def float_list_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row of a [n, d] matrix serialized as a Feast float_list Value: [n, width] uint8."""
    m = np.ascontiguousarray(matrix, dtype="<f4")
    n, d = m.shape
    header = np.frombuffer(float_list_header(d), dtype=np.uint8)
    buf = np.empty((n, len(header) + 4 * d), dtype=np.uint8)
    buf[:, : len(header)] = header
    buf[:, len(header) :] = m.view(np.uint8).reshape(n, 4 * d)
    return buf


def encode_float_lists(matrix: np.ndarray) -> list[bytes]:
    """Serialize each row of a [n, d] matrix as a Feast float_list Value."""
    buf = float_list_rows(matrix)
    raw, w = buf.tobytes(), buf.shape[1]
    return [raw[i * w : (i + 1) * w] for i in range(len(buf))]


@dataclass
class DecodedRows:
    """Stored float_list Values decoded into one matrix.

    `matrix` is [n, dim] float32 with NaN rows where nothing usable is stored; `missing` holds
    the indices of those rows, ascending: absent, Feast's null (an empty Value) or undecodable;
    `undecodable` the subset of `missing` whose stored bytes were present but unusable: not a
    float_list Value, another width, truncated, or holding NaN/Inf.
    """

    matrix: np.ndarray
    missing: list[int]
    undecodable: list[int]


def decode_float_lists(values: list[bytes | None], dim: int) -> DecodedRows:
    """Decode stored Values (None where absent) into a [n, dim] float32 matrix, never raising
    for a bad row: each is reported in `missing` and `undecodable` while the others are served.

    Rows of the packed layout Feast writes decode in one vectorised pass; only rows that do not
    fit it are parsed with protobuf (another valid encoding of the same Value is still served).
    """
    header = float_list_header(dim)
    width = len(header) + 4 * dim
    n = len(values)
    out = np.full((n, dim), np.nan, dtype=np.float32)
    lengths = np.fromiter([-1 if v is None else len(v) for v in values], dtype=np.int64, count=n)
    served = np.zeros(n, dtype=bool)
    fits = np.flatnonzero(lengths == width)
    if len(fits):
        fitting = values if len(fits) == n else [values[i] for i in fits.tolist()]
        raw = np.frombuffer(b"".join(fitting), dtype=np.uint8).reshape(len(fits), width)  # type: ignore[arg-type]
        vecs = raw[:, len(header) :].copy().view("<f4")
        heads = raw[:, : len(header)] == np.frombuffer(header, dtype=np.uint8)
        ok = np.ones(len(fits), dtype=bool) if heads.all() else heads.all(axis=1)
        # A row sum is NaN/Inf when any value is, and a cheaper pass than isfinite over every
        # value; a finite row whose float32 sum overflows is rechecked value by value.
        sums_ok = np.isfinite(np.einsum("ij->i", vecs))
        if not sums_ok.all():
            sums_ok[~sums_ok] = np.isfinite(vecs[~sums_ok]).all(axis=1)
        ok &= sums_ok
        if ok.all():
            out[fits] = vecs
            served[fits] = True
        else:
            out[fits[ok]] = vecs[ok]
            served[fits[ok]] = True
    # Present but not in the packed layout of this width: the rare slow path.
    odd = (lengths >= 0) & ~served
    if not odd.any():
        return DecodedRows(out, np.flatnonzero(lengths < 0).tolist(), [])
    bad = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(odd).tolist():
        vec = _parse_float_list(values[i], dim)  # type: ignore[arg-type]
        if vec is _NULL:
            continue
        if vec is None:
            bad[i] = True
        else:
            out[i] = vec
            served[i] = True
    return DecodedRows(out, np.flatnonzero(~served).tolist(), np.flatnonzero(bad).tolist())


_NULL = np.empty(0, dtype=np.float32)  # a Value that holds nothing, as Feast writes a None


def _parse_float_list(raw: bytes, dim: int) -> np.ndarray | None:
    """One stored Value parsed by protobuf: its `dim` finite floats; `_NULL` for Feast's null
    (an empty Value, b"", or `null_val`); None for anything else."""
    value = Value()
    try:
        value.ParseFromString(raw)
    except (DecodeError, ValueError, TypeError):
        return None
    kind = value.WhichOneof("val")
    if kind is None or kind == "null_val":
        return _NULL
    if kind != "float_list_val" or len(value.float_list_val.val) != dim:
        return None
    vec = np.asarray(value.float_list_val.val, dtype=np.float32)
    return vec if np.isfinite(vec).all() else None


def encode_timestamp_us(ts_us: int) -> bytes:
    t = Timestamp()
    t.FromMicroseconds(int(ts_us))
    return t.SerializeToString()


# The range google.protobuf.Timestamp allows: 0001-01-01 to 9999-12-31, in seconds.
_TS_MIN_S, _TS_MAX_S = -62_135_596_800, 253_402_300_799


def decode_timestamp_us(raw: bytes) -> int | None:
    """A stored serialized Timestamp as microseconds since 1970, or None if the bytes are not
    one (only fields 1 and 2 as varints of at most 10 bytes, seconds and nanos in range).

    The same rules as the compare-and-set write script's decoder in `online.py`.
    """
    secs = nanos = 0
    i, n = 0, len(raw)
    while i < n:
        tag = raw[i]
        if tag not in (0x08, 0x10):
            return None
        i += 1
        v, shift = 0, 0
        while True:
            if i >= n or shift > 63:
                return None
            b = raw[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if tag == 0x08:
            secs = v - (1 << 64) if v >= 1 << 63 else v  # int64, two's complement
        else:
            nanos = v
    if not (_TS_MIN_S <= secs <= _TS_MAX_S and 0 <= nanos < 1_000_000_000):
        return None
    return secs * 1_000_000 + nanos // 1000


def _varints(values: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Little-endian base-128 varints of non-negative values < 2**(7*width): bytes [n, width]
    (continuation bits set) and each value's length in bytes."""
    v = values.astype(np.uint64)
    shifts = (7 * np.arange(width, dtype=np.uint64))[None, :]
    groups = (v[:, None] >> shifts) & np.uint64(0x7F)
    length = np.maximum(1, ((v[:, None] >> shifts) != 0).sum(axis=1))
    more = np.arange(width)[None, :] < (length[:, None] - 1)
    return (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8), length


TIMESTAMP_WIDTH = 12  # the longest serialized Timestamp timestamp_records_us produces


def timestamp_records_us(ts_us: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Serialized Timestamps of many event times, left-aligned in [n, TIMESTAMP_WIDTH] uint8
    records, and each one's length; None if a time is before 1970 or after year 3058."""
    ts = np.asarray(ts_us, dtype=np.int64)
    secs, micros = np.divmod(ts, 1_000_000)
    if len(ts) and (secs.min() < 0 or secs.max() >= 2**35):
        return None
    sec_bytes, sec_len = _varints(secs, 5)
    nano_bytes, nano_len = _varints(micros * 1000, 5)
    n = len(ts)
    rec = np.empty((n, TIMESTAMP_WIDTH), dtype=np.uint8)
    rec[:, 0], rec[:, 1:6], rec[:, 6], rec[:, 7:12] = 0x08, sec_bytes, 0x10, nano_bytes
    keep = np.zeros((n, TIMESTAMP_WIDTH), dtype=bool)  # proto3 leaves zero-valued fields out
    keep[:, 0] = secs != 0
    keep[:, 1:6] = (np.arange(5)[None, :] < sec_len[:, None]) & (secs != 0)[:, None]
    keep[:, 6] = micros != 0
    keep[:, 7:12] = (np.arange(5)[None, :] < nano_len[:, None]) & (micros != 0)[:, None]
    out = np.zeros_like(rec)
    rows, _ = np.nonzero(keep)
    out[rows, (np.cumsum(keep, axis=1) - 1)[keep]] = rec[keep]
    return out, keep.sum(axis=1)


def encode_timestamps_us(ts_us: np.ndarray) -> list[bytes]:
    """`encode_timestamp_us` for many event times at once (same bytes, no per-row protobuf)."""
    records = timestamp_records_us(ts_us)
    if records is None:
        return [encode_timestamp_us(int(t)) for t in np.asarray(ts_us, dtype=np.int64)]
    rec, lengths = records
    raw = rec.tobytes()
    return [raw[i * TIMESTAMP_WIDTH : i * TIMESTAMP_WIDTH + n] for i, n in enumerate(lengths.tolist())]
