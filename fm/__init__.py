"""fm: the foundation model. HSTU over lifelong cross-surface histories -> target-aware embeddings.

Pure modelling code (torch/numpy/pandas only): nothing here knows about the feature store.
"""

from fm.checkpoint import checkpoint_digest, load_checkpoint, save_checkpoint
from fm.config import FMConfig
from fm.history import UserHistories
from fm.inference import HistoryCache, TAEEngine
from fm.metrics import normalized_entropy
from fm.model import FoundationModel
from fm.ops import register_default_backends
from fm.timefeatures import hour_of_day
from fm.train import TrainResult, evaluate_fm, train_streaming

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
]

register_default_backends()  # the Triton kernel on CUDA; the PyTorch reference elsewhere
