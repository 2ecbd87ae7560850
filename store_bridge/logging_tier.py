"""The logging tier: TAEs of every active FM version for logged impressions, offline and online.

Offline rows go to `data/tae_<version>/<YYYY-MM-DD>/part-<job>-r<chunk rows>-<n>.parquet` (what
the version's Feast source globs); online rows go to Redis in Feast's layout. A job's file names
derive from its input, and each file is written to a temporary name and renamed, so a job killed
mid-way and run again replaces (or skips) its own output instead of adding to it: exactly one
offline row per (user, item, time) and version.

Impressions whose item the version's FM does not know (outside its vocabulary: negative, or
newer than the model) are skipped, counted in `LogReport.unknown_items` and named in one
warning line; the job goes on. The FM derives every time feature from `event_timestamp`
itself; an `hour` column in the impressions is accepted and ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fm.timefeatures import timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP
from store_bridge.repo import FeatureRepo
from store_bridge.training_set import _key_column, label_timestamps

if TYPE_CHECKING:  # the online store loads Feast's protobufs: not for input checks
    from store_bridge.online import EmbeddingStore

log = logging.getLogger("foundex.store.logging")


class TAEFunction(Protocol):
    """(user_ids, item_ids, ts_us, surfaces) -> [n, dim] float32 TAEs, one per row.

    ts_us: int64 microseconds since the epoch (UTC). A function may also have
    `known_items(item_ids) -> bool [n]` (the FM tier's does): `log_version` then skips the
    rows whose item it does not know instead of asking for their TAEs."""

    def __call__(
        self, user_ids: np.ndarray, item_ids: np.ndarray, ts_us: np.ndarray, surfaces: np.ndarray
    ) -> np.ndarray: ...


IMPRESSION_COLUMNS = ["user_id", "item_id", EVENT_TIMESTAMP, "surface"]
SYNC_SEQ = "sync_seq"  # offline TAE rows: which synced weights of the version computed them


class BadEmbeddings(ValueError):
    """An FM produced NaN or Inf: such rows are refused, never stored."""


@dataclass
class LogReport:
    version: str
    rows: int
    online_written: int
    files: int
    seconds: float
    skipped_chunks: int = 0  # chunks an earlier run of the same job had completed
    unknown_items: int = 0  # impressions skipped: their item is outside the FM's vocabulary

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else float("inf")


def tae_table(user_ids, item_ids, ts_us, matrix: np.ndarray, *, sync_seq: int = 0) -> pa.Table:
    """Offline TAE rows: keys, time, `embedding` (float32 lists) and `sync_seq` (int64: the
    weight-sync sequence of the FM version that computed them; 0 = the published checkpoint).
    Feast's view reads only the columns it names, so the extra column is invisible to it."""
    dim = matrix.shape[1]
    flat = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1))
    emb = pa.FixedSizeListArray.from_arrays(flat, dim).cast(pa.list_(pa.float32()))
    return pa.table(
        {
            "user_id": pa.array(user_ids, pa.int64()),
            "item_id": pa.array(item_ids, pa.int64()),
            EVENT_TIMESTAMP: pa.array(ts_us, pa.timestamp("us", tz="UTC")),
            "embedding": emb,
            SYNC_SEQ: pa.array(np.full(len(matrix), sync_seq, dtype=np.int64)),
        }
    )


_JOB_ID = re.compile(r"[A-Za-z0-9._]{1,128}")


def _job_id(imp: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for col in ("user_id", "item_id"):
        h.update(imp[col].to_numpy(np.int64).tobytes())
    h.update(timestamps_us(imp[EVENT_TIMESTAMP]).tobytes())
    return h.hexdigest()[:16]


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write `table` to `path` under a temporary name, then rename: a reader (or a rerun)
    sees the whole file or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def prepare_impressions(
    impressions: pd.DataFrame,
    surfaces: list[str] | None = None,
    *,
    on_note: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Validate and normalise impression rows -> one row per (user, item, time), sorted by
    time, event_timestamp as datetime64[us, UTC].

    Needs user_id, item_id (whole numbers), event_timestamp, surface (one of `surfaces` when
    given: the dataset's, which every loadable FM version shares). Other columns, `hour`
    included, are dropped: the FM derives time features from the timestamp. Times follow the
    training-set rules (`store_bridge.training_set.label_timestamps`): naive times are UTC
    (`on_note` hears so), epoch numbers and times outside 1970-01-01 .. 2262-04-10 are
    refused. Raises ValueError (one line naming the column, and the first bad row where
    there is one)."""
    missing = [c for c in IMPRESSION_COLUMNS if c not in impressions.columns]
    if missing:
        raise ValueError(
            f"impressions lack columns {missing} (have: {list(impressions.columns)})"
        )
    imp = impressions[IMPRESSION_COLUMNS].reset_index(drop=True)
    # The id checks of training sets: a NaN or a string id would otherwise be cast to
    # garbage (NaN -> -2**63) and logged.
    for col in ("user_id", "item_id"):
        imp[col] = _key_column(imp, col)
    imp[EVENT_TIMESTAMP], note = label_timestamps(imp[EVENT_TIMESTAMP])
    surface = imp["surface"]
    if surface.isna().any():
        raise ValueError(
            f"surface is missing on {int(surface.isna().sum()):,} rows "
            f"(first: row {int(np.argmax(surface.isna().to_numpy()))})"
        )
    if surfaces is not None:
        bad = ~surface.isin(surfaces).to_numpy()
        if bad.any():
            unknown = sorted({str(v) for v in surface[bad]})
            raise ValueError(
                f"surface values {unknown} are not ones the FM versions know (first: row "
                f"{int(np.argmax(bad))}; known: {list(surfaces)})"
            )
    if note and on_note is not None:
        on_note(note)
    imp = imp.drop_duplicates(["user_id", "item_id", EVENT_TIMESTAMP])
    return imp.sort_values([EVENT_TIMESTAMP, "user_id", "item_id"], kind="stable").reset_index(
        drop=True
    )


def _chunk_files(repo: FeatureRepo, version: str, job: str, tag: str, days) -> list[Path]:
    return [repo.tae_dir(version) / str(day) / f"part-{job}-{tag}.parquet" for day in days]


def _clear_other_runs(repo: FeatureRepo, version: str, job: str, chunk_rows: int) -> int:
    """Delete this job's temp files, and its files from a run that chunked differently
    (their rows would be written again under other names). Returns how many went."""
    root = repo.tae_dir(version)
    if not root.exists():
        return 0
    removed = 0
    keep = f"part-{job}-r{chunk_rows}-"
    for path in [*root.glob(f"*/.part-{job}-*.tmp"), *root.glob(f"*/part-{job}-*.parquet")]:
        if not path.name.startswith(keep):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def log_version(
    repo: FeatureRepo,
    store: EmbeddingStore,
    version: str,
    tae_fn: TAEFunction,
    impressions: pd.DataFrame,
    *,
    chunk_rows: int = 20000,
    progress: bool = True,
    job: str | None = None,
    resume: bool = True,
    sync_seq: int = 0,
) -> LogReport:
    """Compute and store one version's TAEs for the impressions (already prepared).

    Idempotent and resumable. File names derive from the input (a job id) and the chunk, so a
    rerun writes to the same names. Per chunk, online rows are written first and the day files
    last (each atomically renamed into place); a chunk whose every file exists is complete and a
    rerun skips it, any other chunk is computed and written again over its partial output.

    job: the id naming the files (letters, digits, `.`, `_`; default: a hash of the input).
    resume=False (a stream consumer, whose job id comes from its entry ids and whose batches
    are always chunked alike): every chunk is computed and written again, replacing its own
    files, and no other run's files are looked for. sync_seq: the weight-sync sequence
    `tae_fn`'s weights stand at, stored with every offline row (0: the published checkpoint). Raises ValueError for a bad job id or
    chunk_rows, BadEmbeddings (NaN/Inf: nothing of that chunk stored), StoreUnavailable.
    """
    if chunk_rows <= 0:
        raise ValueError("chunk_rows must be positive")
    if job is not None and not _JOB_ID.fullmatch(job):
        raise ValueError(f"job id {job!r} is not a file-name piece (letters, digits, '.', '_')")
    t0 = time.perf_counter()
    imp = impressions
    # By default of the whole input, so a rerun (same input) finds its own files.
    job = job if job is not None else _job_id(imp)
    if resume:
        _clear_other_runs(repo, version, job, chunk_rows)
    known = _known_rows(version, tae_fn, imp)
    unknown = int((~known).sum())
    if unknown:
        imp = imp[known]
    ts_us = timestamps_us(imp[EVENT_TIMESTAMP])
    # UTC day partitions (the store's convention, not the FM's time zone). numpy's calendar
    # floors instants before 1970 and, unlike strftime, covers years past 9999.
    dates = ts_us.astype("datetime64[us]").astype("datetime64[D]").astype(str)
    users = imp["user_id"].to_numpy(np.int64)
    items = imp["item_id"].to_numpy(np.int64)
    surfaces = imp["surface"].to_numpy()
    files = online = skipped = 0
    bar = tqdm(total=len(imp), desc=f"log {version}", unit="row", disable=not progress)
    for n, start in enumerate(range(0, len(imp), chunk_rows)):
        sl = slice(start, start + chunk_rows)
        d = dates[sl]
        days = np.unique(d)
        targets = _chunk_files(repo, version, job, f"r{chunk_rows}-{n:05d}", days)
        if resume and all(p.exists() for p in targets):  # done by an earlier run of this job
            skipped += 1
            bar.update(len(d))
            continue
        u, i, t = users[sl], items[sl], ts_us[sl]
        m = np.asarray(tae_fn(u, i, t, surfaces[sl]), dtype=np.float32)
        if m.ndim != 2 or len(m) != len(u):
            raise BadEmbeddings(f"FM {version} returned shape {m.shape} for {len(u)} rows")
        bad = ~np.isfinite(m).all(axis=1)
        if bad.any():
            raise BadEmbeddings(
                f"FM {version} produced NaN/Inf for {int(bad.sum())} of {len(m)} rows "
                f"(first: user {u[bad][0]}, item {i[bad][0]}); nothing of this chunk was stored"
            )
        online += store.write(version, u, i, t, m)
        for day, path in zip(days, targets, strict=True):
            sel = d == day
            write_parquet_atomic(tae_table(u[sel], i[sel], t[sel], m[sel], sync_seq=sync_seq), path)
            files += 1
        bar.update(len(u))
        bar.set_postfix(rows_per_s=f"{bar.n / (time.perf_counter() - t0):.0f}")
    bar.close()
    return LogReport(
        version, len(imp), online, files, time.perf_counter() - t0, skipped, unknown
    )


def _known_rows(version: str, tae_fn: TAEFunction, imp: pd.DataFrame) -> np.ndarray:
    """bool [n]: the impressions whose item `tae_fn` knows (all, when it cannot tell).
    Warns once when some are not, naming how many and a few of the ids."""
    items = imp["item_id"].to_numpy(np.int64)
    known_items = getattr(tae_fn, "known_items", None)
    if known_items is None or len(items) == 0:
        return np.ones(len(items), dtype=bool)
    known = np.asarray(known_items(items), dtype=bool)
    if not known.all():
        ids = np.unique(items[~known])
        shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        log.warning(
            "warning: FM %s: skipped %d of %d impressions whose item it does not know "
            "(%d distinct ids outside its vocabulary: %s)",
            version, int((~known).sum()), len(items), len(ids), shown,
        )
    return known
