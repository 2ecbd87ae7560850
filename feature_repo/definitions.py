"""Feast definitions for foundex, built from the files under data/ (see store_bridge.feast_objects).

Every FM version in data/fm_versions.yaml becomes a feature view `fm_tae_<version>`, and every
expert config in data/experts/ a FeatureService of the same name, so `feast apply` always
registers exactly what those files say.
"""

from pathlib import Path

from experts.config import load_expert_configs
from store_bridge.feast_objects import build_definitions
from store_bridge.repo import FeatureRepo

_repo = FeatureRepo(Path(__file__).resolve().parent)
globals().update(build_definitions(_repo, load_expert_configs(_repo.experts_dir)))
