"""An expert's training set written to files: which join runs and what the output looks like.

The join: `store_bridge.training_set.point_in_time_join` holds every label row and offline TAE
row at once (the fastest while they fit); `store_bridge.training_set_partitioned` makes the same
rows one hash partition of the keys at a time, in bounded memory. `join="auto"` picks from the
input size (`choose_path`: the in-memory join's estimated peak against a budget, by default a
quarter of physical memory) and the result says which ran and why.

The output, by `out`'s name:
  - `*.parquet` / `*.csv`: one file, rows in the input order. When the bounded join ran, its
    parts are merged into the file by DuckDB sorting on the input position, out of core
    (`memory_limit` = the budget, spilling under the scratch folder), so the file is the same
    whichever join made it.
  - no extension: a folder of parquet parts (`part-NNNNN.parquet`), always through the bounded
    writer (one part when everything fits one partition); rows are grouped by partition and
    carry `label_row`, their position in the input file.
With engine "feast" on Feast's Spark offline store, Spark reads the label file and writes the
parts (`write_feast_training_set_parts`); other offline stores join into a frame here.
Both are atomic: a failed run leaves no output and an earlier one intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from api.services.context import ServiceContext
from api.services.errors import Invalid
from api.services.offline import (
    TrainingPlan,
    build_training_set,
    feast_offline_store,
    write_feast_training_set_parts,
)
from store_bridge.redis_server import pid_alive

Join = Literal["auto", "in-memory", "bounded"]
JOINS: tuple[str, ...] = ("auto", "in-memory", "bounded")
PART_GLOB = "part-*.parquet"


@dataclass
class WrittenTrainingSet:
    out: Path
    kind: Literal["parquet", "csv", "parts"]
    rows: int
    without_embedding: int
    join: str  # "in-memory" | "bounded" | "feast"
    reason: str  # why that join ran, one line
    files: int  # files written (1, or the parts)
    note: str | None  # e.g. naive timestamps taken as UTC


def output_kind(out: Path, *, entities: Path | None = None, repo_data: Path | None = None
                ) -> Literal["parquet", "csv", "parts"]:
    """What `out` asks for; raises Invalid when it cannot be written: an unknown extension, a
    missing parent folder, a file where a folder is wanted or the reverse, a folder that holds
    anything but an earlier training set's parts (it would be replaced), the `entities` file
    itself, or a place inside the repo's data folder `repo_data` (the store's own files)."""
    suffix = out.suffix.lower()
    if not out.parent.is_dir():
        raise Invalid(f"--out folder does not exist: {out.parent}")
    where = out.resolve()
    if entities is not None and where == Path(entities).resolve():
        raise Invalid(f"--out {out} is the --entities file; write the training set elsewhere")
    if repo_data is not None and where.is_relative_to(Path(repo_data).resolve()):
        raise Invalid(f"--out {out} is inside the repo's data folder {repo_data} (the store's "
                      "own files); write the training set elsewhere")
    if suffix in (".parquet", ".csv"):
        if out.is_dir():
            raise Invalid(f"--out {out} is a folder; a {suffix} output is one file")
        return "parquet" if suffix == ".parquet" else "csv"
    if suffix:
        raise Invalid(f"--out {out}: the extension picks the format: .parquet or .csv for one "
                      "file, none for a folder of parquet parts")
    if out.exists() and not out.is_dir():
        raise Invalid(f"--out {out} is a file; without an extension the output is a folder")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not p.match(PART_GLOB)]
        if foreign:
            raise Invalid(f"--out {out} holds files that are not training-set parts "
                          f"({', '.join(sorted(foreign)[:3])}); choose a new or empty folder")
    return "parts"


def check_options(out: Path, *, join: str, engine: str) -> None:
    """Refuse options that cannot both hold (Invalid): a join for another engine, or the
    in-memory join into a folder (folders are written by the bounded join)."""
    if engine != "foundex" and join != "auto":
        raise Invalid(f"--join {join} chooses foundex's own join; with --engine {engine} the "
                      "offline store joins (drop --join)")
    if join == "in-memory" and not out.suffix:
        raise Invalid(f"--join in-memory writes one file: give --out a .parquet or .csv name, "
                      f"or drop --join to write {out} as a folder of parts (bounded join)")


def write_training_set(
    ctx: ServiceContext,
    plan: TrainingPlan,
    entities: Path,
    out: Path,
    *,
    join: Join = "auto",
    engine: str = "foundex",
    on_note: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> WrittenTrainingSet:
    """Build `plan`'s training set from the label rows in `entities` (parquet) and write it to
    `out` (see the module docstring for the shapes). engine "feast" joins through Feast's
    configured offline store (in memory on this side). Raises Invalid for a bad `out`, an
    unreadable `entities` file, bad label rows or an unknown `join`; the domain errors of
    `build_training_set`."""
    if join not in JOINS:
        raise Invalid(f"unknown join {join!r} (one of {', '.join(JOINS)})")
    kind = output_kind(out, entities=entities, repo_data=ctx.repo.data)
    check_options(out, join=join, engine=engine)
    _sweep_stale(out)
    try:
        pq.ParquetFile(entities)
    except (OSError, pa.ArrowException) as e:
        raise Invalid(f"{entities}: not a readable parquet file ({type(e).__name__})") from e
    budget = ctx.settings.training_set_budget_bytes()
    if engine == "feast" and feast_offline_store(ctx) == "spark":
        return _spark(ctx, plan, entities, out, kind, budget, on_note)
    if engine != "foundex":
        chosen, reason = "feast", f"engine {engine}: Feast's configured offline store"
    elif kind == "parts":
        chosen, reason = "bounded", "a folder output is written by the partitioned join"
    elif join != "auto":
        chosen, reason = join, f"{join} (asked for)"
    else:
        from store_bridge.training_set_partitioned import choose_path

        tae_glob = _tae_glob(ctx, plan)
        choice = choose_path(entities, tae_glob, dim=plan.entry.dim if plan.entry else 1,
                             budget_bytes=budget)
        chosen, reason = choice.path, choice.describe()
    if chosen == "bounded":
        return _bounded(ctx, plan, entities, out, kind, reason, budget, on_note, progress)
    return _in_memory(ctx, plan, entities, out, kind, chosen, reason, engine, on_note)


def _sweep_stale(out: Path) -> None:
    """Remove what a killed earlier run for the same `out` left beside it: its scratch folder
    (`.NAME.work-PID-*`, which also holds the bounded join's buckets and the merge's spill), its
    unfinished folder of parts (`.NAME.partial-PID-*`) and its temporary file (`.NAME.tmp-PID`),
    where process PID no longer runs."""
    for p in out.parent.glob(f".{out.name}.*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:work|tmp|partial)-(\d+)(?:-\w+)?", p.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _tae_glob(ctx: ServiceContext, plan: TrainingPlan) -> Path | None:
    return ctx.repo.tae_dir(plan.entry.version) / "*" / "*.parquet" if plan.entry else None


def _in_memory(ctx, plan, entities, out, kind, chosen, reason, engine, on_note
               ) -> WrittenTrainingSet:
    import pandas as pd

    try:
        labels = pd.read_parquet(entities)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise Invalid(f"{entities}: not a readable parquet file ({type(e).__name__})") from e
    result = build_training_set(ctx, plan, labels, on_note=on_note, engine=engine)
    frame = result.frame
    if kind == "parts":  # engine feast into a folder: one part, the input order
        frame = frame.assign(label_row=range(len(frame)))
    _write_frame(frame, out, kind)
    return WrittenTrainingSet(out, kind, len(frame), result.without_embedding, chosen, reason,
                              1, result.note)


def _bounded(ctx, plan, entities, out, kind, reason, budget, on_note, progress
             ) -> WrittenTrainingSet:
    from store_bridge.training_set_partitioned import build_training_set_partitioned

    cfg = plan.expert

    def build(parts_dir: Path, scratch: Path):
        try:
            return build_training_set_partitioned(
                entities, parts_dir, tae_glob=_tae_glob(ctx, plan),
                ttl_seconds=plan.entry.ttl_seconds if plan.entry else None,
                items_path=ctx.repo.data / "items.parquet" if cfg.item_features else None,
                item_features=cfg.item_features, scratch_dir=scratch,
                bucket_bytes=ctx.settings.training_set_bucket_mib << 20,
                overwrite=kind == "parts", progress=progress,
            )
        except ValueError as e:
            raise Invalid(str(e)) from e

    res = _via_parts(out, kind, budget, build)
    if res.time_note and on_note is not None:
        on_note(res.time_note)
    return _written(out, kind, res, "bounded", f"{reason}; {res.partitions} partition(s)")


def _spark(ctx, plan, entities, out, kind, budget, on_note) -> WrittenTrainingSet:
    """Feast's Spark store reads the label file and writes parquet parts: no row passes
    through this process until a single-file output is merged (as the bounded join's)."""
    res = _via_parts(out, kind, budget, lambda parts_dir, _scratch: write_feast_training_set_parts(
        ctx, plan, entities, parts_dir, on_note=on_note, overwrite=kind == "parts"))
    return _written(out, kind, res, "feast", "engine feast: Feast's Spark offline store read "
                    "the label rows and wrote the rows")


def _via_parts(out: Path, kind: str, budget: int, build: Callable[[Path, Path], Any]) -> Any:
    """`build(parts_dir, scratch)` writes parquet parts: into `out` for a folder output, else
    into a scratch folder beside `out` whose parts are then merged into the file."""
    scratch = out.parent / f".{out.name}.work-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        scratch.mkdir()
        res = build(out if kind == "parts" else scratch / "parts", scratch)
        if kind != "parts":
            _merge_in_input_order(res.files, out, kind, scratch, budget)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return res


def _written(out: Path, kind, res, join: str, reason: str) -> WrittenTrainingSet:
    return WrittenTrainingSet(out, kind, res.rows, res.rows_without_embedding or 0, join, reason,
                              len(res.files) if kind == "parts" else 1, res.time_note)


def _merge_in_input_order(parts: list[Path], out: Path, kind: str, scratch: Path,
                          budget: int) -> None:
    """The parts as one file in the input order (`label_row` dropped), by DuckDB's
    out-of-core sort: memory capped at `budget`, spilling under `scratch`. CSV is then written
    from the sorted parquet batch by batch, formatted as the in-memory CSV."""
    import duckdb

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    sorted_path = tmp if kind == "parquet" else scratch / "sorted.parquet"
    files = ", ".join(_sql_text(p) for p in parts)
    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{max(budget >> 20, 256)}MB'")
        con.execute(f"SET temp_directory = {_sql_text(scratch / 'duckdb')}")
        con.execute(
            f"COPY (SELECT * EXCLUDE (label_row) FROM read_parquet([{files}]) ORDER BY label_row)"
            f" TO {_sql_text(sorted_path)} (FORMAT parquet)"
        )
        con.close()
        if kind == "csv":
            source = pq.ParquetFile(sorted_path)
            for k, batch in enumerate(source.iter_batches(batch_size=65_536)):
                _frame_to_csv(batch.to_pandas(), tmp, header=k == 0)
            if source.metadata.num_rows == 0:
                _frame_to_csv(source.schema_arrow.empty_table().to_pandas(), tmp, header=True)
        os.replace(tmp, out)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)


def _sql_text(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _frame_to_csv(frame, path: Path, *, header: bool) -> None:
    """Embeddings as JSON arrays, empty where none; appended after the first batch."""
    if "embedding" in frame:
        frame = frame.copy()
        frame["embedding"] = ["" if e is None else json.dumps([float(x) for x in e])
                              for e in frame["embedding"]]
    frame.to_csv(path, index=False, header=header, mode="w" if header else "a")


def _write_frame(frame, out: Path, kind: str) -> None:
    """Write atomically (a temporary name, then a rename): a failed run leaves no half output
    and an earlier one intact."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if kind == "csv":
            _frame_to_csv(frame, tmp, header=True)
            os.replace(tmp, out)
        elif kind == "parquet":
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, out)
        else:
            tmp.mkdir()
            frame.to_parquet(tmp / "part-00000.parquet", index=False)
            if out.exists():
                shutil.rmtree(out)  # checked by output_kind: an earlier training set's parts
            os.replace(tmp, out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)

