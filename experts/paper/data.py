"""A study's data: one dataset loaded (and subsampled to the plan), its time windows, surfaces.

The windows (`store_bridge.events.schema.time_windows`) split the log by time: the FMs train on
the first 60%, the experts on the next 20% and are judged on the last 20%.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from experts.paper.plan import Plan
from store_bridge.events.schema import DatasetSpec, time_windows

DATASETS = ("synthetic", "kuairand", "movielens")


class DataError(ValueError):
    """The dataset named for a run is missing or not in the format its loader reads."""


@dataclass
class StudyData:
    """One dataset as the studies use it.

    windows: name ("fm", "expert_train", "eval") -> (start, end) timestamps; surfaces: the ones the
    experts are trained for (see `choose_surfaces`).
    """

    name: str
    events: pd.DataFrame
    items: pd.DataFrame
    spec: DatasetSpec
    surfaces: list[str]
    windows: dict[str, tuple[pd.Timestamp, pd.Timestamp]]

    @property
    def fm_end(self) -> pd.Timestamp:
        """The FMs train on events before this time; experts see the rows from it on."""
        return self.windows["fm"][1]

    @property
    def eval_start(self) -> pd.Timestamp:
        """Experts train on rows before this time and are judged on the rows from it on."""
        return self.windows["eval"][0]


def load_study_data(data: str, data_path: str | Path | None, plan: Plan) -> StudyData:
    """Load `data` (one of DATASETS; a real one from `data_path`), keep at most
    `plan.max_users` users, and choose up to `plan.max_surfaces` surfaces.

    Raises DataError when the dataset is unknown, its path is missing or its files are not in
    the loader's format.
    """
    events, items, spec = load_data(data, data_path, plan)
    surfaces = choose_surfaces(events, spec, data, plan.max_surfaces)
    return StudyData(data, events, items, spec, surfaces, time_windows(events))


def load_data(
    data: str, data_path: str | Path | None, plan: Plan
) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    """(events, items, spec) of `data`; raises DataError (see `load_study_data`)."""
    try:
        return _load_data(data, data_path, plan)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from e


def _load_data(
    data: str, data_path: str | Path | None, plan: Plan
) -> tuple[pd.DataFrame, pd.DataFrame, DatasetSpec]:
    if data == "synthetic":
        from store_bridge.events.synthetic import SyntheticConfig, generate

        n_users = plan.max_users or 1000
        cfg = SyntheticConfig(n_users=n_users, n_items=max(100, n_users // 2), days=21)
        events, items, spec = generate(cfg)
        return events, items, spec
    if data_path is None:
        raise ValueError(f"--data {data} needs --data-path")
    if data == "kuairand":
        from store_bridge.events.kuairand import load_kuairand

        events, items, spec, _ = load_kuairand(Path(data_path))
    elif data == "movielens":
        from store_bridge.events.movielens import load_movielens

        events, items, spec = load_movielens(Path(data_path))
    else:
        raise ValueError(f"unknown data {data!r}; choose from {DATASETS}")
    if plan.max_users is not None and events["user_id"].nunique() > plan.max_users:
        users = np.sort(events["user_id"].unique())
        keep = np.random.default_rng(0).choice(users, plan.max_users, replace=False)
        events = events[events["user_id"].isin(keep)].reset_index(drop=True)
    return events, items, spec


def choose_surfaces(events: pd.DataFrame, spec: DatasetSpec, data: str, k: int) -> list[str]:
    """synthetic: feed; otherwise the k surfaces with the most events."""
    if data == "synthetic":
        return ["feed"]
    counts = events["surface"].value_counts()
    return [s for s in counts.index[:k] if s in spec.surfaces]
