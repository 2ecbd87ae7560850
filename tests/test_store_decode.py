"""Stored rows that cannot be decoded are served as missing, counted, and never fail a read.

Rows are planted with raw HSETs on a real Redis, beside rows written by the store itself.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import FloatList, Value

from store_bridge.feast_layout import (
    decode_float_lists,
    decode_timestamp_us,
    encode_float_lists,
    encode_timestamp_us,
    entity_keys,
    feature_field,
    ts_field,
)
from store_bridge.online import RedisEmbeddingStore
from store_bridge.redis_server import redis_client

DIM = 32
USER = 7
TS = 1_767_571_200_000_000


def _unpacked(row: np.ndarray) -> bytes:
    """The same float_list Value with its floats not packed: valid protobuf, not Feast's bytes."""
    inner = b"".join(b"\x0d" + struct.pack("<f", float(x)) for x in row)
    return b"\x82\x01" + bytes([len(inner) & 0x7F | 0x80, len(inner) >> 7]) + inner


def _plant(store: RedisEmbeddingStore, version: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Twelve candidates: good rows written by the store, then some overwritten by bad bytes.

    Returns the item ids, the matrix written, and the planted index -> expected outcome.
    """
    rng = np.random.default_rng(11)
    items = np.arange(100, 112, dtype=np.int64)
    m = rng.normal(size=(len(items), DIM)).astype(np.float32)
    m[4, 5] = 70000.0  # large but finite: served as it is
    written = np.ones(len(items), dtype=bool)
    written[9] = False  # never stored: plain missing
    ts = np.full(written.sum(), TS, dtype=np.int64)
    assert store.write(version, np.full(written.sum(), USER), items[written], ts, m[written]) == written.sum()

    field = feature_field(f"fm_tae_{version}", "embedding")
    keys = entity_keys(store.project, {"user_id": np.full(len(items), USER), "item_id": items})
    nan_row, inf_row, ninf_row = m[1].copy(), m[2].copy(), m[3].copy()
    nan_row[0], inf_row[DIM - 1], ninf_row[7] = np.nan, np.inf, -np.inf
    good_raw = encode_float_lists(m[6:7])[0]
    wrong_head = bytearray(good_raw)
    wrong_head[0] = 0x0A  # the right length, but field 1 (bytes_val), not float_list_val
    planted = {
        1: encode_float_lists(nan_row[None])[0],
        2: encode_float_lists(inf_row[None])[0],
        3: encode_float_lists(ninf_row[None])[0],
        5: encode_float_lists(rng.normal(size=(1, 2 * DIM)).astype(np.float32))[0],  # 64-d
        6: bytes(wrong_head),
        7: good_raw[:-3],  # truncated
        8: b"\xff\x00garbage",
        10: b"",  # Feast's null (what write_to_online_store stores for None): plain missing
        11: _unpacked(m[11]),  # another valid encoding of the same Value: served
    }
    for i, raw in planted.items():
        store.client.hset(keys[i], field, raw)
    return items, m, planted


def _check(rows, m: np.ndarray) -> None:
    assert rows.missing == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert rows.undecodable == [1, 2, 3, 5, 6, 7, 8]
    served = [0, 4, 11]
    # Byte-exact, not just close: the stored float32 bits come back unchanged.
    assert rows.matrix[served].tobytes() == m[served].tobytes()
    assert rows.matrix[4, 5] == 70000.0
    assert np.isnan(rows.matrix[rows.missing]).all()


def test_bad_rows_are_missing_and_counted_single_node(redis_url):
    store = RedisEmbeddingStore(redis_client(redis_url), "decode_t")
    items, m, _ = _plant(store, "v1")
    try:
        _check(store.read("v1", DIM, USER, items), m)
        # A 32-d view never serves the 64-d row, and a 64-d view serves only it.
        wide = store.read("v1", 2 * DIM, USER, items[[0, 5]])
        assert wide.missing == [0] and wide.undecodable == [0]
        assert np.isfinite(wide.matrix[1]).all()
    finally:
        store.delete_version("v1")


def test_a_key_holding_no_hash_is_undecodable_not_an_error(redis_url):
    """Read as undecodable, skipped by writes: neither fails the whole batch."""
    store = RedisEmbeddingStore(redis_client(redis_url), "decode_wt")
    items = np.array([1, 2, 3], dtype=np.int64)
    m = np.ones((3, DIM), dtype=np.float32)
    store.write("v1", np.full(3, USER), items, np.full(3, TS), m)
    key = entity_keys("decode_wt", {"user_id": np.array([USER]), "item_id": items[1:2]})[0]
    try:
        store.client.delete(key)
        store.client.set(key, b"a string, not a hash")
        rows = store.read("v1", DIM, USER, items)
        assert rows.missing == [1] and rows.undecodable == [1]
        np.testing.assert_array_equal(rows.matrix[[0, 2]], m[[0, 2]])
        # A write batch leaves that key alone and writes the others.
        assert store.write("v1", np.full(3, USER), items, np.full(3, TS + 1), 2 * m) == 2
        assert store.client.get(key) == b"a string, not a hash"
        np.testing.assert_array_equal(store.read("v1", DIM, USER, items).matrix[[0, 2]], 2 * m[[0, 2]])
    finally:
        store.client.delete(key)
        store.delete_version("v1")


def test_a_garbage_stored_time_is_overwritten_single_node(redis_url):
    """The compare-and-set write treats a stored time that is not a Timestamp as older than
    anything, so the key is repaired; a valid newer stored time still wins."""
    store = RedisEmbeddingStore(redis_client(redis_url), "decode_ts")
    items = np.array([1, 2, 3, 4], dtype=np.int64)
    users = np.full(4, USER)
    keys = entity_keys("decode_ts", {"user_id": users, "item_id": items})
    tfield = ts_field("fm_tae_v1")
    first = np.zeros((4, DIM), dtype=np.float32)
    store.write("v1", users, items, np.full(4, TS), first)
    # Garbage; a runaway varint; an unknown field; a valid time far newer than the next write.
    for key, raw in zip(keys, [b"\xff\x00garbage", b"\x08\xff\xff", b"\x18\x01",
                               encode_timestamp_us(TS + 10**9)], strict=True):
        store.client.hset(key, tfield, raw)
    try:
        second = np.ones((4, DIM), dtype=np.float32)
        assert store.write("v1", users, items, np.full(4, TS + 1), second) == 3
        got = store.read("v1", DIM, USER, items)
        np.testing.assert_array_equal(got.matrix[:3], second[:3])
        np.testing.assert_array_equal(got.matrix[3], first[3])
        assert [store.client.hget(k, tfield) for k in keys[:3]] == [encode_timestamp_us(TS + 1)] * 3
    finally:
        store.delete_version("v1")


@pytest.mark.parametrize(
    "raw",
    [b"\xff\x00garbage", b"\x08", b"\x08\xff", b"\x18\x01", b"\x08" + b"\xff" * 11,
     b"\x10\x80\x94\xeb\xdc\x03",  # nanos = 10**9: out of range
     b"\x08\x80\x80\x80\x80\x80\x80\x01"],  # seconds = 2**42: past year 9999
)
def test_decode_timestamp_refuses_what_is_not_a_timestamp(raw):
    assert decode_timestamp_us(raw) is None


def test_decode_timestamp_matches_protobuf():
    rng = np.random.default_rng(2)
    times = np.concatenate([
        rng.integers(-62_135_596_800 * 10**6, 253_402_300_799 * 10**6, 2000),
        [0, 1, -1, 999_999, -1_500_000, TS],
    ])
    assert [decode_timestamp_us(encode_timestamp_us(int(t))) for t in times] == times.tolist()


def test_decode_in_memory_needs_no_server():
    # The same rules as the store reads, on a hand-made list (None = absent).
    m = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)
    good = encode_float_lists(m)
    nan = encode_float_lists(np.full((1, DIM), np.nan, dtype=np.float32))[0]
    null = Value(float_list_val=FloatList(val=[])).SerializeToString()  # a 0-d list: wrong width
    rows = decode_float_lists([good[0], None, nan, null, good[1], b"\x00"], DIM)
    assert rows.missing == [1, 2, 3, 5]
    assert rows.undecodable == [2, 3, 5]
    assert rows.matrix[[0, 4]].tobytes() == m.tobytes()
