"""`foundex bench store --scale-rows ...`: training sets at scale, in seconds and peak memory.

For every size N (label rows) it generates, streaming to disk in chunks (the generator is never
the memory peak), N label rows and ~N/2 offline TAE rows of the bench's dim: N/6 (user, item)
keys with 3 TAEs each at different times, spread over files of three day directories, and label
rows at times around them (before any TAE, inside and past the TTL; 5% of rows of users with
no TAE at all). Then each path runs in a subprocess of its own, reading the label parquet and
writing its training set as parquet:

  in-memory  `point_in_time_join` (read labels, join, write)
  bounded    `build_training_set_partitioned` (hash partitions on a scratch directory)
  feast      Feast's `get_historical_features` on its DuckDB offline store (set so in the
             bench's scratch copy of the repo), `to_arrow()`, write

Each child is timed by itself (from reading the labels to the written output, imports not
counted) and its peak RSS is the kernel's high-water mark of its own address space (VmHWM of
`/proc/<pid>/status`, read by the child as it ends; `ru_maxrss` would also count the parent's
pages, which a forked child holds until exec). The parent watches the
child's RSS (`/proc/<pid>/status`) and kills it past a memory cap or a time cap; the row then
says so ("killed at 20 GiB", "> 900 s").

Outputs are compared with the first path that finished (the reference), by a per-row
fingerprint read in one streaming pass of each output: the row's input position, then two
independent 64-bit random linear hashes of the row's 32-bit words (user_id, item_id, time in
µs, click, whether an embedding is present, the embedding's float32 bits). Two rows that differ
in any of these give equal fingerprints with probability < 2^-60; orders and layouts may differ
(the bounded path writes one file per bucket). Each output is deleted once fingerprinted, so
one output at a time is on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from fm.timefeatures import arrow_timestamps_us
from store_bridge.events.schema import EVENT_TIMESTAMP

PATHS = ("in-memory", "bounded", "feast")
GIB = 2**30
T0_US = 1_767_571_200_000_000  # 2026-01-05T00:00:00Z
DAY_US = 86_400_000_000
TTL_S = 3 * 86400
VERSION = "v1"
VERSIONS_PER_KEY = 3  # TAEs per (user, item) key, at different times
ITEMS_PER_USER = 50
NO_TAE_SHARE = 0.05  # label rows of users without any TAE
KEY_CHUNK = 131_072  # keys per generated TAE file (x 3 files, one per day directory)
LABEL_CHUNK = 1_000_000  # label rows generated and written per row group batch
WRITE_ROWS = 131_072  # rows per row group of every output
FINGERPRINT_ROWS = 32_768  # rows hashed at once (the parent's temporaries: ~40 MB)
POLL_S = 0.1


@dataclass
class ScaleConfig:
    """Sizes (label rows), the embedding width, where the data goes, and the caps.

    workdir: a directory with room for the data (default: the system's temp dir); the bench
    works in a fresh folder inside it and removes it. mem_cap_bytes / time_cap_s: a path past
    either is killed and reported as such (the memory cap is lowered to 90% of the memory
    available at the start where that is less; the table says so). bucket_bytes: the bounded
    path's working set per bucket.
    """

    rows: tuple[int, ...]
    dim: int = 128
    workdir: Path | None = None
    mem_cap_bytes: int = 20 * GIB
    time_cap_s: float = 900.0
    paths: tuple[str, ...] = PATHS
    bucket_bytes: int = GIB

    def __post_init__(self) -> None:
        bad = [p for p in self.paths if p not in PATHS]
        if bad:
            raise ValueError(f"unknown scale-bench paths {bad}; known: {list(PATHS)}")
        if not self.rows or min(self.rows) < 1:
            raise ValueError(f"scale-bench sizes must be positive row counts, got {self.rows}")


@dataclass
class ScaleData:
    labels: Path
    tae_glob: Path
    label_rows: int
    tae_rows: int
    seconds: float


def _key_ids(keys: np.ndarray, modulus: int) -> tuple[np.ndarray, np.ndarray]:
    """Key number -> (user, item), distinct pairs: an odd multiplier permutes 0..modulus-1."""
    return keys // ITEMS_PER_USER, (keys * 7919) % modulus


def generate(repo_data: Path, label_rows: int, dim: int, seed: int = 0) -> ScaleData:
    """Write the label rows (labels.parquet) and the offline TAEs (tae_v1/<day>/part-*.parquet)
    of one size under `repo_data`, chunk by chunk."""
    from store_bridge.logging_tier import tae_table

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n_keys = max(1, label_rows // (2 * VERSIONS_PER_KEY))
    modulus = 1 << max(20, int(n_keys - 1).bit_length())
    tae_dir = repo_data / f"tae_{VERSION}"
    shutil.rmtree(tae_dir, ignore_errors=True)
    for c, k0 in enumerate(range(0, n_keys, KEY_CHUNK)):
        users, items = _key_ids(np.arange(k0, min(n_keys, k0 + KEY_CHUNK), dtype=np.int64), modulus)
        for v in range(VERSIONS_PER_KEY):  # one file per version: a key's TAEs span files
            day = tae_dir / f"2026-01-{5 + v:02d}"
            day.mkdir(parents=True, exist_ok=True)
            ts = T0_US + rng.integers(0, 5 * DAY_US, len(users))
            m = rng.standard_normal((len(users), dim), dtype=np.float32)
            pq.write_table(tae_table(users, items, ts, m), day / f"part-{c:05d}.parquet",
                           row_group_size=65_536)
            del m
    labels = repo_data / "labels.parquet"
    schema = pa.schema([
        ("user_id", pa.int64()), ("item_id", pa.int64()),
        (EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")), ("row", pa.int64()), ("click", pa.float32()),
    ])
    with pq.ParquetWriter(labels, schema) as writer:
        for a in range(0, label_rows, LABEL_CHUNK):
            n = min(LABEL_CHUNK, label_rows - a)
            users, items = _key_ids(rng.integers(0, n_keys, n), modulus)
            users = np.where(rng.random(n) < NO_TAE_SHARE, users + 1_000_000_000, users)
            writer.write_table(pa.table({
                "user_id": users, "item_id": items,
                EVENT_TIMESTAMP: pa.array(T0_US + rng.integers(-DAY_US, 9 * DAY_US, n),
                                          pa.timestamp("us", tz="UTC")),
                "row": np.arange(a, a + n, dtype=np.int64),
                "click": rng.integers(0, 2, n).astype(np.float32),
            }, schema=schema), row_group_size=262_144)
    return ScaleData(labels, tae_dir / "*" / "*.parquet", label_rows, n_keys * VERSIONS_PER_KEY,
                     time.perf_counter() - t0)


# ---- the children ----------------------------------------------------------------------------

def _write_frame(df, path: Path) -> None:
    """An in-memory training set (embedding: arrays or None) as parquet, WRITE_ROWS at a time,
    so writing adds no full copy of the embeddings."""
    from store_bridge.training_set_partitioned import embedding_list_array, parquet_options

    writer = None
    try:
        for a in range(0, max(len(df), 1), WRITE_ROWS):
            chunk = df.iloc[a : a + WRITE_ROWS]
            emb = chunk["embedding"].to_numpy()
            present = np.fromiter((e is not None for e in emb), dtype=bool, count=len(emb))
            matrix = np.stack(emb[present]) if present.any() else np.zeros((0, 0), np.float32)
            table = pa.Table.from_pandas(chunk.drop(columns="embedding"), preserve_index=False)
            table = table.append_column("embedding", embedding_list_array(matrix, present))
            writer = writer or pq.ParquetWriter(path, table.schema, **parquet_options(table.schema))
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def _child(spec: dict) -> dict:
    """Run one path as `spec` says; returns its figures (seconds from reading the labels)."""
    out = Path(spec["out"])
    if spec["path"] == "bounded":
        from store_bridge.training_set_partitioned import build_training_set_partitioned

        t0 = time.perf_counter()
        r = build_training_set_partitioned(
            Path(spec["labels"]), out, tae_glob=Path(spec["tae_glob"]), ttl_seconds=spec["ttl_s"],
            item_features=[], bucket_bytes=spec["bucket_bytes"],
        )
        return {"seconds": time.perf_counter() - t0, "partitions": r.partitions, "files": len(r.files)}
    if spec["path"] == "in-memory":
        from store_bridge.training_set import point_in_time_join

        t0 = time.perf_counter()
        labels = pq.read_table(spec["labels"]).to_pandas()
        t1 = time.perf_counter()
        df = point_in_time_join(labels, tae_glob=Path(spec["tae_glob"]),
                                ttl_seconds=spec["ttl_s"], item_features=[])
        del labels
        t2 = time.perf_counter()
        _write_frame(df, out)
        t3 = time.perf_counter()
        return {"seconds": t3 - t0, "read_s": t1 - t0, "join_s": t2 - t1, "write_s": t3 - t2}
    import warnings

    from feast import FeatureStore

    fs = FeatureStore(repo_path=spec["repo"])
    t0 = time.perf_counter()
    labels = pq.read_table(spec["labels"]).to_pandas()
    t1 = time.perf_counter()
    with warnings.catch_warnings():  # ibis's own deprecated DuckDB call
        warnings.simplefilter("ignore", DeprecationWarning)
        job = fs.get_historical_features(entity_df=labels, features=[f"fm_tae_{VERSION}:embedding"])
        table = job.to_arrow()
    del labels, job
    t2 = time.perf_counter()
    from store_bridge.training_set_partitioned import parquet_options

    pq.write_table(table, out, row_group_size=WRITE_ROWS, **parquet_options(table.schema))
    t3 = time.perf_counter()
    return {"seconds": t3 - t0, "read_s": t1 - t0, "join_s": t2 - t1, "write_s": t3 - t2}


# ---- the parent: run, watch, compare ---------------------------------------------------------

def _proc_status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


def memory_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class ChildRun:
    status: str  # "ok", "killed at N GiB", "> N s", "failed (rc N): ..."
    wall_s: float
    peak_rss_bytes: int
    figures: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_child(spec: dict, *, mem_cap_bytes: int, time_cap_s: float, log: Path,
              env: dict | None = None) -> ChildRun:
    """Run `spec` in `python -m store_bridge.bench_training_scale`, watching its RSS every
    POLL_S: killed (SIGKILL) past `mem_cap_bytes` of RSS or `time_cap_s` of wall time. The
    peak is the VmHWM the child read as it ended (the last one seen here if it was killed)."""
    result_path = log.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    spec = dict(spec, result=str(result_path))
    cmd = [sys.executable, "-m", "store_bridge.bench_training_scale", json.dumps(spec)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    start, killed, hwm_kib = time.monotonic(), None, 0
    try:
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            hwm_kib = max(hwm_kib, _proc_status_kib(proc.pid, "VmHWM"))
            if killed is None:
                if _proc_status_kib(proc.pid, "VmRSS") * 1024 > mem_cap_bytes:
                    killed = f"killed at {mem_cap_bytes / GIB:.3g} GiB"
                elif time.monotonic() - start > time_cap_s:
                    killed = f"> {time_cap_s:g} s"
                if killed is not None:
                    os.kill(proc.pid, signal.SIGKILL)
            time.sleep(POLL_S)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.monotonic() - start
    if killed is not None:
        return ChildRun(killed, wall, hwm_kib * 1024)
    if proc.returncode != 0 or not result_path.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return ChildRun(f"failed (rc {proc.returncode}): {tail[0][:200]}", wall, hwm_kib * 1024)
    figures = json.loads(result_path.read_text())
    return ChildRun("ok", wall, max(figures.pop("vmhwm_kib"), hwm_kib) * 1024, figures)


@dataclass
class Fingerprints:
    """Per output row, ordered by input position: positions, two 64-bit hashes, and whether
    the row has an embedding."""

    positions: np.ndarray
    h1: np.ndarray
    h2: np.ndarray
    present: np.ndarray
    bad_width: int  # rows whose embedding is not `dim` wide

    def same_as(self, other: Fingerprints) -> bool:
        return bool(
            self.bad_width == other.bad_width == 0
            and np.array_equal(self.positions, other.positions)
            and np.array_equal(self.present, other.present)
            and np.array_equal(self.h1, other.h1)
            and np.array_equal(self.h2, other.h2)
        )


_SCALAR_WORDS = 8  # user, item, time (2 words each), click, present


def fingerprints(path: Path, dim: int, seed: int = 12345) -> Fingerprints:
    """Fingerprints of a training-set output (a parquet file or a directory of them), read in
    one streaming pass of FINGERPRINT_ROWS-row batches."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    coeffs = np.random.default_rng(seed).integers(
        1, 2**63, size=(2, _SCALAR_WORDS + dim), dtype=np.uint64
    ) * np.uint64(2) + np.uint64(1)  # odd
    parts: list[tuple[np.ndarray, ...]] = []
    bad = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=FINGERPRINT_ROWS,
            columns=["row", "user_id", "item_id", EVENT_TIMESTAMP, "click", "embedding"],
        ):
            n = batch.num_rows
            words = np.zeros((n, _SCALAR_WORDS + dim), dtype=np.uint32)
            for k, col in enumerate(("user_id", "item_id")):
                v = batch.column(col).to_numpy().astype(np.int64)
                words[:, 2 * k : 2 * k + 2] = v.view(np.uint32).reshape(n, 2)
            ts = arrow_timestamps_us(batch.column(EVENT_TIMESTAMP))
            words[:, 4:6] = ts.view(np.uint32).reshape(n, 2)
            click = pc.cast(batch.column("click"), pa.float32()).to_numpy(zero_copy_only=False)
            words[:, 6] = click.view(np.uint32)
            emb = batch.column("embedding")
            lengths = pc.fill_null(pc.list_value_length(emb), 0).to_numpy(zero_copy_only=False)
            present = lengths > 0
            bad += int((present & (lengths != dim)).sum())
            words[:, 7] = present
            if present.any() and not bad:
                flat = pc.cast(emb.flatten(), pa.float32()).to_numpy(zero_copy_only=False)
                words[present, _SCALAR_WORDS:] = flat.view(np.uint32).reshape(-1, dim)
            wide = words.astype(np.uint64)
            parts.append((
                batch.column("row").to_numpy().astype(np.int64),
                (wide * coeffs[0]).sum(axis=1, dtype=np.uint64),
                (wide * coeffs[1]).sum(axis=1, dtype=np.uint64),
                present,
            ))
    if not parts:
        empty = np.empty(0, np.int64)
        return Fingerprints(empty, empty, empty, np.empty(0, bool), bad)
    pos, h1, h2, present = (np.concatenate(c) for c in zip(*parts, strict=True))
    order = np.argsort(pos, kind="stable")
    return Fingerprints(pos[order], h1[order], h2[order], present[order], bad)


def disk_needed_bytes(label_rows: int, dim: int) -> int:
    """Disk the bench needs at one size: inputs, one output, the bounded path's scratch."""
    taes = label_rows // 2
    inputs = label_rows * 40 + taes * (4 * dim + 40)
    output = label_rows * (4 * dim + 60)
    scratch = label_rows * 100 + taes * (4 * dim + 40)
    return inputs + output + scratch


def _feast_repo(source_repo: Path, workdir: Path, redis_url: str, dim: int):
    from store_bridge.bench import _scratch_repo
    from store_bridge.repo import FMVersion, Manifest, feast_apply

    repo = _scratch_repo(source_repo, workdir / "feature_repo", f"bench_scale_{os.getpid()}")
    # Feast's DuckDB offline store, whatever the source repo configures.
    yaml_path = repo.path / "feature_store.yaml"
    cfg = yaml.safe_load(yaml_path.read_text())
    cfg["offline_store"] = {"type": "duckdb"}
    yaml_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    repo.save_manifest(Manifest(versions={VERSION: FMVersion(
        version=VERSION, dim=dim, checkpoint="none.pt", digest="bench", ttl_seconds=TTL_S,
        training_window=("2026-01-01", "2026-01-05"), created_at="2026-01-05",
    )}))
    repo.tae_dir(VERSION).mkdir(parents=True, exist_ok=True)
    feast_apply(repo, redis_url)
    return repo


def bench_training_scale(
    redis_url: str,
    source_repo: Path,
    config: ScaleConfig,
    *,
    say: Callable[[str], None] = print,
    seed: int = 0,
) -> dict:
    """Run every path of `config.paths` at every size of `config.rows`; returns
    {"scale": {...config, "sizes": [per size: inputs, the auto choice, per path: status,
    seconds, peak RSS, rows, identical]}} (see `format_scale_table`)."""
    from store_bridge.repo import feast_env
    from store_bridge.training_set_partitioned import choose_path

    root = Path(config.workdir) if config.workdir else Path(tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="foundex-scale-", dir=root))
    available = memory_available_bytes()
    mem_cap = min(config.mem_cap_bytes, int(0.9 * available)) if available else config.mem_cap_bytes
    results: dict = {"scale": {
        "dim": config.dim, "paths": list(config.paths), "mem_cap_gib": mem_cap / GIB,
        "mem_cap_lowered": mem_cap < config.mem_cap_bytes, "time_cap_s": config.time_cap_s,
        "bucket_gib": config.bucket_bytes / GIB, "workdir": str(root), "sizes": [],
    }}
    try:
        say(f"feast apply (scratch repo in {work}) ...")
        repo = _feast_repo(Path(source_repo), work, redis_url, config.dim)
        env = feast_env(redis_url)
        for n in config.rows:
            results["scale"]["sizes"].append(
                _one_size(n, config, repo, work, env, mem_cap, say, seed, choose_path)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def _one_size(n, config, repo, work, env, mem_cap, say, seed, choose_path) -> dict:
    size: dict = {"label_rows": n, "paths": {}}
    need, free = disk_needed_bytes(n, config.dim), shutil.disk_usage(work).free
    if need > free:
        size["skipped"] = f"needs ~{need / 1e9:.0f} GB of disk in {work.parent}, {free / 1e9:.0f} GB free"
        say(f"{n:,} rows: skipped, {size['skipped']}")
        return size
    say(f"{n:,} label rows: generating ...")
    data = generate(repo.data, n, config.dim, seed)
    choice = choose_path(data.labels, data.tae_glob, dim=config.dim)
    size.update(tae_rows=data.tae_rows, generate_s=data.seconds, auto_choice=choice.path,
                in_memory_estimate_gib=choice.estimate_bytes / GIB,
                auto_budget_gib=choice.budget_bytes / GIB)
    reference: tuple[str, Fingerprints] | None = None
    for path in config.paths:
        out = work / f"out-{path}" if path == "bounded" else work / f"out-{path}.parquet"
        say(f"{n:,} rows: {path} ...")
        run = run_child(
            {"path": path, "labels": str(data.labels), "tae_glob": str(data.tae_glob),
             "ttl_s": TTL_S, "out": str(out), "bucket_bytes": config.bucket_bytes,
             "repo": str(repo.path)},
            mem_cap_bytes=mem_cap, time_cap_s=config.time_cap_s,
            log=work / f"child-{path}.log", env=env,
        )
        row = {"status": run.status, "seconds": run.figures.get("seconds"), "wall_s": run.wall_s,
               "peak_rss_gib": run.peak_rss_bytes / GIB, **run.figures}
        if run.ok:
            fp = fingerprints(out, config.dim)
            row.update(rows=len(fp.positions), rows_with_embedding=int(fp.present.sum()))
            if reference is None:
                reference, row["identical"] = (path, fp), None
            else:
                row["identical"] = fp.same_as(reference[1])
            row["compared_with"] = reference[0] if reference[0] != path else None
            del fp
        if out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        out.unlink(missing_ok=True)
        for stale in work.glob(".out-*"):  # a killed bounded run's partial output and scratch
            shutil.rmtree(stale, ignore_errors=True)
        say(f"  {path}: {row['status']}, {row['seconds'] or run.wall_s:.1f} s, "
            f"peak RSS {row['peak_rss_gib']:.2f} GiB")
        size["paths"][path] = row
    shutil.rmtree(repo.tae_dir(VERSION), ignore_errors=True)
    data.labels.unlink(missing_ok=True)
    return size


def format_scale_table(results: dict) -> str:
    """One row per size and path: seconds, peak RSS, rows, rows with an embedding, identical."""
    sc = results["scale"]
    header = ("label rows", "path", "seconds", "peak RSS GiB", "rows", "with embedding",
              "identical", "status")
    rows = [header]
    for size in sc["sizes"]:
        n = f"{size['label_rows']:,}"
        if "skipped" in size:
            rows.append((n, "-", "-", "-", "-", "-", "-", f"skipped: {size['skipped']}"))
            continue
        for path, r in size["paths"].items():
            ident = r.get("identical")
            ident_s = "-" if "rows" not in r else (
                "reference" if ident is None else f"{ident} (vs {r['compared_with']})")
            rows.append((
                n, path + (" (auto)" if path == size["auto_choice"] else ""),
                f"{r['seconds']:.1f}" if r.get("seconds") is not None else f">= {r['wall_s']:.0f}",
                f"{r['peak_rss_gib']:.2f}",
                f"{r['rows']:,}" if "rows" in r else "-",
                f"{r['rows_with_embedding']:,}" if "rows" in r else "-",
                ident_s, r["status"] + (f", P={r['partitions']}" if "partitions" in r else ""),
            ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    notes = [
        f"{sc['dim']}-d; TAE rows = label rows / 2; memory cap {sc['mem_cap_gib']:.1f} GiB"
        + (" (lowered to 90% of available memory)" if sc["mem_cap_lowered"] else "")
        + f", time cap {sc['time_cap_s']:.0f} s; bounded bucket {sc['bucket_gib']:.2f} GiB",
        "(auto): what choose_path picks for this input with the default budget "
        "(a quarter of physical memory)",
    ]
    return "\n".join(lines + notes)


def main(argv: list[str]) -> None:
    """Child entry: run the path of the JSON spec argv[1], write its figures to spec['result']."""
    spec = json.loads(argv[1])
    figures = _child(spec)
    figures["vmhwm_kib"] = _proc_status_kib(os.getpid(), "VmHWM")
    Path(spec["result"]).write_text(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv)
