"""FoundationModel: HSTU over [history | targets] -> one target-aware embedding (TAE) per target.

    f(item, ctx)    = e_item + MLP([e_item, surface, hour, content_vector(item) if configured])
                      (e_item, content = 0 for an id outside [0, n_items): the shared OOV row;
                      hour = fm.timefeatures.hour_of_day(event time, config.time_zone))
    history token x_i = f(item_i, context_i) + action_i + recency_rank_i + time_gap_i
    target token  y_j = f(item_j, context_j) + gap(request time - last history event)
    TAE_j         = LN(HSTU(x_0..x_{N-1}, y_0..y_{M-1})[N + j])

Item and action are summed, not interleaved (half the sequence length). Targets see the whole
history and themselves only, so TAE_j is a function of (history, target j) and nothing else in
the request or the batch. Heads: a main multi-task head on the TAE, and per-surface alignment
modules over (TAE, auxiliary features) for surface-specific tasks. No autoregressive loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fm.batching import Batch
from fm.config import FMConfig
from fm.layers import HSTULayer


class ItemContext(nn.Module):
    """f(item, context): item-id embedding with surface, hour and (optionally) the item's
    content vector, through a small MLP.

    Vocabulary: ids in [0, n_items) are items, 0 included (padding is masked by length, never
    by id). Any other id (negative, or >= n_items: an item newer than the model) is out of
    vocabulary (OOV) and shares one fixed all-zero id embedding and content vector, so its
    token still carries surface, hour, and in a history the action, recency and time gap.
    The OOV row is not a parameter and not in the state dict, so the weights, optimizer
    state and initialisation (RNG stream) are those of a model without it, and every
    checkpoint and serving artifact written before it existed loads unchanged. A learned row
    would stay at its initial value anyway: a vocabulary sized from the training log never
    shows the model an OOV id in training.
    """

    def __init__(self, config: FMConfig, item_content: Tensor | None = None) -> None:
        super().__init__()
        d, c = config.d_model, config.content_dim
        self.n_items = config.n_items
        self.item = nn.Embedding(config.n_items, config.item_width)
        self.surface = nn.Embedding(len(config.surfaces), d)
        self.hour = nn.Embedding(config.n_hours, d)
        self.mlp = nn.Sequential(nn.Linear(3 * d + c, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        if item_content is not None and not c:
            raise ValueError("item_content given but config.content_dim is 0")
        # a buffer, not a parameter: given data, saved with the weights, never trained
        self.register_buffer("content", torch.zeros(config.n_items, c) if c else None)
        if c and item_content is not None:
            self.content.copy_(item_content)
        # A narrower id table is lifted to d by one matrix, so a wider model grows its sequence
        # layers, not the table (created last: item_dim = 0 keeps the old parameters and RNG).
        narrow = config.item_width != d
        self.item_up = nn.Linear(config.item_width, d, bias=False) if narrow else None

    def known(self, item: Tensor) -> Tensor:
        """[...] bool: True for ids inside the vocabulary [0, n_items)."""
        return (item >= 0) & (item < self.n_items)

    def forward(self, item: Tensor, surface: Tensor, hour: Tensor) -> Tensor:
        """item (any int64 id; OOV ids read the zero row), surface, hour: [...] long
        -> [..., d]."""
        known = self.known(item)[..., None]
        idx = torch.where(known[..., 0], item, torch.zeros_like(item))
        zero = torch.zeros((), dtype=self.item.weight.dtype, device=item.device)
        e = self.item(idx)  # [..., item_width]
        e = torch.where(known, e if self.item_up is None else self.item_up(e), zero)  # [..., d]
        parts = [e, self.surface(surface), self.hour(hour)]
        if self.content is not None:
            parts.append(torch.where(known, self.content[idx], zero))
        return e + self.mlp(torch.cat(parts, dim=-1))


class AlignmentModule(nn.Module):
    """One surface's head: TAE interacting with auxiliary features -> that surface's tasks."""

    def __init__(self, d_model: int, n_aux_features: int, n_tasks: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(d_model + n_aux_features, d_model), nn.SiLU(), nn.Linear(d_model, n_tasks)
        )

    def forward(self, tae: Tensor, aux: Tensor) -> Tensor:
        """tae: [n, d]; aux: [n, f] -> logits [n, n_tasks]."""
        return self.mlp(torch.cat([tae, aux], dim=-1))


@dataclass
class HistoryState:
    """Per-layer K/V of an encoded history: all a target needs to attend to it."""

    kv: list[tuple[Tensor, Tensor]]  # per layer: k, v [B, H, N, dh]
    hist_len: Tensor  # [B]


def as_content_matrix(item_content: object, config: FMConfig) -> Tensor | None:
    """A float32 [n_items, content_dim] tensor from an array-like, checked against config."""
    if item_content is None:
        return None
    if not config.content_dim:
        raise ValueError("item_content given but config.content_dim is 0")
    t = torch.as_tensor(item_content, dtype=torch.float32)
    want = (config.n_items, config.content_dim)
    if t.shape != want:
        raise ValueError(f"item_content must be {list(want)}, got {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("item_content has non-finite values")
    return t


class FoundationModel(nn.Module):
    def __init__(
        self, config: FMConfig, item_content: object = None, *, with_heads: bool = True
    ) -> None:
        """item_content: optional float [n_items, config.content_dim] (array or tensor).
        with_heads=False builds the TAE path only (what a serving artifact holds)."""
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = ItemContext(config, as_content_matrix(item_content, config))
        self.action = nn.Embedding(config.n_actions, d)
        self.rank = nn.Embedding(config.max_history, d)
        self.hist_gap = nn.Embedding(config.n_time_buckets, d)
        self.tgt_gap = nn.Embedding(config.n_time_buckets, d)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            HSTULayer(d, config.n_heads, config.attn_norm_len, config.dropout)
            for _ in range(config.n_layers)
        )
        self.norm_out = nn.LayerNorm(d)
        # heads: used for training only, left out of the serving artifact
        self.main_head = nn.Linear(d, len(config.main_tasks)) if with_heads else None
        self.aux_heads = nn.ModuleDict(
            {s: AlignmentModule(d, d, len(ts)) for s, ts in config.aux_tasks.items() if ts}
            if with_heads
            else {}
        )
        self.apply(self._init_weights)
        # Item rows start at zero, the OOV row's value: an item the FM never trains on (one that
        # first appears after its training window) then reads as unknown instead of as random
        # noise. Those rows get no gradient, so AdamW leaves them at zero. On ml-latest-small 35%
        # of the evaluation window's ratings are of movies the FM window never shows.
        nn.init.zeros_(self.embed.item.weight)
        if self.embed.item_up is not None:  # keep the lifted item vector at the table's scale
            nn.init.normal_(self.embed.item_up.weight, std=config.item_width ** -0.5)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.1)

    @property
    def dim(self) -> int:
        return self.config.d_model

    # ---- tokens ----------------------------------------------------------------------------

    def history_tokens(self, b: Batch) -> Tensor:  # -> [B, N, d]
        x = self.embed(b.hist_item, b.hist_surface, b.hist_hour)
        return x + self.action(b.hist_action) + self.rank(b.hist_rank) + self.hist_gap(b.hist_gap)

    def target_features(self, b: Batch) -> Tensor:  # -> [B, M, d], no action: it is the label
        return self.embed(b.tgt_item, b.tgt_surface, b.tgt_hour)

    def target_tokens(self, b: Batch) -> Tensor:  # -> [B, M, d]
        return self.target_features(b) + self.tgt_gap(b.tgt_gap)[:, None, :]

    # ---- encoder ---------------------------------------------------------------------------

    def forward(self, b: Batch) -> Tensor:
        """Joint-sequence pass. -> TAE [B, M, d]."""
        n = b.n_hist
        x = self.drop(torch.cat([self.history_tokens(b), self.target_tokens(b)], dim=1))
        for layer in self.layers:
            x, _ = layer(x, b.hist_len, n)
        return self.norm_out(x[:, n:])

    def encode_history(self, b: Batch) -> HistoryState:
        """History alone (it never sees targets), keeping each layer's K/V."""
        x = self.drop(self.history_tokens(b))
        kv = []
        for layer in self.layers:
            x, kv_l = layer(x, b.hist_len, b.n_hist)
            kv.append(kv_l)
        return HistoryState(kv=kv, hist_len=b.hist_len)

    def encode_targets(self, b: Batch, state: HistoryState) -> Tensor:
        """Targets against a cached history: same TAE as `forward`, O(M * N) per layer."""
        x = self.drop(self.target_tokens(b))
        for layer, kv_l in zip(self.layers, state.kv, strict=True):
            x = layer.forward_targets(x, kv_l, state.hist_len)
        return self.norm_out(x)

    # ---- heads and loss --------------------------------------------------------------------

    def task_outputs(self, b: Batch, tae: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """task -> (logits, labels) over that task's valid samples only (flat [n_t]).

        Valid = a real candidate, label not NaN, and for an aux task: on that task's surface.
        Invalid samples are never indexed, so they carry no gradient to the task.
        """
        assert b.labels is not None, "batch has no labels"
        cfg = self.config
        col = {t: i for i, t in enumerate(cfg.fm_tasks)}
        parts: dict[str, list[tuple[Tensor, Tensor]]] = {t: [] for t in cfg.fm_tasks}

        main = self.main_head(tae)  # [B, M, n_main]
        for i, t in enumerate(cfg.main_tasks):
            y = b.labels[..., col[t]]
            ok = b.tgt_mask & ~torch.isnan(y)
            parts[t].append((main[..., i][ok], y[ok]))

        if len(self.aux_heads):
            aux = self.target_features(b)  # [B, M, d] auxiliary features of each candidate
            for s, head in self.aux_heads.items():
                on_s = b.tgt_mask & (b.tgt_surface == cfg.surfaces.index(s))  # [B, M]
                logits = head(tae[on_s], aux[on_s])  # [n_s, n_tasks_s]
                for j, t in enumerate(cfg.aux_tasks[s]):
                    y = b.labels[..., col[t]][on_s]
                    ok = ~torch.isnan(y)
                    parts[t].append((logits[:, j][ok], y[ok]))

        return {
            t: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps]))
            for t, ps in parts.items()
        }

    def loss(self, b: Batch, tae: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum over tasks of BCE, each averaged over its own valid samples."""
        return self.loss_from_outputs(self.task_outputs(b, tae))

    def loss_from_outputs(
        self, outputs: dict[str, tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        losses: dict[str, Tensor] = {}
        for t, (logits, y) in outputs.items():
            if y.numel() == 0:  # no valid sample in this batch: a zero that keeps the graph
                losses[t] = logits.sum() * 0.0
            else:
                losses[t] = F.binary_cross_entropy_with_logits(logits, y)
        weighted = [self.config.task_weight(t) * v for t, v in losses.items()]
        total = torch.stack(weighted).sum() if weighted else torch.zeros(())
        return total, losses

    # ---- serving ---------------------------------------------------------------------------

    @staticmethod
    def is_head_param(name: str) -> bool:
        """Parameters the serving artifact drops: computing a TAE never needs them."""
        return name.startswith(("main_head.", "aux_heads."))
