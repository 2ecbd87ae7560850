"""Expert training use-case (`foundex expert train` and the demo's expert stage).

An expert trains on the expert window of the repo's event log and is judged by NE per task on
the evaluation window (`store_bridge.events.schema.time_windows`). Its TAEs come from one of two
sources, and everything else (label rows, item features, recent history, seed) is the same:

- the pinned, published version's logged offline store: the point-in-time training set;
- an unpublished FM checkpoint, computed on the fly: loaded once, each row's TAE computed from
  the user's events strictly before the row's time, on the row's surface, exactly what logging
  that checkpoint would have written for the row. Nothing is written anywhere: no parquet, no
  Redis, no manifest change, no saved expert. The report puts the expert's NE with the
  checkpoint beside its NE with the pinned version, both trained here, so an FM candidate is
  judged on experts before it is published.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from api.services.context import ServiceContext
from api.services.errors import Conflict, Invalid

if TYPE_CHECKING:
    import pandas as pd

    from experts import ExpertConfig, ExpertModel
    from fm import FoundationModel, UserHistories
    from store_bridge.events.schema import DatasetSpec
    from store_bridge.fm_tier import EngineTAEFunction
    from store_bridge.repo import FeatureRepo, FMVersion


@dataclass
class TrainedExpert:
    """One expert trained on the expert window and evaluated on the evaluation window."""

    model: ExpertModel
    ne: dict[str, float]  # task -> NE on the evaluation window (nan: no valid label there)
    train_rows: int
    eval_rows: int
    without_embedding: int  # rows (train + eval) that got no TAE: unknown item, none logged


@dataclass
class ExpertTrainReport:
    """What `train_expert_use_case` measured. `published` trained on the pinned version's
    logged TAEs (or none: the no-FM baseline); `candidate` on the checkpoint's, when given."""

    expert: str
    fm_version: str | None
    windows: dict[str, tuple[str, str]]  # expert_train / eval: ISO [start, end)
    published: TrainedExpert
    checkpoint: Path | None = None
    candidate: TrainedExpert | None = None
    saved: Path | None = None  # the published expert's artifact (never with a checkpoint)
    tasks: list[str] = field(default_factory=list)


# --- the expert windows: label rows, frames, train and evaluate (shared with the demo) ---


def expert_label_rows(events: pd.DataFrame, cfg: ExpertConfig, start: pd.Timestamp) -> pd.DataFrame:
    """The expert's label rows: its surface's events from `start` on (the FM window's end),
    columns user_id, item_id, event_timestamp, surface and one per task."""
    from store_bridge.events.schema import EVENT_TIMESTAMP

    rows = events[(events["surface"] == cfg.surface) & (events[EVENT_TIMESTAMP] >= start)]
    return rows[["user_id", "item_id", EVENT_TIMESTAMP, "surface", *cfg.tasks]]


def fit_and_evaluate(
    cfg: ExpertConfig,
    frame: pd.DataFrame,
    events: pd.DataFrame,
    split: pd.Timestamp,
    spec: DatasetSpec,
    tae_dim: int | None,
    *,
    progress: bool = False,
) -> TrainedExpert:
    """Train `cfg` on the rows of `frame` (an ExpertFrame without history) before `split` and
    evaluate NE per task on the rows from `split` on. Recent history comes from `events`,
    strictly before each row. Seeded by cfg.seed: the same frame gives the same model."""
    from experts import add_recent_history, evaluate, train_expert
    from store_bridge.events.schema import EVENT_TIMESTAMP

    missing = int(frame["embedding"].isna().sum()) if "embedding" in frame else 0
    frame = add_recent_history(frame, events, cfg.history_length)
    train = frame[frame[EVENT_TIMESTAMP] < split]
    test = frame[frame[EVENT_TIMESTAMP] >= split]
    model = train_expert(
        cfg, train, n_items=spec.n_items, n_categories=spec.n_categories,
        n_actions=spec.n_actions, tae_dim=tae_dim, progress=progress,
    )  # fmt: skip
    return TrainedExpert(model, evaluate(model, test), len(train), len(test), missing)


def train_on_windows(
    repo: FeatureRepo,
    cfg: ExpertConfig,
    entry: FMVersion | None,
    events: pd.DataFrame,
    spec: DatasetSpec,
    *,
    taes: CheckpointTAEs | None = None,
    progress: bool = False,
) -> TrainedExpert:
    """The demo's expert training: label rows of cfg.surface after the FM window, joined point
    in time with item features and TAEs (from `taes`, computed on the fly, when given; else the
    pinned version `entry`'s logged offline store; None and no `taes`: the no-FM baseline),
    trained on the expert window, NE per task on the evaluation window."""
    from store_bridge.events.schema import time_windows
    from store_bridge.training_set import expert_training_set

    windows = time_windows(events)
    labels = expert_label_rows(events, cfg, windows["expert_train"][0])
    if taes is None:
        frame = expert_training_set(repo, labels, entry, cfg.item_features)
        dim = entry.dim if entry else None
    else:  # item features as usual; the embedding column from the checkpoint
        frame = expert_training_set(repo, labels, None, cfg.item_features)
        frame["embedding"] = taes.embeddings(frame)
        dim = taes.dim
    return fit_and_evaluate(cfg, frame, events, windows["eval"][0], spec, dim, progress=progress)


# --- an unpublished checkpoint as a TAE source ---


class CheckpointTAEs:
    """TAEs of an FM checkpoint computed on the fly over the event log's histories.

    `embeddings(rows)` gives each row the TAE that `log_version` with this checkpoint would
    have written for it and a point-in-time join would have read back: the user's history
    strictly before the row's time, the row's surface; None where the item is outside the FM's
    vocabulary (logging skips those)."""

    def __init__(self, model: FoundationModel, path: Path, histories: UserHistories) -> None:
        from fm import TAEEngine
        from store_bridge.fm_tier import EngineTAEFunction

        self.path = Path(path)
        self.dim = int(model.config.d_model)
        self.surfaces = list(model.config.surfaces)
        self.fn: EngineTAEFunction = EngineTAEFunction(TAEEngine(model, histories))

    def embeddings(self, rows: pd.DataFrame) -> np.ndarray:
        """object [n]: a read-only float32 [dim] array per row of `rows` (user_id, item_id,
        event_timestamp, surface), or None. Raises Conflict when the FM gives NaN/Inf (logging
        would refuse to store those rows)."""
        from fm.timefeatures import timestamps_us
        from store_bridge.events.schema import EVENT_TIMESTAMP
        from store_bridge.logging_tier import IMPRESSION_COLUMNS, prepare_impressions
        from store_bridge.training_set import asof_indices

        # The rows logging would compute: one per (user, item, time), known items only.
        imp = prepare_impressions(rows[IMPRESSION_COLUMNS], self.surfaces)
        imp = imp[self.fn.known_items(imp["item_id"].to_numpy(np.int64))]
        users, items = imp["user_id"].to_numpy(np.int64), imp["item_id"].to_numpy(np.int64)
        ts = timestamps_us(imp[EVENT_TIMESTAMP])
        matrix = np.asarray(self.fn(users, items, ts, imp["surface"].to_numpy()), np.float32)
        bad = ~np.isfinite(matrix).all(axis=1)
        if bad.any():
            raise Conflict(f"FM checkpoint {self.path} produced NaN/Inf for {int(bad.sum())} of "
                           f"{len(matrix)} rows (first: user {users[bad][0]}, item {items[bad][0]})")
        # Read back as the training set reads logged rows: the latest at or before each row
        # (here always the row's own time, since every row was computed).
        hit = asof_indices(
            [users, items], ts,
            [rows["user_id"].to_numpy(np.int64), rows["item_id"].to_numpy(np.int64)],
            timestamps_us(rows[EVENT_TIMESTAMP]),
        )  # fmt: skip
        matrix.setflags(write=False)  # row views are shared, as the training set's are
        per_row = np.empty(len(matrix), dtype=object)
        per_row[:] = list(matrix)
        out = np.full(len(rows), None, dtype=object)
        found = hit >= 0
        out[found] = per_row[hit[found]]
        return out


def load_checkpoint_taes(
    path: Path, width: int, events: pd.DataFrame, spec: DatasetSpec
) -> CheckpointTAEs:
    """Load the FM checkpoint at `path` once, as a TAE source over `events`' histories. Its
    width must be `width` (the pinned version's) and its surfaces the dataset's. Raises
    Invalid (one line): no such file, not a checkpoint (fm.checkpoint.CheckpointError), other
    width, other surfaces."""
    from fm import UserHistories, load_checkpoint
    from fm.checkpoint import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise Invalid(f"FM checkpoint not found: {path}" if not path.exists()
                      else f"FM checkpoint {path} is not a file")
    try:
        model, _ = load_checkpoint(path)
    except CheckpointError as e:
        raise Invalid(str(e)) from e
    if model.config.d_model != width:
        raise Invalid(f"FM checkpoint {path} gives {model.config.d_model}-d TAEs; the expert's "
                      f"pinned version is {width}-d (they must match)")
    if list(model.config.surfaces) != list(spec.surfaces):
        # Surface ids are positions in these lists; a mismatch would swap surfaces.
        raise Invalid(f"FM checkpoint {path} knows surfaces {model.config.surfaces}, the event "
                      f"log has {spec.surfaces}")
    return CheckpointTAEs(model, path, UserHistories.from_events(events, spec.surfaces))


# --- the use-case ---


def _event_log(repo: FeatureRepo) -> tuple[pd.DataFrame, DatasetSpec]:
    """The repo's event log and dataset spec; Conflict when either is missing."""
    import pandas as pd

    from store_bridge.events.schema import DatasetSpec

    events_path, spec_path = repo.events_dir / "events.parquet", repo.events_dir / "spec.json"
    if not (events_path.is_file() and spec_path.is_file()):
        raise Conflict(f"no event log (events.parquet and spec.json) in {repo.events_dir}")
    return pd.read_parquet(events_path), DatasetSpec.load(spec_path)


def _save_atomic(model: ExpertModel, cfg: ExpertConfig, path: Path) -> Path:
    """Save under a temporary name, then rename: a failed save leaves the old model intact."""
    from experts import save_expert

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_expert(model, cfg, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def train_expert_use_case(
    ctx: ServiceContext,
    expert: str,
    *,
    fm_checkpoint: Path | None = None,
    progress: bool = False,
    say: Callable[[str], None] | None = None,
) -> ExpertTrainReport:
    """Train expert `expert` (its config under data/experts/) on the expert window of the
    repo's event log and evaluate NE per task on the evaluation window, as the demo does.

    Without `fm_checkpoint`: TAEs from the pinned version's logged offline store; the trained
    expert is saved to data/models/<expert>.pt. With it: the expert is trained twice, same
    seed and data, once on the pinned version's logged TAEs and once on the checkpoint's,
    computed on the fly; nothing is written (no model, no TAE, no manifest change).

    Raises NotFound (unknown expert), Conflict (a bad pin, no event log or item features, a
    checkpoint giving NaN/Inf), Invalid (the checkpoint: missing, not one, other surfaces or
    width; or the expert pins no version to compare with)."""
    from api.services.offline import plan_training_set
    from store_bridge.events.schema import time_windows

    note = say or (lambda _msg: None)
    plan = plan_training_set(ctx, expert)  # the expert exists, its pin is active
    cfg, entry = plan.expert, plan.entry
    if fm_checkpoint is not None and entry is None:
        raise Invalid(f"expert {expert} pins no FM version (the no-FM baseline): "
                      "--fm-checkpoint needs a pinned version to compare with")
    events, spec = _event_log(ctx.repo)
    # The checkpoint first: a bad one fails before any training.
    taes = (load_checkpoint_taes(fm_checkpoint, entry.dim, events, spec)
            if fm_checkpoint is not None and entry is not None else None)
    windows = time_windows(events)
    note(f"training {expert} on {cfg.fm_version or 'no FM'} (logged TAEs)")
    published = train_on_windows(ctx.repo, cfg, entry, events, spec, progress=progress)
    report = ExpertTrainReport(
        expert, cfg.fm_version,
        {k: (a.isoformat(), b.isoformat()) for k, (a, b) in windows.items() if k != "fm"},
        published, checkpoint=fm_checkpoint, tasks=list(cfg.tasks),
    )  # fmt: skip
    if taes is None:
        ctx.repo.models_dir.mkdir(parents=True, exist_ok=True)
        report.saved = _save_atomic(published.model, cfg, ctx.repo.models_dir / f"{expert}.pt")
    else:
        note(f"training {expert} on checkpoint {fm_checkpoint} (TAEs on the fly)")
        report.candidate = train_on_windows(
            ctx.repo, cfg, entry, events, spec, taes=taes, progress=progress
        )
    return report


def ne_report_table(report: ExpertTrainReport) -> str:
    """Markdown table: NE per task with the pinned version and, when trained, the checkpoint
    (lower is better; 1.0 = the base rate)."""
    pinned = report.fm_version or "no FM"
    head = ["task", f"NE {pinned} (published)"]
    if report.candidate is not None:
        head += [f"NE {report.checkpoint.name} (checkpoint)", "diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x: float) -> str:
        return "-" if x != x else f"{x:.4f}"

    for task in report.tasks:
        a = report.published.ne.get(task, float("nan"))
        cells = [task, fmt(a)]
        if report.candidate is not None:
            b = report.candidate.ne.get(task, float("nan"))
            # (+ 0.0 turns a difference that rounds to -0.0 into 0.0)
            cells += [fmt(b), "-" if a != a or b != b else f"{round(b - a, 4) + 0.0:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
