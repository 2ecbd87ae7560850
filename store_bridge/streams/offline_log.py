"""The `offline` role: the events stream appended to date-partitioned parquet, exactly once per
event across crashes. This log is what FM training and Feast's views read.

Layout, under `root` (`<repo>/data/events/live`):

    <YYYY-MM-DD>/part-<first entry id>-<last entry id>.parquet

one file per handled batch of stream entries and event date (UTC); every file has the same
columns (`live_log_schema`: the canonical event schema, `event_id`, `ingest_timestamp`), so a
reader takes them all as one table: `pd.read_parquet(root)`, `pyarrow.dataset.dataset(root)`,
DuckDB's `read_parquet('<root>/*/*.parquet')`. Rows of a file are sorted by event time.

Exactly once per stream entry:

1. One writer: the consumer holds an exclusive lock (flock on `<root>/.offline.lock`) while it
   lives; the kernel drops it when the process dies, SIGKILL included. A second writer is
   refused (`OfflineLogBusy`).
2. A batch is written as one file per event date, first all under temporary names
   (`.part-...parquet.tmp`, fsynced), then each renamed to its final name, then the folders
   fsynced; only then does the base class acknowledge the entries.
3. The final files are the commit record: their names give each batch's entry-id range and
   their footers (key `foundex.stream_entries`) the exact entry ids. A delivered entry found
   there (the process died between rename and ack, or an ack was lost with a Redis restart)
   is acknowledged without being written again.
4. On start, temporary files of a batch that already has a final file are renamed (the crash
   fell between its renames, after every temporary file was complete), the others deleted
   (it fell before the first rename: the entries are still pending and are written again).

Repeated event ids: within a batch, only the first copy of an id is written. Across batches
nothing is dropped here: the stream does not append an id again within its dedup window
(`event_dedup_s`), so a copy reaches this log only when a client re-sent an event after that
window; readers that need strict uniqueness keep the first row per `event_id`.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import re
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fm.timefeatures import US_PER_DAY
from store_bridge.events.schema import EVENT_TIMESTAMP, event_arrow_schema
from store_bridge.streams.consumer import StreamConsumer
from store_bridge.streams.records import EVENT_ID
from store_bridge.streams.stream import Entry, RedisStream

log = logging.getLogger("foundex.streams")

INGEST_TIMESTAMP = "ingest_timestamp"  # when the event's stream entry was appended (µs UTC)
ENTRIES_KEY = b"foundex.stream_entries"  # footer key: the batch's entry ids, space-separated
LOCK_NAME = ".offline.lock"
_PART = re.compile(r"^part-(\d+-\d+)-(\d+-\d+)\.parquet$")
_TEMP = re.compile(r"^\.(part-\d+-\d+-\d+-\d+\.parquet)\.tmp$")
# Test hook (tests/test_stream_offline.py): "<point>[:<batch>]" SIGKILLs the process at
# `point` of its `batch`-th written batch (default 1st): "temp" (after the first temporary
# file), "renamed_one" (after the first rename), "renamed" (after every rename, before ack).
CRASH_ENV = "FOUNDEX_OFFLINE_CRASH_AT"


class OfflineLogBusy(RuntimeError):
    """Another offline-log consumer writes to the same folder."""


def live_log_schema(tasks: list[str]) -> pa.Schema:
    """Columns of every live log file: the canonical events, event_id, ingest_timestamp."""
    return event_arrow_schema(tasks).append(pa.field(EVENT_ID, pa.string())).append(
        pa.field(INGEST_TIMESTAMP, pa.timestamp("us", tz="UTC"))
    )


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class OfflineLogConsumer(StreamConsumer):
    """The `offline` role (see the module docstring)."""

    group = "offline"

    def __init__(
        self, stream: RedisStream, root: Path, tasks: list[str], *, fsync: bool = True, **kw
    ) -> None:
        """root: the log's folder (created); tasks: the dataset's tasks (label columns, in
        the spec's order); fsync: flush files and folders before acknowledging (off only
        for benchmarks of the rest). Raises OfflineLogBusy when another consumer holds the
        folder's lock."""
        super().__init__(stream, **kw)
        self.root = Path(root)
        self.schema = live_log_schema(tasks)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.root / LOCK_NAME)
        self.skipped_entries = 0  # delivered again but already on disk: acknowledged only
        self.files_written = 0
        self._batches = 0
        self._crash = _crash_point()
        self._warned: set[tuple[str, ...]] = set()
        self._needs_recovery = True
        self._recover()

    def close(self) -> None:
        """Release the folder's lock (the process's exit does too)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # --- handling ---------------------------------------------------------------------------

    def handle(self, entries: list[Entry]) -> None:
        if self._needs_recovery:  # an earlier batch failed part-way in this process
            self._recover()
        entries = sorted(entries, key=lambda e: _id_tuple(e.entry_id))
        fresh = [e for e in entries if not self._on_disk(e.entry_id)]
        self.skipped_entries += len(entries) - len(fresh)
        if not fresh:
            return
        table = self._batch_table(fresh)
        self._needs_recovery = True
        self._write(fresh, table)
        self._needs_recovery = False

    def _batch_table(self, entries: list[Entry]) -> pa.Table:
        """The entries' events in the log's schema, first copy of each event id only."""
        parts = []
        for e in entries:
            t = self._conform(e)
            ingest = pa.array(np.full(t.num_rows, e.ingest_us, dtype=np.int64),
                              pa.timestamp("us", tz="UTC"))  # fmt: skip
            parts.append(t.append_column(self.schema.field(INGEST_TIMESTAMP), ingest))
        table = pa.concat_tables(parts)
        ids = table.column(EVENT_ID).to_pandas()
        repeated = ids.duplicated().to_numpy()
        if repeated.any():
            table = table.filter(pa.array(~repeated))
        return table

    def _conform(self, entry: Entry) -> pa.Table:
        """An entry's table with exactly the log's columns and types (label columns it lacks
        are NaN). Raises ValueError for an entry without the key columns: not an events batch."""
        t = entry.table
        assert t is not None
        extra = sorted(set(t.column_names) - set(self.schema.names))
        if extra and tuple(extra) not in self._warned:  # e.g. a task added to the spec since
            self._warned.add(tuple(extra))
            log.warning("offline log: columns %s are not in the log's schema and are not "
                        "written (restart the consumer after changing the spec)", extra)
        cols = []
        for f in self.schema:
            if f.name == INGEST_TIMESTAMP:
                continue
            if f.name in t.column_names:
                cols.append(t.column(f.name).cast(f.type))
            elif pa.types.is_floating(f.type):  # a task label the producer did not know
                cols.append(pa.array(np.full(t.num_rows, np.nan, np.float32)))
            else:
                raise ValueError(f"stream entry {entry.entry_id} lacks column {f.name!r}: "
                                 "not a batch of the canonical event schema")
        return pa.Table.from_arrays(cols, schema=self.schema.remove(len(self.schema) - 1))

    def _write(self, entries: list[Entry], table: pa.Table) -> None:
        """One file per event date: all temporary files, then the renames (module docstring)."""
        first, last = entries[0].entry_id, entries[-1].entry_id
        name = f"part-{first}-{last}.parquet"
        ids = " ".join(e.entry_id for e in entries).encode()
        table = table.replace_schema_metadata({ENTRIES_KEY: ids})
        self._batches += 1
        ts = table.column(EVENT_TIMESTAMP).cast(pa.int64()).to_numpy()
        days = ts // US_PER_DAY
        moves = []
        unique = np.unique(days).tolist()
        for day in unique:
            part = table if len(unique) == 1 else table.filter(pa.array(days == day))
            part = part.sort_by(EVENT_TIMESTAMP)
            folder = self.root / str(np.datetime64(day, "D"))
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{name}.tmp"
            with open(tmp, "wb") as fh:
                pq.write_table(part, fh)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            moves.append((tmp, folder / name))
            self._maybe_crash("temp")
        for tmp, final in moves:
            os.replace(tmp, final)
            self._maybe_crash("renamed_one")
        if self.fsync:
            for folder in {self.root, *(final.parent for _, final in moves)}:
                _fsync_dir(folder)
        self._index_add(first, last, moves[0][1])
        self.files_written += len(moves)
        self._maybe_crash("renamed")

    # --- what is on disk ---------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish or undo a batch a crash interrupted, then index the committed files."""
        finals: dict[str, Path] = {}
        for path in self.root.glob("*/part-*.parquet"):
            if _PART.match(path.name):
                finals.setdefault(path.name, path)
        for tmp in self.root.glob("*/.part-*.parquet.tmp"):
            m = _TEMP.match(tmp.name)
            if m is None:
                continue
            if m.group(1) in finals:  # renames had begun: every temporary file is complete
                os.replace(tmp, tmp.with_name(m.group(1)))
                log.warning("offline log: finished an interrupted batch (%s)", tmp.parent.name)
            else:
                tmp.unlink()
        self._ranges: list[tuple[tuple[int, int], tuple[int, int], Path]] = []
        for name, path in finals.items():
            m = _PART.match(name)
            assert m is not None
            self._ranges.append((_id_tuple(m.group(1)), _id_tuple(m.group(2)), path))
        self._ranges.sort()
        self._max_last = max((r[1] for r in self._ranges), default=(-1, -1))
        self._entries_cache: dict[Path, frozenset[str]] = {}
        self._needs_recovery = False

    def _index_add(self, first: str, last: str, path: Path) -> None:
        item = (_id_tuple(first), _id_tuple(last), path)
        bisect.insort(self._ranges, item)
        self._max_last = max(self._max_last, item[1])

    def _on_disk(self, entry_id: str) -> bool:
        """Whether a committed file holds the entry. New entries (past every committed
        range) answer at once; others (delivered again) are looked up in the footers."""
        t = _id_tuple(entry_id)
        if t > self._max_last:
            return False
        for first, last, path in reversed(self._ranges):
            if first <= t <= last and entry_id in self._entries_of(path):
                return True
        return False

    def _entries_of(self, path: Path) -> frozenset[str]:
        if path not in self._entries_cache:
            meta = pq.read_schema(path).metadata or {}
            self._entries_cache[path] = frozenset(meta.get(ENTRIES_KEY, b"").decode().split())
        return self._entries_cache[path]

    def _maybe_crash(self, point: str) -> None:
        if self._crash is not None and self._crash == (point, self._batches):
            os.kill(os.getpid(), signal.SIGKILL)


def read_live_log(root: Path) -> pd.DataFrame:
    """Every event of the live log as one DataFrame (empty if none was written)."""
    files = sorted(Path(root).glob("*/part-*.parquet"))
    if not files:
        return pd.DataFrame()
    return pq.ParquetDataset(files).read().to_pandas()


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OfflineLogBusy(
            f"another offline-log consumer writes to {path.parent} (it holds {path.name}); "
            "the offline role runs as a single process"
        ) from None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_point() -> tuple[str, int] | None:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None
    point, _, batch = value.partition(":")
    return point, int(batch or 1)
