"""The FM inference tier: a published version's model turned into TAEs, with the histories
taken from the repo's event log. Logging and the service's read-through share it.

Time features are the FM's own business: the engine derives the hour of day from each row's
timestamp in the time zone its config records (`FMConfig.time_zone`), so logged, trained and
served TAEs of one instant agree. Items outside the FM's vocabulary are reported, never fed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fm import TAEEngine, UserHistories, load_checkpoint
from store_bridge.events.schema import DatasetSpec
from store_bridge.repo import FeatureRepo, FMVersion


def repo_histories(repo: FeatureRepo) -> UserHistories | None:
    """Every user's history from the repo's event log (surface codes in the dataset's order);
    None when the repo has no event log."""
    events_path, spec_path = repo.events_dir / "events.parquet", repo.events_dir / "spec.json"
    if not (events_path.is_file() and spec_path.is_file()):
        return None
    spec = DatasetSpec.load(spec_path)
    return UserHistories.from_events(pd.read_parquet(events_path), spec.surfaces)


def load_engine(
    repo: FeatureRepo, version: FMVersion, histories: UserHistories, *, history_cache: bool = False
) -> TAEEngine:
    """The version's TAE engine (serving artifact where there is one). ValueError when the
    model does not fit the version or the histories."""
    model, _ = load_checkpoint(version.model_path(repo))
    if histories.surfaces != model.config.surfaces:
        # Surface ids are positions in these lists; a mismatch would silently swap surfaces.
        raise ValueError(
            f"FM {version.version} knows surfaces {model.config.surfaces}, "
            f"the histories encode {histories.surfaces}"
        )
    if model.config.d_model != version.dim:
        raise ValueError(
            f"FM {version.version} is published as {version.dim}-d, its model is "
            f"{model.config.d_model}-d"
        )
    return TAEEngine(model, histories, history_cache=history_cache)


class EngineTAEFunction:
    """A `TAEFunction` over a TAEEngine: (users, items, ts_us, surfaces) -> [n, d] float32,
    and `known_items` so that the logging tier skips (and counts) items the FM does not know.
    The hour of day comes from ts_us inside the engine, in the FM's own time zone."""

    def __init__(self, engine: TAEEngine) -> None:
        self.engine = engine

    def known_items(self, item_ids: np.ndarray) -> np.ndarray:
        """bool [n]: ids inside the FM's vocabulary [0, n_items)."""
        return self.engine.known_items(np.asarray(item_ids))

    def __call__(
        self, users: np.ndarray, items: np.ndarray, ts_us: np.ndarray, surfaces: np.ndarray
    ) -> np.ndarray:
        return self.engine.compute(
            np.asarray(users), np.asarray(items), np.asarray(ts_us), np.asarray(surfaces)
        )


def load_tae_function(
    repo: FeatureRepo, version: FMVersion, histories: UserHistories
) -> EngineTAEFunction:
    """TAEs of `version` for (user, item, time) rows, with history taken from `histories`."""
    return EngineTAEFunction(load_engine(repo, version, histories))
