"""Experts: small per-surface models that each pin one FM version and consume its TAEs.

config   - one validated YAML file per expert (surface, tasks, features, pinned fm_version)
features - point-in-time recent history, the short-term input
dataset  - ExpertFrame (the training/scoring table) and its tensors
model    - FM embedding, short-term HSTU, FM fusion, expert fusion, task heads
train    - training, scoring, NE evaluation, save/load
metrics  - Normalized Entropy, the Transfer Ratio
baselines - the paper's expert variants (no-FM, +UE, +TAE, one-stage) on one ExpertModel
paper    - the paper's offline studies (package: plan, data, runs, stats, report, tables)

The config API is imported eagerly; the torch-backed parts load on first use, so reading expert
configs (the Feast repo's definitions, `foundex` listings) never pays for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from experts.config import (
    ExpertConfig,
    ExpertConfigError,
    check_against_manifest,
    check_against_spec,
    load_expert_config,
    load_expert_configs,
    parse_expert_config,
    save_expert_config,
)
from experts.features import recent_history

if TYPE_CHECKING:
    from experts.dataset import ExpertFrame, add_recent_history, to_tensors
    from experts.metrics import normalized_entropy, transfer_ratio
    from experts.model import ExpertModel
    from experts.train import evaluate, load_expert, predict, save_expert, train_expert

_LAZY = {
    "ExpertFrame": "experts.dataset",
    "add_recent_history": "experts.dataset",
    "to_tensors": "experts.dataset",
    "ExpertModel": "experts.model",
    "normalized_entropy": "experts.metrics",
    "transfer_ratio": "experts.metrics",
    "evaluate": "experts.train",
    "load_expert": "experts.train",
    "predict": "experts.train",
    "save_expert": "experts.train",
    "train_expert": "experts.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ExpertConfig",
    "ExpertConfigError",
    "ExpertFrame",
    "ExpertModel",
    "add_recent_history",
    "check_against_manifest",
    "check_against_spec",
    "evaluate",
    "load_expert",
    "load_expert_config",
    "load_expert_configs",
    "normalized_entropy",
    "transfer_ratio",
    "parse_expert_config",
    "predict",
    "recent_history",
    "save_expert",
    "save_expert_config",
    "to_tensors",
    "train_expert",
]
