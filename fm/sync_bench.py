"""`foundex bench sync`: bytes and seconds of a weight-sync delta vs a full snapshot.

For each FM: a trainer takes `steps_per_sync` streaming steps (random request batches, random
labels), then plans a delta of the most-updated `fraction` (fm.sync) and, separately, a full
snapshot of the same weights. Each update then goes the whole way to serving:

    plan       trainer: rank components, build the delta and the next synced state (+ digest);
               for a snapshot, copy the weights and digest them
    serialize  to bytes (torch.save of plain dicts)
    write      to a file, tmp + fsync + rename (as store_bridge.fm_sync publishes)
    read       the file back and parse it (a snapshot's weights checked against its digest)
    apply      serving: delta onto its state with the result's digest checked (a snapshot
               replaces the state: nothing to do)
    load       the new state copied into a serving model (TAE path)
    digest     one sha256 pass over the whole state (`state_digest`), reported apart: a
               delta's plan and apply each do one, a snapshot's plan and read each do one,
               so on a big table it is most of a delta's seconds

A streaming step moves the rows of the items in its batch (and every dense weight). With the
trainer's AdamW ("adamw"), a row keeps moving on momentum after its items leave the batches;
with "rowwise" (Adagrad on the embedding tables, AdamW on the rest: the usual sparse setup) a
step moves exactly its batch's rows, which is what row-wise sync exploits on a big item table.
Times are the best of `repeats`; bytes are exact. Nothing here is asserted: it measures.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fm.batching import random_batch
from fm.config import FMConfig
from fm.model import FoundationModel
from fm.sync import (
    Delta,
    SyncTracker,
    Update,
    apply_delta,
    embedding_tables,
    plan_and_apply,
    state_digest,
    state_nbytes,
    update_from_bytes,
)
from fm.testing import toy_config_kwargs

ITEM_TABLE = "embed.item.weight"


@dataclass
class SyncBenchCase:
    label: str
    config: FMConfig
    optimizer: str = "adamw"  # "adamw" | "rowwise" (module docstring)
    batch_requests: int = 32
    n_targets: int = 6


def standard_cases(
    demo_fm_fields: Mapping[str, Any] | None = None,
    *,
    big_items: int = 1_000_000,
    big_d: int = 32,
) -> list[SyncBenchCase]:
    """A tiny FM, the demo's two FMs (`demo_fm_fields`: the dataset part of their FMConfig
    plus max_history, as api.pipeline builds them; left out when None) and an FM with a
    `big_items`-row item table of width `big_d` trained row-sparse."""
    cases = [SyncBenchCase("tiny", FMConfig.small(**toy_config_kwargs(100), max_history=16))]
    if demo_fm_fields is not None:
        cases.append(SyncBenchCase("demo small", FMConfig.small(**demo_fm_fields)))
        cases.append(SyncBenchCase("demo large", FMConfig.large(**demo_fm_fields)))
    big = FMConfig.small(**toy_config_kwargs(big_items), d_model=big_d, max_history=64,
                         item_dim=0)  # the table big_d wide, as the case's name says
    cases.append(SyncBenchCase(f"{big_items:,}-item table", big, optimizer="rowwise"))
    return cases


def _optimizers(model: FoundationModel, kind: str) -> list[torch.optim.Optimizer]:
    cfg = model.config
    if kind == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if kind != "rowwise":
        raise ValueError(f"optimizer must be 'adamw' or 'rowwise', got {kind!r}")
    tables = set(embedding_tables(model))
    named = dict(model.named_parameters())
    sparse = [p for n, p in named.items() if n in tables]
    dense = [p for n, p in named.items() if n not in tables]
    # Adagrad's step is g / sqrt(sum g^2): zero for a row whose gradient is zero
    return [torch.optim.Adagrad(sparse, lr=0.05), torch.optim.AdamW(dense, lr=cfg.lr)]


class _Streamer:
    """Random request batches through the model and its optimizers, one step at a time."""

    def __init__(self, case: SyncBenchCase, seed: int) -> None:
        torch.manual_seed(seed)
        self.case, self.seed, self.step = case, seed, 0
        self.model = FoundationModel(case.config)
        self.opts = _optimizers(self.model, case.optimizer)

    def train(self, steps: int) -> None:
        cfg, c = self.case.config, self.case
        g = torch.Generator().manual_seed(self.seed + self.step)
        for _ in range(steps):
            hist = torch.randint(1, cfg.max_history + 1, (c.batch_requests,), generator=g)
            b = random_batch(cfg, hist.tolist(), c.n_targets, seed=self.seed + self.step)
            b.labels = torch.randint(0, 2, (*b.tgt_item.shape, len(cfg.fm_tasks)), generator=g)
            b.labels = b.labels.float()
            loss, _ = self.model.loss(b, self.model(b))
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in self.opts:
                opt.step()
            self.step += 1


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _ship(
    update: Update,
    base: dict,
    base_digest: str,
    serving: FoundationModel,
    folder: Path,
    repeats: int,
) -> dict[str, Any]:
    """Serialize, write, read, apply and load one update -> seconds and bytes."""
    path = folder / f"{update.kind}-{update.seq}.pt"
    t_ser, data = _best(update.to_bytes, repeats)
    t_write, _ = _best(lambda: _write(path, data), repeats)
    t_read, back = _best(lambda: update_from_bytes(path.read_bytes(), source=str(path)), repeats)
    if isinstance(back, Delta):
        t_apply, state = _best(lambda: apply_delta(base, back, known_digest=base_digest), repeats)
    else:
        t_apply, state = 0.0, back.state
    t_load, _ = _best(lambda: serving.load_state_dict(state), repeats)
    path.unlink()
    return {
        "payload_bytes": update.nbytes,
        "file_bytes": len(data),
        "serialize_s": t_ser,
        "write_s": t_write,
        "read_s": t_read,
        "apply_s": t_apply,
        "load_s": t_load,
        "ship_s": t_ser + t_write + t_read + t_apply,
    }


def bench_case(
    case: SyncBenchCase,
    *,
    steps_per_sync: int = 10,
    fraction: float = 0.3,
    repeats: int = 3,
    folder: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """One FM: a warm-up sync, then `steps_per_sync` steps and one delta vs one snapshot of
    the same weights -> the case's figures (bytes exact, seconds best of `repeats`)."""
    s = _Streamer(case, seed)
    tracker = SyncTracker.for_model(
        s.model, every_steps=steps_per_sync, snapshot_every=1 << 30, fraction=fraction
    )
    serving = FoundationModel(case.config, with_heads=False).eval()
    s.train(steps_per_sync)  # a first sync, so the measured one follows a sync as in steady state
    tracker.sync(s.model.state_dict(), s.step)
    s.train(steps_per_sync)
    base = tracker.synced
    live = s.model.state_dict()
    # the trainer's work for each kind, from the same synced state to the same weights
    t_plan, (delta, _) = _best(
        lambda: plan_and_apply(
            base.state,
            live,
            fraction=fraction,
            row_wise=tracker.row_wise,
            seq=base.seq + 1,
            step=s.step,
            base_digest=base.digest,
        ),
        repeats,
    )
    snapper = SyncTracker(base.state, row_wise=tracker.row_wise, seq=base.seq)
    t_snap, snap = _best(lambda: snapper.snapshot(live, s.step), repeats)
    total = state_nbytes(base.state)
    # one sha256 pass over the state: a delta's apply and a snapshot's read each do one
    t_digest, _ = _best(lambda: state_digest(base.state), repeats)
    out: dict[str, Any] = {
        "model": case.label,
        "n_items": case.config.n_items,
        "d_model": case.config.d_model,
        "optimizer": case.optimizer,
        "state_bytes": total,
        # the item table: the one whose rows are the real win (other tables are tiny)
        "item_rows_changed": int((live[ITEM_TABLE] != base.state[ITEM_TABLE]).any(dim=1).sum()),
        "item_rows_shipped": int(delta.rows[ITEM_TABLE].index.numel())
        if ITEM_TABLE in delta.rows
        else (case.config.n_items if ITEM_TABLE in delta.tensors else 0),
        "tensors_shipped": len(delta.tensors),
        "tables_by_row": len(delta.rows),
        "digest_s": t_digest,
    }
    for kind, update, t in (("delta", delta, t_plan), ("snapshot", snap, t_snap)):
        figs = _ship(update, base.state, base.digest, serving, folder, repeats)
        out[kind] = {"plan_s": t, **figs, "share_of_state": figs["file_bytes"] / total}
    return out


def bench_sync(
    cases: Sequence[SyncBenchCase] | None = None,
    *,
    steps_per_sync: int = 10,
    fraction: float = 0.3,
    repeats: int = 3,
    seed: int = 0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every case (default `standard_cases()`, without the demo FMs) -> the JSON-ready result:
    one row per (model, kind) under "rows", and per model the delta/snapshot ratios."""
    cases = list(standard_cases() if cases is None else cases)
    rows, models = [], {}
    with tempfile.TemporaryDirectory(prefix="foundex-sync-bench-") as tmp:
        for case in cases:
            say(f"  {case.label}: {steps_per_sync} steps per sync, fraction {fraction}")
            r = bench_case(
                case,
                steps_per_sync=steps_per_sync,
                fraction=fraction,
                repeats=repeats,
                folder=Path(tmp),
                seed=seed,
            )
            d, sn = r["delta"], r["snapshot"]
            for kind in ("delta", "snapshot"):
                rows.append(
                    {k: v for k, v in r.items() if k not in ("delta", "snapshot")}
                    | {"kind": kind}
                    | _rounded(r[kind])
                )
            models[case.label] = {
                "state_bytes": r["state_bytes"],
                "item_rows_changed": r["item_rows_changed"],
                "item_rows_shipped": r["item_rows_shipped"],
                "delta_file_bytes": d["file_bytes"],
                "snapshot_file_bytes": sn["file_bytes"],
                "bytes_ratio": round(d["file_bytes"] / sn["file_bytes"], 4),
                "delta_ship_s": round(d["ship_s"], 4),
                "snapshot_ship_s": round(sn["ship_s"], 4),
                "digest_s": round(r["digest_s"], 4),
                "time_ratio": round(d["ship_s"] / sn["ship_s"], 3) if sn["ship_s"] else None,
            }
    return {
        "bench": "fm_sync",
        "fraction": fraction,
        "steps_per_sync": steps_per_sync,
        "repeats": repeats,
        "device": f"cpu ({platform.processor() or 'cpu'})",
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "models": models,
    }


def _rounded(figs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in figs.items()}


def format_table(result: Mapping[str, Any]) -> str:
    head = (
        "model",
        "kind",
        "file bytes",
        "of state",
        "item rows",
        "plan s",
        "ser s",
        "write s",
        "read s",
        "apply s",
        "ship s",
        "load s",
        "digest s",
    )
    lines = [head]
    for r in result["rows"]:
        lines.append(
            (
                r["model"],
                r["kind"],
                f"{r['file_bytes']:,}",
                f"{r['share_of_state']:.1%}",
                f"{r['item_rows_shipped']:,}/{r['item_rows_changed']:,}"
                if r["kind"] == "delta"
                else "all",
                *(
                    f"{r[k]:.4f}"
                    for k in (
                        "plan_s",
                        "serialize_s",
                        "write_s",
                        "read_s",
                        "apply_s",
                        "ship_s",
                        "load_s",
                        "digest_s",
                    )
                ),
            )
        )
    w = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(row))
        for row in lines
    )


def run(say: Callable[[str], None] = print, **kw: Any) -> dict[str, Any]:
    """bench_sync, then the table, then the JSON object as the very last line."""
    result = bench_sync(say=say, **kw)
    say("")
    say(format_table(result))
    say(json.dumps(result))
    return result
