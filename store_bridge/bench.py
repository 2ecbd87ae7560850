"""`foundex bench store`: foundex's store paths beside Feast's own, in one run on the same data.

Three comparisons, each on identical inputs and checked for identical outputs:
  online    reading C candidates x D-d of one version for one user: RedisEmbeddingStore.read
            vs FeatureStore.get_online_features vs a raw redis-py pipeline of HGETs (no decode)
  training  a point-in-time training set for N label rows: point_in_time_join vs
            FeatureStore.get_historical_features (the same embedding on every row asserted)
  logging   writing rows online: RedisEmbeddingStore.write vs FeatureStore.write_to_online_store

Every path runs once untimed first. Batch paths (training, logging) then run a few times back
to back and report the best run (the least disturbed by other work on a shared machine, as
timeit advises); online reads report the median of many.

It works in a scratch copy of the Feast repo with a project name of its own, so its Redis rows
never meet the repo's; they are deleted at the end.

With a `ScaleConfig` (`--scale-rows`), it runs the training-set scale bench instead: in-memory,
bounded and Feast's paths at large sizes, seconds and peak RSS (`bench_training_scale.py`).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from store_bridge.events.schema import EVENT_TIMESTAMP
from store_bridge.feast_layout import entity_keys, feature_field
from store_bridge.logging_tier import tae_table
from store_bridge.online import EMBEDDING, RedisEmbeddingStore
from store_bridge.redis_server import FEAST_ENV, feast_connection_string, redis_client
from store_bridge.repo import FeatureRepo, FMVersion, Manifest, feast_apply, view_name
from store_bridge.training_set import point_in_time_join

if TYPE_CHECKING:
    from store_bridge.bench_training_scale import ScaleConfig

T0_US = 1_767_571_200_000_000  # 2026-01-05T00:00:00Z
TTL_S = 3 * 86400
VERSION = "v1"

TARGETS = {  # ratio name -> (threshold, higher is better)
    "online_speedup_vs_feast": (5.0, True),
    "online_slowdown_vs_raw": (2.0, False),
    "training_speedup_vs_feast": (5.0, True),
    "logging_speedup_vs_feast": (10.0, True),
}


@dataclass
class BenchSize:
    rows: int = 1_000_000  # training-set label rows
    candidates: int = 500
    dim: int = 128
    users: int = 40  # logged rows = users x candidates
    offline_versions: int = 3  # embeddings per (user, item) offline, at different times
    repeats: int = 30  # online reads per path (median)
    batch_repeats: int = 3  # timed training-set builds and logging runs per path (best)


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _best_runs_s(
    paths: dict[str, Callable[[], object]],
    repeats: int,
    before: Callable[[], object] | None = None,
) -> tuple[dict[str, float], dict[str, object]]:
    """Best (minimum) seconds of `repeats` back-to-back timed calls of each path, after one
    untimed warm-up (first calls pay one-time costs such as Arrow's memory pool); `before`
    runs untimed ahead of every call. Returns each path's best time and its last result.

    Back to back, as a batch job runs: on the 2-core dev VM a pause between runs made the next
    one slower (freed memory was faulted back in at a cost larger than the join itself)."""
    best: dict[str, float] = {}
    results: dict[str, object] = {}
    for name, fn in paths.items():
        times = []
        for i in range(repeats + 1):
            if before is not None:
                before()
            t = time.perf_counter()
            results[name] = fn()
            if i:
                times.append(time.perf_counter() - t)
        best[name] = min(times)
    return best, results


def _scratch_repo(source_repo: Path, workdir: Path, project: str) -> FeatureRepo:
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ["feature_store.yaml", "definitions.py", ".feastignore"]:
        if (source_repo / name).exists():
            shutil.copy(source_repo / name, workdir / name)
    yaml_path = workdir / "feature_store.yaml"
    lines = [
        f"project: {project}" if line.startswith("project:") else line
        for line in yaml_path.read_text().splitlines()
    ]
    yaml_path.write_text("\n".join(lines) + "\n")
    return FeatureRepo(workdir)


def bench_store(
    redis_url: str,
    source_repo: Path,
    size: BenchSize | None = None,
    *,
    say: Callable[[str], None] = print,
    seed: int = 0,
    scale: ScaleConfig | None = None,
) -> dict:
    """Run the three comparisons; returns every figure and ratio (see TARGETS). With `scale`:
    the training-set scale bench instead (`bench_training_scale`; `size` is not used)."""
    if scale is not None:
        from store_bridge.bench_training_scale import bench_training_scale

        return bench_training_scale(redis_url, source_repo, scale, say=say, seed=seed)
    from feast import FeatureStore

    size = size or BenchSize()
    rng = np.random.default_rng(seed)
    project = f"bench_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="foundex-bench-"))
    client = redis_client(redis_url, timeout=60)
    store = RedisEmbeddingStore(client, project)
    os.environ[FEAST_ENV] = feast_connection_string(redis_url)
    results: dict = {"sizes": size.__dict__.copy()}
    try:
        repo = _scratch_repo(Path(source_repo), tmp / "feature_repo", project)
        repo.save_manifest(
            Manifest(
                versions={
                    VERSION: FMVersion(
                        version=VERSION, dim=size.dim, checkpoint="none.pt", digest="bench",
                        ttl_seconds=TTL_S, training_window=("2026-01-01", "2026-01-05"),
                        created_at="2026-01-05",
                    )
                }
            )
        )
        say("feast apply (scratch repo) ...")
        feast_apply(repo, redis_url)
        fs = FeatureStore(repo_path=str(repo.path))

        # The logged rows: every user x the same candidate items, one time each.
        items = rng.choice(1_000_000, size.candidates, replace=False).astype(np.int64)
        users = np.repeat(np.arange(size.users, dtype=np.int64), size.candidates)
        log_items = np.tile(items, size.users)
        n_log = len(users)
        ts = T0_US + rng.integers(0, 86_400_000_000, n_log)
        matrix = rng.normal(size=(n_log, size.dim)).astype(np.float32)

        # (c) logging: Feast's write path, then foundex's, each into an empty keyspace.
        say(f"logging {n_log:,} rows x {size.dim}-d ...")
        feast_df = pd.DataFrame(
            {
                "user_id": users, "item_id": log_items,
                EMBEDDING: list(matrix),
                EVENT_TIMESTAMP: pd.to_datetime(ts, unit="us", utc=True),
            }
        )
        def clear() -> None:  # each logging run writes into an empty keyspace
            store.delete_version(VERSION)

        best, out = _best_runs_s(
            {
                "feast": lambda: fs.write_to_online_store(view_name(VERSION), feast_df),
                "foundex": lambda: store.write(VERSION, users, log_items, ts, matrix),
            },
            size.batch_repeats,
            before=clear,
        )
        feast_log_s, ours_log_s, written = best["feast"], best["foundex"], out["foundex"]
        assert written == n_log, f"foundex wrote {written} of {n_log} rows"
        results["logging"] = {
            "rows": n_log,
            "runs": size.batch_repeats,
            "foundex_rows_per_s": n_log / ours_log_s,
            "feast_rows_per_s": n_log / feast_log_s,
        }

        # (a) online read of every candidate of one user.
        say(f"online reads: {size.candidates} candidates x {size.dim}-d, {size.repeats} repeats ...")
        user = int(rng.integers(size.users))
        want = matrix[users == user]
        ours = store.read(VERSION, size.dim, user, items)
        assert not ours.missing and np.array_equal(ours.matrix, want)
        rows = [{"user_id": user, "item_id": int(i)} for i in items]
        feat = [f"{view_name(VERSION)}:{EMBEDDING}"]
        got = fs.get_online_features(feat, entity_rows=rows).to_dict()[EMBEDDING]
        assert np.array_equal(np.asarray(got, dtype=np.float32), want), "Feast read differs"
        keys = entity_keys(project, {"user_id": np.full(len(items), user), "item_id": items})
        field = feature_field(view_name(VERSION), EMBEDDING)

        def raw() -> list:
            with client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hget(k, field)
                return pipe.execute()

        results["online"] = {
            "candidates": size.candidates,
            "dim": size.dim,
            "foundex_ms": _median_ms(lambda: store.read(VERSION, size.dim, user, items), size.repeats),
            "raw_pipeline_ms": _median_ms(raw, size.repeats),
            "feast_sdk_ms": _median_ms(
                lambda: fs.get_online_features(feat, entity_rows=rows).to_dict(),
                max(3, size.repeats // 3),
            ),
        }

        # (b) training set: offline TAEs at several times per key; label rows around them.
        say(f"training set: {size.rows:,} label rows ...")
        k = size.offline_versions
        off_users, off_items = np.repeat(users, k), np.repeat(log_items, k)
        off_ts = T0_US + rng.integers(0, 5 * 86_400_000_000, n_log * k)
        off_m = rng.normal(size=(n_log * k, size.dim)).astype(np.float32)
        day = repo.tae_dir(VERSION) / "2026-01-05"
        day.mkdir(parents=True, exist_ok=True)
        pq.write_table(tae_table(off_users, off_items, off_ts, off_m), day / "part-bench.parquet")
        pick = rng.integers(0, n_log, size.rows)
        label_users = users[pick].copy()
        label_users[: size.rows // 20] += 1_000_000  # 5% of rows: no embedding at all
        labels = pd.DataFrame(
            {
                "user_id": label_users,
                "item_id": log_items[pick],
                EVENT_TIMESTAMP: pd.to_datetime(
                    T0_US + rng.integers(-86_400_000_000, 9 * 86_400_000_000, size.rows),
                    unit="us", utc=True,
                ),
                "row": np.arange(size.rows, dtype=np.int64),
                "click": rng.integers(0, 2, size.rows).astype(np.float32),
            }
        )
        def feast_training_set() -> pd.DataFrame:
            with warnings.catch_warnings():  # ibis's own deprecated DuckDB call
                warnings.simplefilter("ignore", DeprecationWarning)
                return fs.get_historical_features(entity_df=labels, features=feat).to_df()

        best, out = _best_runs_s(
            {
                "foundex": lambda: point_in_time_join(
                    labels, tae_glob=repo.tae_dir(VERSION) / "*" / "*.parquet",
                    ttl_seconds=TTL_S, item_features=[],
                ),
                "feast": feast_training_set,
            },
            size.batch_repeats,
        )
        ours_train_s, feast_train_s = best["foundex"], best["feast"]
        ours_ts, theirs_ts = out["foundex"], out["feast"]
        identical, n_hit = _same_rows(ours_ts, theirs_ts, size.dim)
        assert identical, "training sets differ between foundex and Feast"
        results["training"] = {
            "rows": size.rows,
            "runs": size.batch_repeats,
            "rows_with_embedding": n_hit,
            "foundex_s": ours_train_s,
            "feast_s": feast_train_s,
            "identical_rows": identical,
        }
    finally:
        try:
            store.delete_version(VERSION)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                import ibis

                ibis.options.default_backend = None
            except ImportError:
                pass

    on, tr, lg = results["online"], results["training"], results["logging"]
    results["ratios"] = {
        "online_speedup_vs_feast": on["feast_sdk_ms"] / on["foundex_ms"],
        "online_slowdown_vs_raw": on["foundex_ms"] / on["raw_pipeline_ms"],
        "training_speedup_vs_feast": tr["feast_s"] / tr["foundex_s"],
        "logging_speedup_vs_feast": lg["foundex_rows_per_s"] / lg["feast_rows_per_s"],
    }
    results["targets_met"] = {
        name: (results["ratios"][name] >= bound if higher else results["ratios"][name] <= bound)
        for name, (bound, higher) in TARGETS.items()
    }
    return results


def _same_rows(ours: pd.DataFrame, theirs: pd.DataFrame, dim: int) -> tuple[bool, int]:
    """Row by row (matched on `row`): both missing, or the same embedding."""
    a = ours.sort_values("row").reset_index(drop=True)
    b = theirs.sort_values("row").reset_index(drop=True)
    if len(a) != len(b) or not np.array_equal(a["row"].to_numpy(), b["row"].to_numpy()):
        return False, 0

    def present(col: pd.Series) -> np.ndarray:
        return np.array([e is not None and not _isna(e) and len(e) > 0 for e in col], dtype=bool)

    pa_, pb = present(a[EMBEDDING]), present(b[EMBEDDING])
    if not np.array_equal(pa_, pb):
        return False, 0
    ma = np.stack([np.asarray(e, dtype=np.float32) for e in a[EMBEDDING][pa_]]) if pa_.any() else None
    mb = np.stack([np.asarray(e, dtype=np.float32) for e in b[EMBEDDING][pb]]) if pb.any() else None
    same = ma is None or (ma.shape == (int(pa_.sum()), dim) and np.array_equal(ma, mb))
    return bool(same), int(pa_.sum())


def _isna(value: object) -> bool:
    return bool(np.isscalar(value) and pd.isna(value))


def format_table(results: dict) -> str:
    if "scale" in results:
        from store_bridge.bench_training_scale import format_scale_table

        return format_scale_table(results)
    on, tr, lg, r = results["online"], results["training"], results["logging"], results["ratios"]
    met = results["targets_met"]

    def mark(name: str) -> str:
        bound, higher = TARGETS[name]
        return f"{r[name]:.1f}x ({'>=' if higher else '<='} {bound:g}x: {'met' if met[name] else 'MISSED'})"

    rows = [
        ("path", "foundex", "Feast", "raw redis-py", "ratio"),
        (
            f"online read {on['candidates']} x {on['dim']}-d (median ms)",
            f"{on['foundex_ms']:.2f}", f"{on['feast_sdk_ms']:.2f}", f"{on['raw_pipeline_ms']:.2f}",
            f"vs Feast {mark('online_speedup_vs_feast')}; vs raw {mark('online_slowdown_vs_raw')}",
        ),
        (
            f"training set {tr['rows']:,} rows (best of {tr['runs']}, s)",
            f"{tr['foundex_s']:.2f}", f"{tr['feast_s']:.2f}", "-",
            f"{mark('training_speedup_vs_feast')}, identical rows: {tr['identical_rows']}",
        ),
        (
            f"logging {lg['rows']:,} rows online (best of {lg['runs']}, rows/s)",
            f"{lg['foundex_rows_per_s']:,.0f}", f"{lg['feast_rows_per_s']:,.0f}", "-",
            mark("logging_speedup_vs_feast"),
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
