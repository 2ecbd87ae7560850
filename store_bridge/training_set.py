"""Point-in-time-correct training sets, joined in DuckDB.

Each label row (user, item, time) gets, from the pinned FM version's offline TAEs, the latest
embedding whose event time is <= the row's time and no older than the view's TTL: never a later
one. This is the rule of Feast's `get_historical_features`, which the tests compare against;
DuckDB's ASOF join does it in one pass instead of Feast's window-and-rank query.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from store_bridge.events.schema import EVENT_TIMESTAMP, ITEM_FEATURES, as_microseconds
from store_bridge.repo import FeatureRepo, FMVersion


def _offline_files(glob: Path) -> bool:
    return any(glob.parent.parent.glob(f"{glob.parent.name}/{glob.name}"))


def point_in_time_join(
    labels: pd.DataFrame,
    *,
    tae_glob: Path | None,
    ttl_seconds: int | None,
    items_path: Path | None = None,
    item_features: list[str] = ITEM_FEATURES,
) -> pd.DataFrame:
    """Join label rows with TAEs (as `embedding`) and item features, point in time.

    `labels` needs user_id, item_id, event_timestamp; other columns pass through. Output rows are
    in the input order; `embedding` is None where no embedding is in range.
    """
    for col in ("user_id", "item_id", EVENT_TIMESTAMP):
        if col not in labels.columns:
            raise ValueError(f"label rows lack column {col!r}")
    rows = labels.copy()
    rows[EVENT_TIMESTAMP] = as_microseconds(rows[EVENT_TIMESTAMP])
    rows["__row"] = range(len(rows))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("label_rows", rows)
    select = ["l.*"]
    joins = []
    if tae_glob is not None:
        if _offline_files(tae_glob):
            tae = f"read_parquet('{tae_glob}')"
        else:  # nothing logged yet: every embedding is missing
            tae = (
                "(SELECT NULL::BIGINT AS user_id, NULL::BIGINT AS item_id, "
                "NULL::TIMESTAMPTZ AS event_timestamp, NULL::FLOAT[] AS embedding WHERE false)"
            )
        ttl = f"INTERVAL {int(ttl_seconds)} SECOND" if ttl_seconds else None
        in_ttl = f"l.event_timestamp - t.event_timestamp <= {ttl}" if ttl else "true"
        select.append(f"CASE WHEN {in_ttl} THEN t.embedding END AS embedding")
        joins.append(
            f"ASOF LEFT JOIN {tae} t ON l.user_id = t.user_id AND l.item_id = t.item_id "
            "AND l.event_timestamp >= t.event_timestamp"
        )
    if items_path is not None:
        cols = ", ".join(f"i.{c}" for c in item_features)
        select.append(cols)
        joins.append(
            f"ASOF LEFT JOIN read_parquet('{items_path}') i ON l.item_id = i.item_id "
            "AND l.event_timestamp >= i.event_timestamp"
        )
    sql = f"SELECT {', '.join(select)} FROM label_rows l {' '.join(joins)} ORDER BY l.__row"
    out = con.execute(sql).df()
    con.close()
    out = out.drop(columns="__row")
    out[EVENT_TIMESTAMP] = as_microseconds(out[EVENT_TIMESTAMP])
    if "embedding" in out.columns:
        out["embedding"] = [None if e is None or (not hasattr(e, "__len__")) else e for e in out["embedding"]]
    return out


def expert_training_set(
    repo: FeatureRepo,
    labels: pd.DataFrame,
    fm_version: FMVersion | None,
    item_features: list[str] = ITEM_FEATURES,
) -> pd.DataFrame:
    """The training set of an expert pinned to `fm_version` (None: the no-FM baseline)."""
    return point_in_time_join(
        labels,
        tae_glob=repo.tae_dir(fm_version.version) / "*" / "*.parquet" if fm_version else None,
        ttl_seconds=fm_version.ttl_seconds if fm_version else None,
        items_path=repo.data / "items.parquet",
        item_features=item_features,
    )
