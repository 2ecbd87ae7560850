"""The paper's expert variants, all built from the one ExpertModel:

    nofm       the expert without any FM input (the baseline every table compares against)
    ue         + a user-level embedding (UE) from the candidate-free FM variant
    tae_small  + the TAE of the small FM version
    tae        + the TAE of the large FM version
    ue_tae     + [UE, TAE] concatenated into the FM Embedding Module's input
    one_stage  one bigger model per surface with no FM: wider, longer short-term history

An FM-fed variant is an ExpertModel whose `embedding` column holds the vector it reads
(UE, TAE or their concatenation) with tae_dim the vector's width, so the architecture code is
shared and the only thing that differs between variants is the input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from experts.config import ExpertConfig
from experts.dataset import HISTORY_COLUMNS, add_recent_history
from experts.train import evaluate, train_expert
from store_bridge.events.schema import EVENT_TIMESTAMP

FM_VARIANTS = ("ue", "tae_small", "tae", "ue_tae")
NO_FM_VARIANTS = ("nofm", "one_stage")  # no FM input: fm_version None, no vector
VARIANTS = ("nofm", *FM_VARIANTS, "one_stage")
# one-stage model: this many times the expert's width and history (no FM to lean on)
ONE_STAGE_WIDTH = 2
ONE_STAGE_HISTORY = 4


@dataclass
class ExpertSize:
    hidden_dim: int = 64
    history_length: int = 8
    epochs: int = 2  # at least this many
    batch_size: int = 512
    min_steps: int = 150  # more epochs on small frames, up to max_epochs
    max_epochs: int = 8
    holdout_frac: float = 0.0  # > 0: early stopping on that latest slice (ExpertConfig)

    def for_rows(self, n_rows: int) -> ExpertSize:
        """This size with epochs raised so training takes >= min_steps optimiser steps; with
        early stopping, max_epochs (the held-out slice decides when to stop)."""
        if self.holdout_frac > 0:
            return replace(self, epochs=self.max_epochs)
        per_epoch = max(1, -(-n_rows // self.batch_size))
        epochs = max(self.epochs, min(self.max_epochs, -(-self.min_steps // per_epoch)))
        return replace(self, epochs=epochs)


@dataclass
class VariantResult:
    name: str
    ne: dict[str, float]  # task -> NE on the test window
    flops: int  # multiply-adds per candidate (ExpertModel.flops_per_candidate)
    params: int
    emb_dim: int | None


def variant_config(
    variant: str, surface: str, tasks: list[str], size: ExpertSize, seed: int
) -> ExpertConfig:
    """The ExpertConfig of one variant (fm_version is a label here: the vector comes in-memory)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    hidden, history = size.hidden_dim, size.history_length
    if variant == "one_stage":
        hidden, history = hidden * ONE_STAGE_WIDTH, history * ONE_STAGE_HISTORY
    return ExpertConfig(
        name=f"{surface.lower()}_{variant}"[:63],
        surface=surface,
        tasks=tasks,
        fm_version=None if variant in NO_FM_VARIANTS else "v1",
        history_length=history,
        hidden_dim=hidden,
        epochs=size.epochs,
        holdout_frac=size.holdout_frac,
        batch_size=size.batch_size,
        seed=seed,
        description=f"paper-tables variant {variant}",
    )


def base_frame(
    rows: pd.DataFrame,
    events: pd.DataFrame,
    items: pd.DataFrame,
    tasks: list[str],
    history_length: int,
) -> pd.DataFrame:
    """Label rows + item features + each row's recent history strictly before its time."""
    cols = ["user_id", "item_id", EVENT_TIMESTAMP, "surface"]
    frame = rows[cols + tasks].reset_index(drop=True)
    feats = items[["item_id", "category", "quality"]].drop_duplicates("item_id")
    frame = frame.merge(feats, on="item_id", how="left")
    return add_recent_history(frame, events, history_length)


def with_embedding(
    frame: pd.DataFrame, vectors: np.ndarray | None, history_length: int | None = None
) -> pd.DataFrame:
    """A shallow copy of `frame` whose `embedding` column holds the rows of `vectors`, and
    whose recent history is cut to its last `history_length` events when given."""
    out = frame.copy(deep=False)
    if history_length is not None:
        for col in HISTORY_COLUMNS:
            tail = np.stack(frame[col].to_numpy(dtype=object))[:, -history_length:]
            out[col] = list(tail)
    if vectors is not None:
        if len(vectors) != len(frame):
            raise ValueError(f"{len(vectors)} vectors for {len(frame)} rows")
        out["embedding"] = list(np.asarray(vectors, dtype=np.float32))
    return out


def variant_vectors(variant: str, vectors: dict[str, np.ndarray]) -> np.ndarray | None:
    """The FM input of a variant from {"ue", "tae_small", "tae"} arrays (None: no FM input)."""
    if variant in NO_FM_VARIANTS:
        return None
    if variant == "ue_tae":
        return np.concatenate([vectors["ue"], vectors["tae"]], axis=1)
    return vectors[variant]


def train_variant(
    variant: str,
    train: pd.DataFrame,
    test: pd.DataFrame,
    vectors_train: dict[str, np.ndarray],
    vectors_test: dict[str, np.ndarray],
    *,
    surface: str,
    tasks: list[str],
    size: ExpertSize,
    seed: int,
    n_items: int,
    n_categories: int,
    n_actions: int,
    progress: bool = False,
) -> VariantResult:
    """Train one variant on `train`, NE per task on `test`. Frames come from `base_frame` with
    at least the variant's history length (longer stored histories are cut to their tail)."""
    cfg = variant_config(variant, surface, tasks, size, seed)
    vec_tr = variant_vectors(variant, vectors_train)
    vec_te = variant_vectors(variant, vectors_test)
    dim = None if vec_tr is None else int(vec_tr.shape[1])
    model = train_expert(
        cfg,
        with_embedding(train, vec_tr, cfg.history_length),
        n_items=n_items,
        n_categories=n_categories,
        n_actions=n_actions,
        tae_dim=dim,
        progress=progress,
    )
    ne = evaluate(model, with_embedding(test, vec_te, cfg.history_length))
    return VariantResult(
        name=variant,
        ne=ne,
        flops=model.flops_per_candidate(),
        params=model.param_count(),
        emb_dim=dim,
    )
