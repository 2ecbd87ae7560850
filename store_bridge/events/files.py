"""Reading and writing a dataset: events.parquet, items.parquet and spec.json.

Every producer (the synthetic generator, the KuaiRand and MovieLens loaders) writes through
here, so dtypes on disk are exact: microsecond UTC timestamps, float32 labels with NaN.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fm.timefeatures import as_microseconds
from store_bridge.events.schema import (
    EVENT_TIMESTAMP,
    ITEM_SCHEMA,
    DatasetSpec,
    event_arrow_schema,
    validate_events,
)


def write_dataset(
    out_dir: Path, events: pd.DataFrame, items: pd.DataFrame, spec: DatasetSpec
) -> None:
    """Write events.parquet, items.parquet and spec.json with exact (microsecond) dtypes."""
    validate_events(events, spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = event_arrow_schema(spec.all_tasks)
    table = pa.Table.from_pandas(events[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, out_dir / "events.parquet")
    items_table = pa.Table.from_pandas(
        items[ITEM_SCHEMA.names], schema=ITEM_SCHEMA, preserve_index=False
    )
    pq.write_table(items_table, out_dir / "items.parquet")
    spec.save(out_dir / "spec.json")


def _read_table(path: Path, schema: pa.Schema) -> pd.DataFrame:
    table = pq.read_table(path, schema=schema)
    df = table.to_pandas()
    # Keep microseconds whatever pandas/pyarrow would pick by default.
    df[EVENT_TIMESTAMP] = as_microseconds(df[EVENT_TIMESTAMP])
    return df


def read_dataset(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """Read what `write_dataset` wrote, with the same dtypes, and validate the event log."""
    data_dir = Path(data_dir)
    spec = DatasetSpec.load(data_dir / "spec.json")
    events = _read_table(data_dir / "events.parquet", event_arrow_schema(spec.all_tasks))
    items = _read_table(data_dir / "items.parquet", ITEM_SCHEMA)
    validate_events(events, spec)
    return events, items, spec
