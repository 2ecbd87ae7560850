"""The expert network: a small per-surface model that consumes the FM's target-aware embedding.

    TAE ──► FMEmbedding ──────────────┐
                                      ├─► FMFusion ─┐
    recent items+actions ─► ShortTermInterest ──────┘  │
                                                       ├─► ExpertFusion ─► one head per task
    candidate item, category, quality ─► ItemEncoder ──┘

The no-FM baseline (tae_dim None) has no FMEmbedding/FMFusion: the short-term vector goes to
the expert fusion directly. Every row is scored on its own (no cross-row ops), so a score never
depends on which other candidates share the batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from experts.config import ExpertConfig


class MLP(nn.Sequential):
    """Linear -> SiLU -> Dropout -> Linear: the fusion modules' building block."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
        self.in_dim, self.hidden, self.out_dim = in_dim, hidden, out_dim

    def macs(self) -> int:
        return self.in_dim * self.hidden + self.hidden * self.out_dim


class FMEmbedding(nn.Module):
    """Normalise, denoise and project the TAE; a learned vector stands in where it is missing.

    LayerNorm makes experts robust to the scale of whichever FM version they pin; dropout and
    Gaussian noise (training only) keep the expert from over-trusting single TAE coordinates.
    """

    def __init__(self, tae_dim: int, out_dim: int, dropout: float, noise_std: float) -> None:
        super().__init__()
        self.tae_dim, self.out_dim, self.noise_std = tae_dim, out_dim, noise_std
        self.norm = nn.LayerNorm(tae_dim)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(tae_dim, out_dim)
        self.missing = nn.Parameter(torch.zeros(out_dim))

    def forward(self, tae: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        if tae is None:  # no embeddings at all: every row is missing
            return self.missing.expand(mask.shape[0], -1)
        x = self.norm(torch.nan_to_num(tae))
        if self.training and self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        x = self.proj(self.dropout(x))
        # where(), not a blend: a missing row's placeholder values can never leak in.
        return torch.where(mask[:, None] > 0.5, x, self.missing.expand_as(x))

    def macs(self) -> int:
        return self.tae_dim * self.out_dim


class ShortTermHSTULayer(nn.Module):
    """The short-term interest's one tiny HSTU-style layer (pointwise SiLU attention, gated by
    U), causal over the user's recent events.

    Not the FM's `fm.layers.HSTULayer`, a different computation: one head, a learned bias by
    relative position, no input LayerNorm, dropout after the output projection, and plain
    causal self-attention over a fixed-length sequence (no target-aware attention, no K/V
    cache). Attention is divided by the fixed sequence length, not by the number of valid
    positions, as in the FM: padding never changes a row's output.
    """

    def __init__(self, dim: int, seq_len: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.seq_len = dim, seq_len
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.rel_bias = nn.Parameter(torch.zeros(2 * seq_len - 1))  # by relative position
        self.out_norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        pos = torch.arange(seq_len)
        self.register_buffer("rel_index", pos[:, None] - pos[None, :] + seq_len - 1, False)
        self.register_buffer("causal", pos[None, :] <= pos[:, None], False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        u, v, q, k = F.silu(self.uvqk(x)).chunk(4, dim=-1)
        scores = q @ k.transpose(1, 2) / self.dim**0.5 + self.rel_bias[self.rel_index]
        allowed = self.causal[None] & valid[:, None, :]
        attn = torch.where(allowed, F.silu(scores), 0.0) / self.seq_len
        y = self.out(self.out_norm(attn @ v) * u)
        return x + self.dropout(y)

    def macs(self) -> int:
        n, d = self.seq_len, self.dim
        return n * d * 4 * d + 2 * n * n * d + n * d * d


class ShortTermInterest(nn.Module):
    """The user's recent events (item + action + position) through one HSTU layer.

    Histories are right-aligned, so the last position has seen every event (causally); its
    output is the short-term interest vector. Rows with no history at all get a learned vector.
    """

    def __init__(
        self, items: nn.Embedding, n_actions: int, dim: int, seq_len: int, dropout: float
    ) -> None:
        super().__init__()
        self.items = items  # shared with the candidate encoder: one item space
        self.actions = nn.Embedding(n_actions + 1, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(seq_len, dim))
        # The attribute name is part of saved experts' state_dict keys (short_term.layer.*).
        self.layer = ShortTermHSTULayer(dim, seq_len, dropout)
        self.norm = nn.LayerNorm(dim)
        self.empty = nn.Parameter(torch.zeros(dim))

    def forward(self, recent_items: torch.Tensor, recent_actions: torch.Tensor) -> torch.Tensor:
        valid = recent_items > 0
        x = self.items(recent_items) + self.actions(recent_actions) + self.positions
        x = x * valid[..., None]  # padding tokens carry nothing
        last = self.norm(self.layer(x, valid)[:, -1])
        return torch.where(valid.any(dim=1, keepdim=True), last, self.empty.expand_as(last))

    def macs(self) -> int:
        return self.layer.macs()


class ItemEncoder(nn.Module):
    """The candidate: its id embedding plus the item features the config asks for."""

    def __init__(
        self, items: nn.Embedding, n_categories: int, dim: int, features: list[str]
    ) -> None:
        super().__init__()
        self.items = items
        self.use_category = "category" in features
        self.use_quality = "quality" in features
        # One extra row for unknown categories (an item without features at serving time).
        self.categories = nn.Embedding(n_categories + 1, dim) if self.use_category else None
        self.quality_proj = nn.Linear(1, dim) if self.use_quality else None
        self.dim = dim
        self.out_dim = dim * (1 + self.use_category + self.use_quality)

    def forward(
        self, item_idx: torch.Tensor, category_idx: torch.Tensor, quality: torch.Tensor
    ) -> torch.Tensor:
        parts = [self.items(item_idx)]
        if self.categories is not None:
            parts.append(self.categories(category_idx))
        if self.quality_proj is not None:
            parts.append(self.quality_proj(torch.nan_to_num(quality)[:, None]))
        return torch.cat(parts, dim=-1)

    def macs(self) -> int:
        return self.dim if self.use_quality else 0  # the 1 -> dim quality projection


class ExpertModel(nn.Module):
    """One expert: FM embedding + short-term interest, fused, crossed with the candidate."""

    def __init__(
        self,
        cfg: ExpertConfig,
        tae_dim: int | None,
        n_items: int,
        n_categories: int,
        n_actions: int,
    ) -> None:
        super().__init__()
        if (tae_dim is None) != (cfg.fm_version is None):
            raise ValueError(
                f"expert {cfg.name!r}: tae_dim {tae_dim} does not fit fm_version {cfg.fm_version}"
            )
        self.cfg = cfg
        self.tae_dim, self.n_items = tae_dim, n_items
        self.n_categories, self.n_actions = n_categories, n_actions
        d = cfg.hidden_dim
        self.item_embedding = nn.Embedding(n_items + 1, d, padding_idx=0)  # 0 = pad/unknown
        self.short_term = ShortTermInterest(
            self.item_embedding, n_actions, d, cfg.history_length, cfg.dropout
        )
        self.fm_embedding: FMEmbedding | None = None
        self.fm_fusion: MLP | None = None
        if tae_dim is not None:
            self.fm_embedding = FMEmbedding(tae_dim, d, cfg.dropout, cfg.embedding_noise)
            self.fm_fusion = MLP(2 * d, d, d, cfg.dropout)
        self.item_encoder = ItemEncoder(self.item_embedding, n_categories, d, cfg.item_features)
        # Input: user vector, candidate vector and the projected user*item interaction, which
        # a small MLP otherwise learns slowly.
        self.item_proj = nn.Linear(self.item_encoder.out_dim, d)
        self.expert_fusion = MLP(d + self.item_encoder.out_dim + d, d, d, cfg.dropout)
        # A list in cfg.tasks order (not a dict): task names may clash with ModuleDict methods.
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in cfg.tasks)

    @property
    def tasks(self) -> list[str]:
        return list(self.cfg.tasks)

    def _indices(
        self, recent_items: torch.Tensor, item_id: torch.Tensor, category: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map ids the tables do not know (new items, missing features) to their fallback rows."""
        recent = torch.where((recent_items >= 0) & (recent_items <= self.n_items), recent_items, 0)
        item = torch.where((item_id >= 0) & (item_id < self.n_items), item_id + 1, 0)
        cat = torch.where((category >= 0) & (category < self.n_categories), category, -1)
        return recent, item, torch.where(cat < 0, self.n_categories, cat)

    def forward(
        self,
        tae: torch.Tensor | None,
        tae_mask: torch.Tensor,
        recent_items: torch.Tensor,
        recent_actions: torch.Tensor,
        item_id: torch.Tensor,
        category: torch.Tensor,
        quality: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [B, T], in the order of cfg.tasks."""
        recent, item_idx, cat_idx = self._indices(recent_items, item_id, category)
        actions = torch.where(
            (recent_actions >= 0) & (recent_actions <= self.n_actions), recent_actions, 0
        )
        user = self.short_term(recent, actions)
        if self.fm_embedding is not None and self.fm_fusion is not None:
            fm = self.fm_embedding(tae, tae_mask)
            user = self.fm_fusion(torch.cat([fm, user], dim=-1))
        candidate = self.item_encoder(item_idx, cat_idx, quality)
        cross = user * self.item_proj(candidate)
        h = F.silu(self.expert_fusion(torch.cat([user, candidate, cross], dim=-1)))
        return torch.cat([head(h) for head in self.heads], dim=-1)

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_candidate(self) -> int:
        """Analytic multiply-adds to score one candidate (embedding lookups and norms ignored).

        The short-term part is per (user, request) and could be shared by all of a request's
        candidates; it is counted in full here, the worst case.
        """
        d = self.cfg.hidden_dim
        macs = self.short_term.macs() + self.item_encoder.macs()
        if self.fm_embedding is not None and self.fm_fusion is not None:
            macs += self.fm_embedding.macs() + self.fm_fusion.macs()
        macs += self.item_encoder.out_dim * d + d  # item_proj and the cross product
        macs += self.expert_fusion.macs() + len(self.heads) * d
        return int(macs)
