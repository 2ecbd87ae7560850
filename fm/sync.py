"""Component-wise weight sync: ship the most-updated part of an FM's weights as a delta.

The paper's HyperCast trains the FM in streaming fashion and, instead of publishing a full
snapshot "which can be time-consuming", ships only part of the model through "a
component-wise streaming synchronization mechanism" (../shared/paper, "High Freshness"; the
stored text breaks off at "only part of (e.g. 30"; the issue and DESIGN.md complete it: about
30% of the weights, the most updated). It gives no formula for "most updated"; the rule below
is foundex's.

Terms
    state       name -> tensor, as `model.state_dict()` gives (fp32, CPU). Every function here
                treats states as values: it returns a new dict and never writes into a tensor
                it was given; tensors a result did not change are shared with the input.
    component   one whole tensor, or one row of an embedding table (`row_wise`).
    synced      what serving holds: the last snapshot plus every delta since. Deltas are
                measured against it, not against the trainer's previous live weights, so a
                component left out of one delta keeps its accumulated update and ranks higher
                in the next. Unless every change fits the budget (always at fraction=1.0), the
                synced state is NOT the trainer's state.
    digest      `state_digest`: both sides compute it, so a delta names the state it applies
                to (`base_digest`) and the state it yields (`digest`).

Ranking rule (`plan_delta`): each changed component scores ||delta||^2 / bytes, the squared
update it removes per byte it costs to ship (a row costs its values plus 8 bytes of index).
Components are walked in decreasing score (ties: name, then row) and each is taken if it
still fits in the budget, `fraction` of the bytes of the whole state; one that does not fit
is skipped and the walk goes on to cheaper ones. That is the greedy answer to "remove as much
of the squared distance between serving's weights and the trainer's as the budget allows"
(a knapsack with value ||delta||^2 and weight bytes); it needs no per-tensor scale, and a
component whose update is exactly zero never ships (an untouched row of a 1,000,000-row item
table costs nothing). Two consequences: a tensor larger than the whole budget reaches serving
only through snapshots; a row-wise table whose changed rows would cost more than the table
itself ships as one whole component (no index overhead), so fraction=1.0 always ships every
change and reproduces the trainer's weights exactly.

Wire format: `torch.save` of plain dicts of tensors, ints and strings, read back with
`torch.load(weights_only=True)`: loading a delta or snapshot never runs code from the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from fm.model import FoundationModel

FORMAT = "foundex-fm-sync/1"
INDEX_BYTES = 8  # one int64 row index shipped beside each row
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")


class DeltaMismatch(ValueError):
    """A delta met a state it was not planned for (or did not yield the state it promised).
    The one-line message carries both digests. Serving recovers from the last snapshot."""


class SyncFormatError(ValueError):
    """Bytes or objects that are not a well-formed delta or snapshot; the message names them."""


# ---- digests and states -------------------------------------------------------------------------


def state_digest(state: Mapping[str, Tensor]) -> str:
    """sha256 hex of a state: every tensor's name, dtype, shape and bytes, in sorted name order.

    Deterministic across processes and machines for the same values (tensors are read on CPU,
    contiguous). Raises TypeError for a value that is not a tensor."""
    h = hashlib.sha256(f"{FORMAT}:{len(state)}\n".encode())
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"state entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        # a JSON header per tensor: names may hold any character, shapes differ in length
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tae_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The part of a FoundationModel state that computing a TAE reads (task heads dropped, as
    in the serving artifact), as detached CPU copies that later training cannot touch. This is
    what the serving and logging tiers hold, hence what a trainer syncs."""
    return {
        k: v.detach().to("cpu").clone()
        for k, v in state.items()
        if not FoundationModel.is_head_param(k)
    }


def embedding_tables(model: nn.Module) -> list[str]:
    """State-dict names of the model's `nn.Embedding` weights: the tables synced row by row."""
    return sorted(
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding)
    )


def auto_row_wise(state: Mapping[str, Tensor]) -> list[str]:
    """Names treated as embedding tables when the caller does not say: 2-D tensors whose name
    says embedding ("embed" in it). Without the model at hand this is all a state tells;
    `embedding_tables(model)` is exact."""
    return sorted(k for k, v in state.items() if v.dim() == 2 and "embed" in k.lower())


def state_nbytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of the tensors' values (what `fraction` is a fraction of)."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ---- deltas and snapshots -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: compare digests instead
class RowSlice:
    """Some rows of one embedding table: `table[index] = values`."""

    index: Tensor  # [k] int64, ascending, unique
    values: Tensor  # [k, *row_shape], the table's dtype

    @property
    def nbytes(self) -> int:
        return self.index.numel() * INDEX_BYTES + self.values.numel() * self.values.element_size()


@dataclass(frozen=True, eq=False)
class Delta:
    """Part of a state: applied to the state whose digest is `base_digest`, it yields the state
    whose digest is `digest` (`apply_delta`). `seq` numbers the syncs of one FM version."""

    seq: int
    base_digest: str
    digest: str
    tensors: dict[str, Tensor]  # whole tensors, new values
    rows: dict[str, RowSlice]  # rows of embedding tables, new values
    step: int = 0  # the trainer's step when it was planned
    kind: ClassVar[str] = "delta"

    @property
    def nbytes(self) -> int:
        """Bytes of the shipped values and row indices (the file adds a few hundred bytes of
        archive framing per tensor)."""
        dense = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return dense + sum(r.nbytes for r in self.rows.values())

    @property
    def n_rows(self) -> int:
        """Embedding rows shipped."""
        return sum(r.index.numel() for r in self.rows.values())

    def to_bytes(self) -> bytes:
        return _save(
            {
                "format": FORMAT,
                "kind": self.kind,
                "seq": self.seq,
                "step": self.step,
                "base_digest": self.base_digest,
                "digest": self.digest,
                "tensors": dict(self.tensors),
                "rows": {k: {"index": r.index, "values": r.values} for k, r in self.rows.items()},
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "delta") -> Delta:
        """Parse `to_bytes` output. Raises SyncFormatError (naming `source`) for anything else."""
        return cls._from_payload(_load(data, source, cls.kind), source)

    @classmethod
    def _from_payload(cls, p: dict[str, Any], source: str) -> Delta:
        raw_rows = p.get("rows")
        if not isinstance(raw_rows, dict):
            raise SyncFormatError(f"{source}: 'rows' is not a dict")
        rows = {}
        for name, r in raw_rows.items():
            index = r.get("index") if isinstance(r, dict) else None
            values = r.get("values") if isinstance(r, dict) else None
            if not (
                isinstance(name, str) and isinstance(index, Tensor) and isinstance(values, Tensor)
            ):
                raise SyncFormatError(f"{source}: rows of {name!r} lack index/values tensors")
            if (
                index.dtype != torch.int64
                or index.dim() != 1
                or values.dim() < 1
                or (values.shape[0] != index.numel())
            ):
                raise SyncFormatError(
                    f"{source}: rows of {name!r}: index must be int64 [k] and values [k, ...], "
                    f"got {index.dtype} {list(index.shape)} and {list(values.shape)}"
                )
            rows[name] = RowSlice(index, values)
        return cls(
            seq=p["seq"],
            base_digest=_digest_field(p, "base_digest", source),
            digest=_digest_field(p, "digest", source),
            tensors=_tensor_dict(p.get("tensors"), source, "tensors"),
            rows=rows,
            step=p["step"],
        )


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A whole state with its sync sequence number and digest."""

    seq: int
    digest: str
    state: dict[str, Tensor]
    step: int = 0
    kind: ClassVar[str] = "snapshot"

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.state)

    def to_bytes(self) -> bytes:
        return _save(
            {
                "format": FORMAT,
                "kind": self.kind,
                "seq": self.seq,
                "step": self.step,
                "digest": self.digest,
                "state": dict(self.state),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "snapshot", verify: bool = True) -> Snapshot:
        """Parse `to_bytes` output; `verify` checks the weights against the digest (one sha256
        pass over them). Raises SyncFormatError naming `source`."""
        return cls._from_payload(_load(data, source, cls.kind), source, verify)

    @classmethod
    def _from_payload(cls, p: dict[str, Any], source: str, verify: bool = True) -> Snapshot:
        state = _tensor_dict(p.get("state"), source, "state")
        digest = _digest_field(p, "digest", source)
        if verify and state_digest(state) != digest:
            raise SyncFormatError(f"{source}: the weights do not match the snapshot's digest")
        return cls(seq=p["seq"], digest=digest, state=state, step=p["step"])


Update = Delta | Snapshot


def update_from_bytes(data: bytes, *, source: str = "update") -> Update:
    """A delta or a snapshot, whichever the bytes hold (SyncFormatError otherwise)."""
    p = _load(data, source, None)
    return (
        Delta._from_payload(p, source)
        if p["kind"] == "delta"
        else (Snapshot._from_payload(p, source))
    )


def _save(payload: dict[str, Any]) -> bytes:
    # in memory: torch.save names the archive after a file, so bytes would depend on its name
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _load(data: bytes, source: str, kind: str | None) -> dict[str, Any]:
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save always writes a zip archive
        raise SyncFormatError(f"{source}: not a PyTorch archive")
    try:
        with warnings.catch_warnings():  # torch warns about foreign files before failing
            warnings.simplefilter("ignore")
            p = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # never pass on torch's advice to drop weights_only
        raise SyncFormatError(
            f"{source}: holds Python objects other than tensors and plain "
            "data, which foundex does not load"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError):
        raise SyncFormatError(f"{source}: not a PyTorch archive, or a damaged one") from None
    if not isinstance(p, dict) or p.get("format") != FORMAT:
        raise SyncFormatError(f"{source}: not a {FORMAT} file")
    if p.get("kind") not in ("delta", "snapshot") or (kind and p["kind"] != kind):
        raise SyncFormatError(f"{source}: holds a {p.get('kind')!r}, expected a {kind or 'sync'}")
    for key in ("seq", "step"):
        if not isinstance(p.get(key), int) or p[key] < 0:
            raise SyncFormatError(f"{source}: {key!r} must be an int >= 0, got {p.get(key)!r}")
    return p


def _tensor_dict(value: object, source: str, what: str) -> dict[str, Tensor]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()
    ):
        raise SyncFormatError(f"{source}: {what!r} is not a dict of named tensors")
    return value


def _digest_field(p: dict[str, Any], key: str, source: str) -> str:
    value = p.get(key)
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise SyncFormatError(f"{source}: {key!r} is not a sha256 hex digest")
    return value


# ---- planning a delta ---------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Changed components, flat: score and cost of each, which tensor, which row (-1: whole)."""

    score: list[np.ndarray] = field(default_factory=list)
    cost: list[np.ndarray] = field(default_factory=list)
    table: list[np.ndarray] = field(default_factory=list)
    row: list[np.ndarray] = field(default_factory=list)

    def add(self, score: np.ndarray, cost: np.ndarray | int, table: int, row: np.ndarray) -> None:
        n = len(row)
        self.score.append(np.asarray(score, dtype=np.float64))
        self.cost.append(np.broadcast_to(np.asarray(cost, dtype=np.int64), (n,)))
        self.table.append(np.full(n, table, dtype=np.int64))
        self.row.append(np.asarray(row, dtype=np.int64))

    def flat(self) -> tuple[np.ndarray, ...]:
        if not self.score:
            return tuple(np.zeros(0, dtype=t) for t in (np.float64, np.int64, np.int64, np.int64))
        return tuple(np.concatenate(x) for x in (self.score, self.cost, self.table, self.row))


def _check_pair(base: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> None:
    missing = sorted(set(base) - set(current))
    if missing:
        raise ValueError(f"the current state lacks {len(missing)} synced tensors: {missing[:5]}")
    for k, b in base.items():
        c = current[k]
        if c.shape != b.shape or c.dtype != b.dtype:
            raise ValueError(
                f"{k}: the current state has {c.dtype} {list(c.shape)}, the synced state "
                f"{b.dtype} {list(b.shape)} (a new architecture is a new FM version, not a sync)"
            )


def _squared(diff: Tensor) -> Tensor:
    """Sum of squares over all but the first dim, in float64 (tiny updates must not round to 0)."""
    return diff.double().square().reshape(diff.shape[0], -1).sum(dim=1)


def _find_candidates(
    base: Mapping[str, Tensor], current: Mapping[str, Tensor], names: list[str], row_wise: set[str]
) -> _Candidates:
    cands = _Candidates()
    for i, name in enumerate(names):
        b, c = base[name], current[name].detach().to("cpu")
        changed_el = c != b
        if c.dtype.is_floating_point and not torch.isfinite(c[changed_el]).all():
            raise ValueError(f"{name}: the current state has non-finite values: never shipped")
        size = b.numel() * b.element_size()
        if name in row_wise:
            rows = changed_el.reshape(b.shape[0], -1).any(dim=1).nonzero()[:, 0]
            row_cost = size // max(b.shape[0], 1) + INDEX_BYTES
            if len(rows) and len(rows) * row_cost < size:
                score = _squared(c[rows] - b[rows]).numpy() / row_cost
                cands.add(score, row_cost, i, rows.numpy())
                continue
            if not len(rows):
                continue
            # so many rows changed that the whole table is cheaper: one component
        elif not changed_el.any():
            continue
        if c.dtype.is_floating_point:
            score = float((c.double() - b.double()).square().sum()) / max(size, 1)
        else:  # integer buffers that changed: exact values matter, they are tiny: first
            score = float("inf")
        cands.add(np.array([score]), size, i, np.array([-1]))
    return cands


def _greedy(score: np.ndarray, cost: np.ndarray, tie: np.ndarray, budget: int) -> np.ndarray:
    """Positions taken by the walk in decreasing score (ties in `tie` order): each taken if it
    fits the budget left, else skipped. Vectorised per run of fitting components: a skip
    removes every component that can no longer fit, so the loop turns about once per distinct
    cost, not once per component."""
    order = np.lexsort((tie, -score))
    taken = []
    left = int(budget)
    order = order[cost[order] <= left]
    while len(order):
        cum = np.cumsum(cost[order])
        k = int(np.searchsorted(cum, left, side="right"))  # the longest prefix that fits
        taken.append(order[:k])
        left -= int(cum[k - 1]) if k else 0
        rest = order[k + 1 :]  # order[k] did not fit: skipped
        order = rest[cost[rest] <= left]
    return np.concatenate(taken) if taken else np.zeros(0, dtype=np.int64)


def plan_delta(
    base_state: Mapping[str, Tensor],
    current_state: Mapping[str, Tensor],
    *,
    fraction: float = 0.3,
    row_wise: Collection[str] | None = None,
    seq: int = 1,
    step: int = 0,
    base_digest: str | None = None,
) -> Delta:
    """The most-updated components of `current_state` since `base_state`, at most `fraction` of
    the base's bytes (module docstring: the ranking rule). See `plan_and_apply` for the state
    it yields; `Delta.digest` is that state's digest.

    base_state: the synced state (what serving holds). current_state: the trainer's weights;
    it must hold every base tensor with the same shape and dtype (extra entries, e.g. task
    heads, are ignored). row_wise: embedding tables shipped row by row (None: `auto_row_wise`).
    base_digest: `state_digest(base_state)` if the caller knows it (saves a pass over it).
    Raises ValueError for a fraction outside (0, 1], a missing or reshaped tensor, a row-wise
    name that is not a >= 2-D base tensor, or non-finite values in a changed component.
    """
    return plan_and_apply(
        base_state,
        current_state,
        fraction=fraction,
        row_wise=row_wise,
        seq=seq,
        step=step,
        base_digest=base_digest,
    )[0]


def plan_and_apply(
    base_state: Mapping[str, Tensor],
    current_state: Mapping[str, Tensor],
    *,
    fraction: float = 0.3,
    row_wise: Collection[str] | None = None,
    seq: int = 1,
    step: int = 0,
    base_digest: str | None = None,
) -> tuple[Delta, dict[str, Tensor]]:
    """`plan_delta`, and the state it yields (base + delta): the next synced state. One pass
    builds both, so a trainer never applies its own delta a second time."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    _check_pair(base_state, current_state)
    rw = set(auto_row_wise(base_state) if row_wise is None else row_wise)
    bad = sorted(k for k in rw if k not in base_state or base_state[k].dim() < 2)
    if bad:
        raise ValueError(f"row_wise names must be >= 2-D tensors of the state, got {bad}")
    names = sorted(base_state)
    score, cost, table, row = _find_candidates(base_state, current_state, names, rw).flat()
    budget = int(fraction * state_nbytes(base_state))  # exact at 1.0 (bytes < 2**53)
    tie = table * (int(row.max(initial=0)) + 2) + row + 1  # name order, then row order
    pick = _greedy(score, cost, tie, budget)

    tensors: dict[str, Tensor] = {}
    rows: dict[str, RowSlice] = {}
    new_state = dict(base_state)
    for i in np.unique(table[pick]).tolist():
        name = names[i]
        cur = current_state[name].detach().to("cpu")
        picked_rows = np.sort(row[pick][table[pick] == i])
        if picked_rows[0] < 0:  # the whole tensor
            tensors[name] = cur.clone()
            new_state[name] = tensors[name]
        else:
            index = torch.from_numpy(picked_rows)
            rows[name] = RowSlice(index, cur[index].clone())
            patched = base_state[name].clone()
            patched[index] = rows[name].values
            new_state[name] = patched
    delta = Delta(
        seq=seq,
        base_digest=base_digest or state_digest(base_state),
        digest=state_digest(new_state),
        tensors=tensors,
        rows=rows,
        step=step,
    )
    return delta, new_state


# ---- applying -----------------------------------------------------------------------------------


def apply_delta(
    state: Mapping[str, Tensor],
    delta: Delta,
    *,
    known_digest: str | None = None,
    verify: bool = True,
) -> dict[str, Tensor]:
    """base + delta -> a new state; `state` is not modified (untouched tensors are shared).

    known_digest: `state_digest(state)` if the caller tracks it (serving does), else computed.
    verify: check the result's digest against `delta.digest` (one sha256 pass over the state).
    Raises DeltaMismatch when `state` is not the delta's base or the result is not the state
    the delta promises, SyncFormatError when the delta's tensors do not fit the state."""
    have = known_digest or state_digest(state)
    if have != delta.base_digest:
        raise DeltaMismatch(
            f"delta {delta.seq} applies to state {delta.base_digest}, this state is {have}"
        )
    new = dict(state)
    for name, t in delta.tensors.items():
        _fit(state, name, t.shape, t.dtype, delta.seq)
        new[name] = t.clone()  # the delta may be applied again elsewhere: no shared storage
    for name, r in delta.rows.items():
        n_rows = state[name].shape[0] if name in state and state[name].dim() else 0
        base = _fit(state, name, (n_rows, *r.values.shape[1:]), r.values.dtype, delta.seq)
        if r.index.numel() and (int(r.index.min()) < 0 or int(r.index.max()) >= n_rows):
            raise SyncFormatError(f"delta {delta.seq}: rows of {name} outside [0, {n_rows})")
        patched = base.clone()
        patched[r.index] = r.values
        new[name] = patched
    if verify:
        got = state_digest(new)
        if got != delta.digest:
            raise DeltaMismatch(
                f"applying delta {delta.seq} gave state {got}, the delta promises {delta.digest}"
            )
    return new


def _fit(
    state: Mapping[str, Tensor], name: str, shape: Sequence[int], dtype: torch.dtype, seq: int
) -> Tensor:
    t = state.get(name)
    if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        have = "nothing" if t is None else f"{t.dtype} {list(t.shape)}"
        raise SyncFormatError(
            f"delta {seq}: {name} is {dtype} {list(shape)} in the delta, {have} in the state"
        )
    return t


@dataclass
class SyncedState:
    """A state as serving holds it: the weights, the sync sequence they stand at, their digest."""

    state: dict[str, Tensor]
    seq: int
    digest: str
    step: int = 0


def apply_updates(current: SyncedState, updates: Sequence[Update]) -> SyncedState:
    """Apply snapshots and deltas in order -> the new SyncedState (`current` is not modified).
    A snapshot replaces the state; a delta must apply to the state before it (DeltaMismatch).
    Each result is verified against its digest."""
    state, seq, digest, step = current.state, current.seq, current.digest, current.step
    for u in updates:
        if isinstance(u, Snapshot):
            state = dict(u.state)
        else:
            state = apply_delta(state, u, known_digest=digest)
        seq, digest, step = u.seq, u.digest, u.step
    return SyncedState(dict(state), seq, digest, step)


# ---- the trainer's side -------------------------------------------------------------------------


class SyncTracker:
    """What the trainer knows about serving: the synced state, and when to sync next.

    `maybe_sync(model.state_dict(), step)` every step: every `every_steps` steps it returns the
    next update (seq + 1): a full snapshot of the trainer's (synced part of its) weights when
    the new seq is a multiple of `snapshot_every`, else a delta of the most-updated
    `fraction`. The synced state then becomes base + delta (or the snapshot). The caller
    publishes the update; if publishing fails it publishes the same update again before the
    next sync (publishing is idempotent), since the tracker has already moved on to it.

    The keys of the initial synced state are the keys synced: start it from `tae_state(...)`
    of the weights serving loaded (the published version's), so that heads never ship.
    """

    def __init__(
        self,
        synced_state: Mapping[str, Tensor],
        *,
        every_steps: int = 100,
        snapshot_every: int = 10,
        fraction: float = 0.3,
        row_wise: Collection[str] | None = None,
        seq: int = 0,
        step: int = 0,
    ) -> None:
        """synced_state: what serving holds at `seq` (0: the published weights; after a
        restart, what `SyncReader.load_state` rebuilds). step: the trainer step it stands at."""
        if every_steps < 1 or snapshot_every < 1:
            raise ValueError(
                f"every_steps and snapshot_every must be >= 1, got {every_steps} "
                f"and {snapshot_every}"
            )
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.every_steps, self.snapshot_every, self.fraction = every_steps, snapshot_every, fraction
        state = {k: v.detach().to("cpu").clone() for k, v in synced_state.items()}
        self.row_wise = sorted(auto_row_wise(state) if row_wise is None else row_wise)
        self.synced = SyncedState(state, seq, state_digest(state), step)

    @classmethod
    def for_model(cls, model: nn.Module, **kw: Any) -> SyncTracker:
        """A tracker whose synced state is the model's TAE path now (`tae_state`), its
        `nn.Embedding` tables row-wise."""
        state = tae_state(model.state_dict())
        kw.setdefault("row_wise", [k for k in embedding_tables(model) if k in state])
        return cls(state, **kw)

    @property
    def seq(self) -> int:
        return self.synced.seq

    def base_snapshot(self) -> Snapshot:
        """The synced state as it stands, as a snapshot (seq unchanged): what a trainer
        publishes first, so that serving always has a snapshot to recover from."""
        s = self.synced
        return Snapshot(seq=s.seq, digest=s.digest, state=dict(s.state), step=s.step)

    def maybe_sync(self, model_state: Mapping[str, Tensor], step: int) -> Update | None:
        """The next update if `every_steps` steps have passed since the last sync, else None."""
        if step - self.synced.step < self.every_steps:
            return None
        return self.sync(model_state, step)

    def sync(self, model_state: Mapping[str, Tensor], step: int) -> Update:
        """The next update now (snapshot or delta by the cadence), whatever the step."""
        if (self.synced.seq + 1) % self.snapshot_every == 0:
            return self.snapshot(model_state, step)
        base = self.synced
        delta, new_state = plan_and_apply(
            base.state,
            model_state,
            fraction=self.fraction,
            row_wise=self.row_wise,
            seq=base.seq + 1,
            step=step,
            base_digest=base.digest,
        )
        self.synced = SyncedState(new_state, delta.seq, delta.digest, step)
        return delta

    def snapshot(self, model_state: Mapping[str, Tensor], step: int) -> Snapshot:
        """A full snapshot of the trainer's weights now (seq + 1): serving catches up with every
        component, those too big for any delta included."""
        _check_pair(self.synced.state, model_state)
        state = {k: model_state[k].detach().to("cpu").clone() for k in self.synced.state}
        for k, t in state.items():
            if t.dtype.is_floating_point and not torch.isfinite(t).all():
                raise ValueError(f"{k}: the current state has non-finite values: never shipped")
        snap = Snapshot(seq=self.synced.seq + 1, digest=state_digest(state), state=state, step=step)
        self.synced = SyncedState(dict(state), snap.seq, snap.digest, step)
        return snap
