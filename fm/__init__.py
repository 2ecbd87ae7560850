"""fm: the foundation model. HSTU over lifelong cross-surface histories -> target-aware embeddings.

Pure modelling code (torch/numpy/pandas only): nothing here knows about the feature store.

The package loads its modules on first use (PEP 562): `import fm.timefeatures` (the time
conversions, numpy/pandas only) must not import torch, since reading expert configs and
event specs goes through it. `from fm import TAEEngine` works as before. The attention
dispatcher (`fm.ops`) registers its default backends when it is first imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module defining it
_EXPORTS = {
    "FMConfig": "fm.config",
    "FoundationModel": "fm.model",
    "UserHistories": "fm.history",
    "TAEEngine": "fm.inference",
    "HistoryCache": "fm.inference",
    "TrainResult": "fm.train",
    "train_streaming": "fm.train",
    "evaluate_fm": "fm.train",
    "save_checkpoint": "fm.checkpoint",
    "load_checkpoint": "fm.checkpoint",
    "checkpoint_digest": "fm.checkpoint",
    "normalized_entropy": "fm.metrics",
    "hour_of_day": "fm.timefeatures",
    "register_default_backends": "fm.ops",
}

__all__ = [
    "FMConfig",
    "FoundationModel",
    "UserHistories",
    "TAEEngine",
    "HistoryCache",
    "TrainResult",
    "train_streaming",
    "evaluate_fm",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_digest",
    "normalized_entropy",
    "hour_of_day",
    "register_default_backends",
]

if TYPE_CHECKING:
    from fm.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint
    from fm.config import FMConfig
    from fm.history import UserHistories
    from fm.inference import HistoryCache, TAEEngine
    from fm.metrics import normalized_entropy
    from fm.model import FoundationModel
    from fm.ops import register_default_backends
    from fm.timefeatures import hour_of_day
    from fm.train import TrainResult, evaluate_fm, train_streaming


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
