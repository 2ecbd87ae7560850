"""The FM inference tier: a published version's checkpoint turned into a TAE function."""

from __future__ import annotations

import numpy as np

from fm import TAEEngine, UserHistories, load_checkpoint
from store_bridge.logging_tier import TAEFunction
from store_bridge.repo import FeatureRepo, FMVersion


def load_tae_function(
    repo: FeatureRepo, version: FMVersion, histories: UserHistories
) -> TAEFunction:
    """TAEs of `version` for (user, item, time) rows, with history taken from `histories`."""
    model, _ = load_checkpoint(version.model_path(repo))
    if histories.surfaces != model.config.surfaces:
        # Surface ids are positions in these lists; a mismatch would silently swap surfaces.
        raise ValueError(
            f"FM {version.version} knows surfaces {model.config.surfaces}, "
            f"the histories encode {histories.surfaces}"
        )
    engine = TAEEngine(model, histories)

    def compute(users, items, ts_us, surfaces, hours) -> np.ndarray:
        return engine.compute(
            np.asarray(users), np.asarray(items), np.asarray(ts_us), np.asarray(surfaces),
            np.asarray(hours),
        )

    return compute

