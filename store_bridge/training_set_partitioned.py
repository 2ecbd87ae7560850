"""Training sets in bounded memory: the point-in-time join of `training_set.py`, one hash
partition of the (user, item) keys at a time.

`point_in_time_join` holds every label row and every offline TAE row at once: the fastest way
while they fit. Past that, `build_training_set_partitioned` makes the same rows in two passes:

  1. partition: stream the label rows (a parquet file, batch by batch, validated with the
     in-memory path's rules) and the offline TAE files (in file order, batch by batch) into P
     bucket files each on a scratch directory, bucket = hash(user_id, item_id) mod P. Rows keep
     their order within a bucket, so the tie rule of `asof_indices` (equal keys and time: the
     row that comes last in file order, then row order) holds exactly; each label row carries
     its input position.
  2. join: one bucket at a time, `asof_indices` over the bucket's rows (the same function as
     the in-memory path), Feast's TTL rule, embeddings gathered as one (n, d) float32 matrix,
     written as one parquet file of the output directory.

P is chosen from the input sizes so one bucket's working set fits `bucket_bytes`. The output
appears at once (written under a temporary name, then renamed); scratch files are removed
whatever happens. `choose_path` picks this path or the in-memory one from the input size.

Against `point_in_time_join`'s frame, the output has the same rows, columns (in the same
order) and values; what differs:
  - layout: part-00000.parquet ... (one per non-empty bucket; one empty part when there are
    no label rows), rows grouped by bucket, in input order within a bucket;
  - `label_row` (int64, last column): the row's position in the input file; sort on it to
    get the input order back;
  - `embedding`: a list<float32> column, null where the in-memory frame holds None (there:
    read-only float32 arrays);
  - label columns keep the Arrow types of the label file (a pandas index stored in the file
    is dropped, as the in-memory join drops the frame's index);
  - stricter on offline files: every file is read, so one whose embeddings are null or of
    another width raises even if no label row matches it (the in-memory join reads only the
    files that hold a match);
  - a bad label row's error names its input row, as in-memory; counts in the message ("missing
    on k of n rows") are those of its batch.
The item-feature table (a catalogue keyed by item) is read whole, as in-memory.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fm.timefeatures import arrow_timestamps_us, timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP, ITEM_FEATURES
from store_bridge.training_set import (
    _key_column,
    _offline_files,
    asof_indices,
    item_feature_columns,
    item_rows,
    label_timestamps,
    read_items,
)

POSITION = "label_row"  # output column: the label row's position in the input file
EMBEDDING = "embedding"
KEYS = ("user_id", "item_id", EVENT_TIMESTAMP)
# Scratch-only columns of the label buckets: int64 keys and time, the item-table row.
_U, _I, _T, _ITEM = "__fx_user", "__fx_item", "__fx_ts", "__fx_item_row"
RESERVED = (POSITION, _U, _I, _T, _ITEM)

DEFAULT_BUCKET_BYTES = 1 << 30  # working set of one bucket in pass 2
MAX_PARTITIONS = 4096  # 2 scratch files per bucket are open at once in pass 1
LABEL_BATCH_ROWS = 262_144  # label rows validated and partitioned per batch
TAE_BATCH_BYTES = 32 << 20  # offline rows read per batch, in embedding bytes
OUTPUT_SLICE_ROWS = 131_072  # rows per output row group (bounds the writer's buffers)
# Bytes per row held in pass 2 beyond the row's own columns: asof_indices' and the gather's
# int64 temporaries (keys, ranks, order, bounds, positions), measured at 1M rows.
_LABEL_ROW_EXTRA = 160
_TAE_ROW_EXTRA = 112
# What the in-memory path holds beyond the rows' own bytes: per label row its keys, as-of
# temporaries and one object slot; per offline TAE row its keys, temporaries and one NumPy
# view of its embedding. Fitted to the peak RSS measured by `foundex bench store --scale-rows`
# at 1M and 10M label rows (128-d, half as many TAE rows): 0.92 and 4.9 GiB.
_IN_MEMORY_LABEL_EXTRA = 100
_IN_MEMORY_TAE_EXTRA = 90
_BASE_BYTES = 512 << 20  # interpreter, NumPy, pandas, Arrow and their pools

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PartitionedResult:
    """What `build_training_set_partitioned` wrote.

    rows: label rows in = rows out. rows_without_embedding: rows whose `embedding` is null
    (None without a TAE glob). files: the part files, in order. partitions: P. seconds: wall
    time of the build. dim: embedding width (None: no offline row read). time_note: the first
    note of `label_timestamps` (e.g. times without a zone taken as UTC), or None.
    """

    out_dir: Path
    rows: int
    rows_without_embedding: int | None
    files: list[Path]
    partitions: int
    seconds: float
    dim: int | None
    time_note: str | None


@dataclass(frozen=True)
class PathChoice:
    """Which join `choose_path` picked, and why (`describe()` says it in one line)."""

    path: Literal["in-memory", "bounded"]
    estimate_bytes: int
    budget_bytes: int
    label_rows: int
    tae_rows: int

    def describe(self) -> str:
        return (
            f"{self.path} path: an in-memory join of {self.label_rows:,} label rows x "
            f"{self.tae_rows:,} offline rows would need ~{_size(self.estimate_bytes)}, "
            f"{'within' if self.path == 'in-memory' else 'over'} the budget of "
            f"{_size(self.budget_bytes)}"
        )


def _size(n: int) -> str:
    """Bytes as GiB to 0.1, or MiB below 0.1 GiB (a tiny budget must not read as 0.0 GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def physical_memory_bytes() -> int:
    """This machine's physical memory, bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget() -> int:
    """The default budget of `choose_path`: a quarter of physical memory, so that a training
    set built beside a server, the Feast registry and the page cache does not push them out."""
    return physical_memory_bytes() // 4


def estimate_in_memory_bytes(
    label_rows: int, tae_rows: int, dim: int, label_row_bytes: int = 40
) -> int:
    """Peak bytes (RSS) `point_in_time_join` needs, labels read from parquet included, from
    the label row count, their width in bytes (the columns as read), the offline TAE row count
    and the embedding width. Linear, fitted to peaks measured at 1M and 10M label rows."""
    per_label = 2 * label_row_bytes + _IN_MEMORY_LABEL_EXTRA
    per_tae = 4 * dim + _IN_MEMORY_TAE_EXTRA
    return _BASE_BYTES + label_rows * per_label + tae_rows * per_tae


def _row_bytes(schema: pa.Schema, metadata: pq.FileMetaData) -> int:
    """Bytes per row of a parquet file's columns once read: fixed-width types by width, others
    (strings, lists) from the file's uncompressed size."""
    total = 0.0
    for k, field in enumerate(schema):
        try:
            total += field.type.bit_width / 8
        except ValueError:  # variable width
            size = sum(
                metadata.row_group(g).column(k).total_uncompressed_size
                for g in range(metadata.num_row_groups)
            )
            total += size / max(metadata.num_rows, 1) + 8
    return int(math.ceil(total))


def tae_row_count(tae_glob: Path | None) -> int:
    """Offline TAE rows under `tae_glob`, from the files' parquet footers."""
    if tae_glob is None:
        return 0
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _offline_files(tae_glob))


def choose_path(
    labels_path: Path,
    tae_glob: Path | None,
    *,
    dim: int,
    budget_bytes: int | None = None,
) -> PathChoice:
    """Pick "in-memory" when `estimate_in_memory_bytes` of these inputs fits `budget_bytes`
    (default: `default_memory_budget()`, a quarter of physical memory), else "bounded".

    labels_path: the label rows' parquet file (its footer gives rows and widths). tae_glob:
    the offline TAE files (footers give rows). dim: the embedding width (the FM version's).
    Reads footers only.
    """
    budget = default_memory_budget() if budget_bytes is None else int(budget_bytes)
    pf = pq.ParquetFile(labels_path)
    n_labels = pf.metadata.num_rows
    n_taes = tae_row_count(tae_glob)
    need = estimate_in_memory_bytes(n_labels, n_taes, dim, _row_bytes(pf.schema_arrow, pf.metadata))
    return PathChoice(
        path="in-memory" if need <= budget else "bounded", estimate_bytes=need,
        budget_bytes=budget, label_rows=n_labels, tae_rows=n_taes,
    )


def partition_count(
    label_rows: int, label_row_bytes: int, tae_rows: int, dim: int, bucket_bytes: int
) -> int:
    """P: buckets enough that one bucket's pass-2 working set (its label rows and offline
    rows with their temporaries) is about `bucket_bytes`; 1 .. MAX_PARTITIONS."""
    total = label_rows * (label_row_bytes + _LABEL_ROW_EXTRA) + tae_rows * (4 * dim + _TAE_ROW_EXTRA)
    return int(min(MAX_PARTITIONS, max(1, math.ceil(total / max(int(bucket_bytes), 1)))))


def bucket_of(users: np.ndarray, items: np.ndarray, partitions: int) -> np.ndarray:
    """Bucket (0 .. partitions-1) of every (user, item) key: a 64-bit mix of both ids
    (splitmix64's finaliser), so consecutive ids spread over every bucket."""
    with np.errstate(over="ignore"):
        h = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= items.astype(np.uint64) + np.uint64(0x632BE59BD9B4E019) + (h << np.uint64(6))
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(partitions)).astype(np.int64)


def embedding_list_array(matrix: np.ndarray, present: np.ndarray) -> pa.ListArray:
    """A list<float32> column of len(present) rows: row k holds the next row of `matrix`
    ((present.sum(), d) float32) where present[k], else null. Shares `matrix`'s memory."""
    n = len(present)
    d = matrix.shape[1] if matrix.ndim == 2 else 0
    if int(present.sum()) * d >= 2**31:
        raise ValueError(f"{n:,} rows x {d}-d is too long for one list<float32> chunk; slice it")
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(present * d, dtype=np.int32, out=offsets[1:])
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=pa.list_(pa.float32()), mask=pa.array(~present)
    )


def parquet_options(schema: pa.Schema) -> dict:
    """ParquetWriter options for a training set: no dictionary and no statistics for
    `embedding` (random floats: trying a dictionary doubled the write time and saved nothing)."""
    others = [f.name for f in schema if f.name != EMBEDDING]
    return {"use_dictionary": others, "write_statistics": others}


class _Buckets:
    """P append-only scratch files, one per bucket: Arrow IPC streams of the rows' columns and,
    for offline rows, a raw float32 file of their embeddings (read back as one contiguous
    (rows, d) matrix, not a copy of chunks). A batch is split by bucket with a stable sort,
    so every bucket keeps the rows' order of arrival."""

    def __init__(self, directory: Path, name: str, partitions: int) -> None:
        self.paths = [directory / f"{name}-{b:05d}.arrows" for b in range(partitions)]
        self.sinks: list[pa.NativeFile | None] = [None] * partitions
        self.writers: list[pa.ipc.RecordBatchStreamWriter | None] = [None] * partitions
        self.raw: list[BinaryIO | None] = [None] * partitions
        self.schema: pa.Schema | None = None

    def write(self, batch: pa.RecordBatch, buckets: np.ndarray, matrix: np.ndarray | None = None) -> None:
        self.schema = batch.schema
        order = np.argsort(buckets, kind="stable")
        counts = np.bincount(buckets, minlength=len(self.paths))
        batch = batch.take(pa.array(order))
        matrix = None if matrix is None else matrix[order]
        start = 0
        for b in np.flatnonzero(counts):
            end = start + int(counts[b])
            if self.writers[b] is None:
                self.sinks[b] = pa.OSFile(str(self.paths[b]), "wb")
                self.writers[b] = pa.ipc.new_stream(self.sinks[b], batch.schema)
            self.writers[b].write_batch(batch.slice(start, end - start))
            if matrix is not None:
                if self.raw[b] is None:  # unbuffered: writes are whole row blocks already
                    self.raw[b] = open(self.paths[b].with_suffix(".f32"), "wb", buffering=0)  # noqa: SIM115
                self.raw[b].write(memoryview(matrix[start:end]))
            start = end

    def close(self) -> None:
        for handles in (self.writers, self.sinks, self.raw):
            for h in handles:
                if h is not None and not getattr(h, "closed", False):
                    h.close()

    def read(self, b: int) -> pa.Table | None:
        """Bucket b's rows in order of arrival (memory-mapped), or None if it got none."""
        if self.writers[b] is None:
            return None
        with pa.memory_map(str(self.paths[b])) as source:
            return pa.ipc.open_stream(source).read_all()

    def read_matrix(self, b: int, dim: int) -> np.ndarray:
        """Bucket b's embeddings, (rows, dim) float32, in the order of `read(b)`'s rows."""
        return np.fromfile(self.paths[b].with_suffix(".f32"), dtype=np.float32).reshape(-1, dim)

    def drop(self, b: int) -> None:
        self.paths[b].unlink(missing_ok=True)
        self.paths[b].with_suffix(".f32").unlink(missing_ok=True)


@dataclass
class _LabelPlan:
    """What pass 1 learns about the label rows, and what pass 2 needs."""

    names: list[str]  # the label file's columns, in order
    rows: int = 0
    item_missing: bool = False  # some row has no item row: item features become float64
    time_note: str | None = None


def _check_label_schema(schema: pa.Schema) -> None:
    missing = [c for c in KEYS if c not in schema.names]
    if missing:
        raise ValueError(f"label rows lack column {missing[0]!r}")
    taken = [c for c in RESERVED if c in schema.names]
    if taken:
        raise ValueError(
            f"label rows hold a column named {taken[0]!r}, which the bounded training-set path "
            "uses for itself; rename it"
        )


def _label_batch(
    batch: pa.RecordBatch, first_row: int, plan: _LabelPlan, items: pa.Table | None
) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
    """Validate one batch of label rows (the in-memory path's rules; errors name the input
    row) -> (the batch as the scratch holds it, user ids, item ids)."""
    keys = batch.select(["user_id", "item_id"]).to_pandas()
    users = _key_column(keys, "user_id", first_row)
    item_ids = _key_column(keys, "item_id", first_row)
    ts, note = label_timestamps(batch.column(EVENT_TIMESTAMP).to_pandas(), first_row)
    plan.time_note = plan.time_note or note
    ts_us = timestamps_us(ts)
    columns = dict(zip(batch.schema.names, batch.columns, strict=True))
    columns[EVENT_TIMESTAMP] = pa.array(ts_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    columns[_U], columns[_I] = pa.array(users), pa.array(item_ids)
    columns[_T] = pa.array(ts_us)
    columns[POSITION] = pa.array(np.arange(first_row, first_row + len(users), dtype=np.int64))
    if items is not None:
        hit = item_rows(items, item_ids, ts_us)
        plan.item_missing |= bool(hit.min(initial=0) < 0)
        columns[_ITEM] = pa.array(hit)
    return pa.RecordBatch.from_pydict(columns), users, item_ids


def label_columns(schema: pa.Schema) -> list[str]:
    """The label file's columns, less a pandas index stored beside them (pandas reads it back
    as the frame's index, which `point_in_time_join` drops)."""
    index = (schema.pandas_metadata or {}).get("index_columns", [])
    return [n for n in schema.names if n not in {c for c in index if isinstance(c, str)}]


def _partition_labels(
    labels_path: Path, buckets: _Buckets, items: pa.Table | None, batch_rows: int,
    tick: Callable[[int], None],
) -> _LabelPlan:
    pf = pq.ParquetFile(labels_path)
    _check_label_schema(pf.schema_arrow)
    plan = _LabelPlan(names=label_columns(pf.schema_arrow))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=plan.names):
        scratch, users, item_ids = _label_batch(batch, plan.rows, plan, items)
        buckets.write(scratch, bucket_of(users, item_ids, len(buckets.paths)))
        plan.rows += batch.num_rows
        tick(batch.num_rows)
    return plan


def _partition_taes(
    files: list[Path], buckets: _Buckets, rows_per_batch: int, tick: Callable[[int], None]
) -> int | None:
    """Stream the offline TAE files into the buckets, in file order then row order; returns
    the embedding width (None: no rows). ValueError naming the file for null embeddings or
    widths that differ."""
    dim: int | None = None
    for path in files:
        # Buffered column reads: a row group's embedding chunk is not read whole at once.
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        for batch in pf.iter_batches(
            batch_size=rows_per_batch, columns=["user_id", "item_id", EVENT_TIMESTAMP, EMBEDDING]
        ):
            if batch.num_rows == 0:
                continue
            emb = batch.column(EMBEDDING)
            lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
            if emb.null_count or lengths.min() != lengths.max():
                raise ValueError(f"{path}: embeddings are not all of one dimension")
            if dim is None:
                dim = int(lengths[0])
            elif int(lengths[0]) != dim:
                raise ValueError(f"{path}: embeddings are {int(lengths[0])}-d, earlier files' {dim}-d")
            flat = emb.flatten().cast(pa.float32()).to_numpy(zero_copy_only=False)
            users = batch.column("user_id").to_numpy().astype(np.int64, copy=False)
            item_ids = batch.column("item_id").to_numpy().astype(np.int64, copy=False)
            scratch = pa.RecordBatch.from_pydict(
                {"u": users, "i": item_ids, "t": arrow_timestamps_us(batch.column(EVENT_TIMESTAMP))}
            )
            buckets.write(
                scratch, bucket_of(users, item_ids, len(buckets.paths)), flat.reshape(-1, dim)
            )
            tick(batch.num_rows)
    return dim


@dataclass
class _Output:
    """How pass 2 writes: the output schema and the joins that feed it."""

    schema: pa.Schema
    names: list[str]  # label columns kept as they are
    item_features: list[str]
    items: pa.Table | None
    widen: bool
    embeddings: bool
    ttl_us: int | None
    dim: int | None


def _output_schema(
    label_schema: pa.Schema, plan: _LabelPlan, items: pa.Table | None,
    item_features: list[str], embeddings: bool,
) -> pa.Schema:
    """The in-memory frame's columns in its order (label columns, then new item features,
    then `embedding`), and `label_row` last."""
    types = {}
    if items is not None:
        empty = item_feature_columns(items, np.empty(0, np.int64), item_features, plan.item_missing)
        for c, v in empty.items():
            types[c] = pa.from_numpy_dtype(v.dtype) if v.dtype != object else items.schema.field(c).type
    if embeddings:
        types[EMBEDDING] = pa.list_(pa.float32())
    fields = [
        pa.field(n, types[n]) if n in types else label_schema.field(n) for n in plan.names
    ]
    fields += [pa.field(n, t) for n, t in types.items() if n not in plan.names]
    return pa.schema([*fields, pa.field(POSITION, pa.int64())])


def _join_bucket(
    labels: pa.Table, taes: pa.Table | None, matrix: np.ndarray | None, out: _Output, path: Path
) -> int:
    """Join one bucket's label rows with its offline rows (`taes`: keys and times, `matrix`:
    their embeddings) and write them to `path`; returns the rows without an embedding."""
    n = labels.num_rows
    hit = np.full(n, -1, dtype=np.int64)
    if matrix is None:
        matrix = np.zeros((0, out.dim or 0), dtype=np.float32)
    if taes is not None and taes.num_rows:
        t_ts, ts = taes.column("t").to_numpy(), labels.column(_T).to_numpy()
        hit = asof_indices(
            [taes.column("u").to_numpy(), taes.column("i").to_numpy()], t_ts,
            [labels.column(_U).to_numpy(), labels.column(_I).to_numpy()], ts,
        )
        if out.ttl_us:  # Feast's rule: feature time + TTL >= row time
            hit[(hit >= 0) & (ts - t_ts[np.maximum(hit, 0)] > out.ttl_us)] = -1
    item_hit = labels.column(_ITEM).to_numpy() if out.items is not None else None
    with pq.ParquetWriter(path, out.schema, **parquet_options(out.schema)) as writer:
        for a in range(0, max(n, 1), OUTPUT_SLICE_ROWS):
            rows = slice(a, min(n, a + OUTPUT_SLICE_ROWS))
            part = labels.slice(a, rows.stop - a)
            columns = {name: part.column(name) for name in out.names}
            if item_hit is not None:
                values = item_feature_columns(out.items, item_hit[rows], out.item_features, out.widen)
                for c, v in values.items():
                    columns[c] = pa.array(v, type=out.schema.field(c).type)
            if out.embeddings:
                h = hit[rows]
                present = h >= 0
                columns[EMBEDDING] = embedding_list_array(matrix[h[present]], present)
            columns[POSITION] = part.column(POSITION)
            writer.write_table(
                pa.table([columns[f.name] for f in out.schema], schema=out.schema)
            )
    return int((hit < 0).sum()) if out.embeddings else 0


def build_training_set_partitioned(
    labels_path: Path,
    out_dir: Path,
    *,
    tae_glob: Path | None,
    ttl_seconds: int | None,
    items_path: Path | None = None,
    item_features: Sequence[str] = ITEM_FEATURES,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    partitions: int | None = None,
    scratch_dir: Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    label_batch_rows: int = LABEL_BATCH_ROWS,
) -> PartitionedResult:
    """Join the label rows of `labels_path` with TAEs and item features, point in time, in
    bounded memory; write the rows to `out_dir` (a new directory of part-NNNNN.parquet files).

    labels_path: parquet with user_id, item_id (whole numbers), event_timestamp (see
    `label_timestamps`), any other columns (passed through). tae_glob: the pinned version's
    offline files (`data/tae_<v>/*/*.parquet`), None for no `embedding` column. ttl_seconds:
    the view's TTL (None or 0: none). items_path / item_features: as `point_in_time_join`.
    bucket_bytes: pass-2 working set per bucket, which sets P (`partitions` forces it).
    scratch_dir: where the bucket files go (default: beside `out_dir`; they take about the
    inputs' size). overwrite: replace an existing `out_dir` (else FileExistsError).
    progress(stage, done, total): stage "partition" counts input rows (labels, then offline
    rows), "join" counts buckets.

    Output rows equal `point_in_time_join`'s (see the module docstring for the layout).
    Raises ValueError as the in-memory path does for bad label rows (naming the input row),
    and for offline files with null or mixed-width embeddings. On any error, nothing is left
    at `out_dir` and the scratch files are gone.
    """
    t0 = time.perf_counter()
    labels_path, out_dir = Path(labels_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"training-set output {out_dir} exists; choose a new directory")
    pf = pq.ParquetFile(labels_path)
    _check_label_schema(pf.schema_arrow)
    files = _offline_files(tae_glob) if tae_glob is not None else []
    n_labels = pf.metadata.num_rows
    n_taes = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    dim_guess = _first_dim(files)
    p = partitions or partition_count(
        n_labels, _row_bytes(pf.schema_arrow, pf.metadata) + 8 * len(RESERVED), n_taes,
        dim_guess, bucket_bytes,
    )
    features = list(item_features) if items_path is not None else []
    items = read_items(items_path, features) if features else None
    done = 0

    def tick(rows: int) -> None:
        nonlocal done
        done += rows
        if progress is not None:
            progress("partition", done, n_labels + n_taes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    scratch = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.scratch-", dir=scratch_dir or out_dir.parent)
    )
    label_buckets = _Buckets(scratch, "labels", p)
    tae_buckets = _Buckets(scratch, "taes", p)
    try:
        tmp.mkdir()
        try:  # pass 1
            plan = _partition_labels(labels_path, label_buckets, items, label_batch_rows, tick)
            dim = _partition_taes(
                files, tae_buckets, max(1024, TAE_BATCH_BYTES // (4 * dim_guess + 24)), tick
            )
        finally:
            label_buckets.close()
            tae_buckets.close()
        label_schema = _scratch_schema(label_buckets, pf.schema_arrow)
        replaced = set(features) | ({EMBEDDING} if tae_glob is not None else set())
        out = _Output(
            schema=_output_schema(label_schema, plan, items, features, tae_glob is not None),
            names=[n for n in plan.names if n not in replaced],
            item_features=features, items=items, widen=plan.item_missing,
            embeddings=tae_glob is not None,
            ttl_us=int(ttl_seconds) * 1_000_000 if ttl_seconds else None, dim=dim,
        )
        written, no_embedding = [], 0
        for b in range(p):  # pass 2
            labels = label_buckets.read(b)
            if labels is None and (b == p - 1 and not written):
                labels = label_schema.empty_table()  # no label rows: one empty part, the schema
            if labels is not None:
                path = tmp / f"part-{len(written):05d}.parquet"
                taes = tae_buckets.read(b)
                matrix = tae_buckets.read_matrix(b, dim) if taes is not None else None
                no_embedding += _join_bucket(labels, taes, matrix, out, path)
                del taes, matrix
                written.append(path.name)
                del labels
            label_buckets.drop(b)
            tae_buckets.drop(b)
            pa.default_memory_pool().release_unused()
            if progress is not None:
                progress("join", b + 1, p)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PartitionedResult(
        out_dir=out_dir, rows=plan.rows,
        rows_without_embedding=no_embedding if out.embeddings else None,
        files=[out_dir / name for name in written], partitions=p,
        seconds=time.perf_counter() - t0, dim=dim, time_note=plan.time_note,
    )


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`; an existing `out_dir` is moved aside first and
    deleted after, so readers see the old or the new directory, never a mix."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:12]}"
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _first_dim(files: list[Path]) -> int:
    """The embedding width of the first offline row (128 where there is none), to size P."""
    for path in files:
        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=[EMBEDDING]), None)
        if batch is not None and batch.num_rows:
            return max(1, int(pc.list_value_length(batch.column(0))[0].as_py() or 1))
    return 128


def _scratch_schema(buckets: _Buckets, label_schema: pa.Schema) -> pa.Schema:
    """The label buckets' schema (the label file's, times as timestamp[us, UTC], plus the
    scratch columns); from the file's own schema where no batch was read."""
    if buckets.schema is not None:
        return buckets.schema
    kept = label_columns(label_schema)
    fields = [
        pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")) if f.name == EVENT_TIMESTAMP else f
        for f in label_schema if f.name in kept
    ]
    extra = [pa.field(c, pa.int64()) for c in (_U, _I, _T, POSITION, _ITEM)]
    return pa.schema(fields + extra)
