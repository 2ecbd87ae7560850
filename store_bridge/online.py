"""Online embedding store: a small interface and its Redis implementation in Feast's layout.

Reads decode Feast's stored float_list values straight into one float32 matrix (see
feast_layout); writes produce the bytes Feast itself would, so `get_online_features` reads
what foundex wrote and foundex reads what `feast materialize` wrote.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import redis

from store_bridge.feast_layout import (
    decode_float_lists,
    encode_float_lists,
    encode_timestamp_us,
    entity_keys,
    feature_field,
    ts_field,
)
from store_bridge.repo import view_name

EMBEDDING = "embedding"


class StoreUnavailable(RuntimeError):
    """The online store did not answer (down, unreachable or timed out)."""


@dataclass
class EmbeddingRows:
    matrix: np.ndarray  # [n, dim] float32, NaN rows where missing
    missing: list[int]  # indices into the requested item_ids


class EmbeddingStore(ABC):
    """Where one FM version's TAEs live online, keyed by (user, item)."""

    @abstractmethod
    def read(self, version: str, dim: int, user_id: int, item_ids: np.ndarray) -> EmbeddingRows:
        """TAEs of `item_ids` for one user, in order; missing rows reported by index."""

    @abstractmethod
    def write(
        self,
        version: str,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        matrix: np.ndarray,
    ) -> int:
        """Write rows (latest event time wins per key); returns how many were written."""

    @abstractmethod
    def ping(self) -> bool: ...


class RedisEmbeddingStore(EmbeddingStore):
    def __init__(self, client: redis.Redis, project: str) -> None:
        self.client = client
        self.project = project

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e

    def read(self, version: str, dim: int, user_id: int, item_ids: np.ndarray) -> EmbeddingRows:
        items = np.asarray(item_ids, dtype=np.int64)
        keys = entity_keys(self.project, {"user_id": np.full(len(items), user_id), "item_id": items})
        field = feature_field(view_name(version), EMBEDDING)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hget(k, field)
                values = pipe.execute()
        except redis.RedisError as e:
            raise StoreUnavailable(f"redis: {e}") from e
        matrix, missing = decode_float_lists(values, dim)
        return EmbeddingRows(matrix, missing)

    def write(
        self,
        version: str,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        ts_us: np.ndarray,
        matrix: np.ndarray,
        *,
        chunk: int = 5000,
    ) -> int:
        view = view_name(version)
        field, tfield = feature_field(view, EMBEDDING), ts_field(view)
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        ts_us = np.asarray(ts_us, dtype=np.int64)
        # Latest row per key only: a batch never overwrites a newer value with an older one.
        order = np.lexsort((ts_us, item_ids, user_ids))
        last = np.ones(len(order), dtype=bool)
        if len(order) > 1:
            same_next = (user_ids[order][1:] == user_ids[order][:-1]) & (
                item_ids[order][1:] == item_ids[order][:-1]
            )
            last[:-1] = ~same_next
        keep = order[last]
        written = 0
        for start in range(0, len(keep), chunk):
            idx = keep[start : start + chunk]
            keys = entity_keys(self.project, {"user_id": user_ids[idx], "item_id": item_ids[idx]})
            values = encode_float_lists(matrix[idx])
            try:
                written += self._write_chunk(keys, values, ts_us[idx], field, tfield)
            except redis.RedisError as e:
                raise StoreUnavailable(f"redis: {e}") from e
        return written

    def _write_chunk(self, keys, values, ts_us, field, tfield) -> int:
        # Two round trips, as Feast's own writer does: read stored event times, then write
        # only rows that are newer, so reruns and late batches never roll a value back.
        with self.client.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.hget(k, tfield)
            stored = pipe.execute()
        written = 0
        with self.client.pipeline(transaction=False) as pipe:
            for k, v, t, old in zip(keys, values, ts_us, stored, strict=True):
                if old is not None and _decode_ts_us(old) > int(t):
                    continue
                pipe.hset(k, mapping={field: v, tfield: encode_timestamp_us(int(t))})
                written += 1
            pipe.execute()
        return written


def _decode_ts_us(raw: bytes) -> int:
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.ParseFromString(raw)
    return t.seconds * 1_000_000 + t.nanos // 1000
