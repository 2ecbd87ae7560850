"""Feast objects for a foundex repo: entities, sources, item features, one view per FM version,
one FeatureService per expert. `feature_repo/definitions.py` registers what this returns."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Array, Float32, Int64

from store_bridge.events.schema import EVENT_TIMESTAMP
from store_bridge.repo import FeatureRepo, FMVersion
from store_bridge.versions import PinError, VersionRegistry

USER = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
ITEM = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64)

ITEM_VIEW = "item_features"
USER_HISTORY_VIEW = "user_history"


class ExpertLike(Protocol):
    name: str
    fm_version: str | None
    item_features: list[str]


def _duckdb_reads_directories() -> bool:
    """DuckDB 2.0 reads a directory path as every *.parquet file below it; 1.x finds no files."""
    import duckdb

    try:
        return int(duckdb.__version__.split(".")[0]) >= 2
    except ValueError:
        return False


def tae_source(repo: FeatureRepo, version: str) -> FileSource:
    """The offline source of one version's TAEs: the partitioned files data/tae_<v>/<date>/*.parquet.

    `feast apply` checks that a FileSource's path exists as written, so a glob always draws a
    "FileSource path does not exist" warning even when its files are there (harmless: only the
    check is literal, reads expand the glob). Where DuckDB reads a directory (2.0 on), the source
    is the directory itself, which the check accepts; `file_format` must then be given, as
    Feast's DuckDB store only infers parquet from a path ending in `.parquet`.
    """
    root = repo.tae_dir(version)
    if _duckdb_reads_directories():
        return FileSource(
            name=f"tae_{version}_source",
            path=_abs(root),
            file_format=ParquetFormat(),
            timestamp_field=EVENT_TIMESTAMP,
        )
    return FileSource(
        name=f"tae_{version}_source",
        path=_abs(root / "*" / "*.parquet"),
        timestamp_field=EVENT_TIMESTAMP,
    )


def _abs(path: Path) -> str:
    # Absolute: Feast's DuckDB store reads sources relative to the working directory, not
    # to the repo, so relative paths break `materialize` run from anywhere else.
    return str(path.resolve())


def tae_view(repo: FeatureRepo, v: FMVersion) -> FeatureView:
    return FeatureView(
        name=VersionRegistry.view_name(v.version),
        entities=[USER, ITEM],
        schema=[Field(name="embedding", dtype=Array(Float32))],
        source=tae_source(repo, v.version),
        ttl=timedelta(seconds=v.ttl_seconds),
        online=True,
        description=f"Target-aware embeddings of FM {v.version}",
        tags={
            "fm_version": v.version,
            "dim": str(v.dim),
            "checkpoint_digest": v.digest,
            "training_window": f"{v.training_window[0]}/{v.training_window[1]}",
            "status": v.status,
        },
    )


def build_definitions(repo: FeatureRepo, experts: Iterable[ExpertLike]) -> dict[str, Any]:
    """Every Feast object of the repo, keyed by the Python name it is registered under."""
    manifest = repo.load_manifest()
    events = FileSource(
        name="events_source", path=_abs(repo.events_dir / "events.parquet"), timestamp_field=EVENT_TIMESTAMP
    )
    items = FileSource(
        name="items_source", path=_abs(repo.data / "items.parquet"), timestamp_field=EVENT_TIMESTAMP
    )
    history = FileSource(
        name="user_history_source",
        path=_abs(repo.data / "user_history.parquet"), timestamp_field=EVENT_TIMESTAMP
    )
    item_view = FeatureView(
        name=ITEM_VIEW,
        entities=[ITEM],
        schema=[Field(name="category", dtype=Int64), Field(name="quality", dtype=Float32)],
        source=items,
        ttl=timedelta(0),  # item attributes do not expire
        online=True,
    )
    history_view = FeatureView(
        name=USER_HISTORY_VIEW,
        entities=[USER],
        schema=[
            Field(name="recent_items", dtype=Array(Int64)),
            Field(name="recent_actions", dtype=Array(Int64)),
        ],
        source=history,
        ttl=timedelta(0),
        online=True,
        description="The user's most recent events, for experts' short-term interest at serving",
    )
    objects: dict[str, Any] = {
        "user": USER,
        "item": ITEM,
        "events_source": events,
        "item_features": item_view,
        "user_history": history_view,
    }
    views: dict[str, FeatureView] = {}
    registry = VersionRegistry(repo, manifest=manifest)
    for v in manifest.versions.values():
        views[v.version] = objects[registry.view_name(v.version)] = tae_view(repo, v)
    for expert in experts:
        if expert.fm_version is not None:
            # A retired version keeps its view while a (forced) pin remains: existence only.
            try:
                registry.check_pin(expert.fm_version, active=False)
            except PinError:
                raise ValueError(
                    f"expert {expert.name!r} pins FM version {expert.fm_version!r}, which is "
                    f"not in {repo.manifest_path} (known: {sorted(views) or 'none'})"
                ) from None
        features: list[Any] = [item_view[list(expert.item_features)]] if expert.item_features else []
        features.append(history_view)
        tags = {"surface": getattr(expert, "surface", "")}
        if expert.fm_version is not None:
            features.insert(0, views[expert.fm_version])
            tags["fm_version"] = expert.fm_version
        objects[f"expert_{expert.name}"] = FeatureService(
            name=expert.name, features=features, tags=tags
        )
    return objects
