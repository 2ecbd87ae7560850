"""Expert config files: one YAML file per expert, validated with pydantic.

A config names the surface the expert serves, its tasks, the item features it reads and the one
FM version it pins (`fm_version: null` is the no-FM baseline). The files are the truth: the Feast
repo builds one FeatureService per file, and training and serving read the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from store_bridge.events.schema import ITEM_FEATURES, DatasetSpec
from store_bridge.repo import VERSION_RE, Manifest
from store_bridge.versions import PinError, VersionRegistry

CONFIG_SUFFIXES = (".yaml", ".yml")


class ExpertConfigError(ValueError):
    """An expert config that cannot be used; the message names the file (or expert) and field."""


class ExpertConfig(BaseModel):
    """What one expert is: where it serves, what it predicts, which FM version it pins."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    surface: str = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    # Required on purpose: an expert must say whether it pins a version (None = no-FM baseline).
    fm_version: str | None = Field(pattern=VERSION_RE.pattern)
    history_length: int = Field(default=8, ge=1, le=256)
    item_features: list[str] = Field(default_factory=lambda: list(ITEM_FEATURES))
    hidden_dim: int = Field(default=64, ge=1, le=4096)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    embedding_noise: float = Field(default=0.0, ge=0.0)  # std of the TAE denoising noise
    epochs: int = Field(default=3, ge=1)  # at most this many with holdout_frac > 0
    # Early stopping: the latest holdout_frac of the training rows (by event time; cut between
    # timestamps) are held out, their loss is measured after each epoch, training stops at the
    # first epoch that does not improve on the best, and the best epoch's weights are kept.
    # 0 = train every epoch on all rows; so do frames that would hold out fewer than 100 rows or
    # only unlabelled ones (experts.train._split_holdout).
    holdout_frac: float = Field(default=0.0, ge=0.0, le=0.5)
    batch_size: int = Field(default=512, ge=1)
    lr: float = Field(default=2e-3, gt=0.0)
    seed: int = 0
    description: str = ""

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, tasks: list[str]) -> list[str]:
        if any(not t for t in tasks):
            raise ValueError("task names must be non-empty")
        dupes = sorted({t for t in tasks if tasks.count(t) > 1})
        if dupes:
            raise ValueError(f"tasks must be unique, repeated: {dupes}")
        return tasks

    @field_validator("item_features")
    @classmethod
    def _known_item_features(cls, features: list[str]) -> list[str]:
        unknown = [f for f in features if f not in ITEM_FEATURES]
        if unknown:
            raise ValueError(f"unknown item features {unknown}; known: {ITEM_FEATURES}")
        if len(set(features)) != len(features):
            raise ValueError("item features must be unique")
        return features


def _describe(err: ValidationError, source: str) -> str:
    """One line per problem, each `source: field: reason`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{source}: {loc}: {e['msg']}")
    return "; ".join(lines)


def parse_expert_config(data: Any, source: str = "<config>") -> ExpertConfig:
    """Validate a mapping already read from somewhere; errors name `source` and the field."""
    if not isinstance(data, dict):
        raise ExpertConfigError(
            f"{source}: (config): expected a mapping, got {type(data).__name__}"
        )
    try:
        return ExpertConfig.model_validate(data)
    except ValidationError as err:
        raise ExpertConfigError(_describe(err, source)) from None


def load_expert_config(path: Path) -> ExpertConfig:
    """Read and validate one expert config file; its stem must equal the expert's name."""
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ExpertConfigError(f"{source}: (file): cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ExpertConfigError(f"{source}: (file): invalid YAML: {err}") from None
    cfg = parse_expert_config(data, source)
    if cfg.name != path.stem:
        raise ExpertConfigError(
            f"{source}: name: {cfg.name!r} must equal the file name stem {path.stem!r}"
        )
    return cfg


def load_expert_configs(directory: Path) -> list[ExpertConfig]:
    """Every expert config in `directory`, sorted by name; a missing directory has none."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    configs: dict[str, ExpertConfig] = {}
    for path in sorted(p for p in directory.iterdir() if p.suffix in CONFIG_SUFFIXES):
        cfg = load_expert_config(path)
        if cfg.name in configs:  # x.yaml beside x.yml
            raise ExpertConfigError(f"{path}: name: expert {cfg.name!r} is defined twice")
        configs[cfg.name] = cfg
    return [configs[n] for n in sorted(configs)]


def save_expert_config(cfg: ExpertConfig, directory: Path) -> Path:
    """Write `<directory>/<name>.yaml` (fields in declaration order) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cfg.name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def check_against_spec(
    cfg: ExpertConfig, spec: DatasetSpec, source: str | Path | None = None
) -> None:
    """Raise ExpertConfigError unless the surface exists and every task is valid on it."""
    where = str(source) if source is not None else f"expert {cfg.name!r}"
    if cfg.surface not in spec.surfaces:
        raise ExpertConfigError(
            f"{where}: surface: {cfg.surface!r} is not a surface of dataset {spec.name!r} "
            f"(known: {spec.surfaces})"
        )
    valid = spec.surface_tasks.get(cfg.surface, [])
    bad = [t for t in cfg.tasks if t not in valid]
    if bad:
        raise ExpertConfigError(
            f"{where}: tasks: {bad} not valid on surface {cfg.surface!r} (valid: {valid})"
        )


def check_against_manifest(
    cfg: ExpertConfig,
    manifest: Manifest,
    expected_dim: int | None = None,
    source: str | Path | None = None,
) -> None:
    """Raise ExpertConfigError unless the pinned FM version is published, active and, when a
    trained model expects one, of `expected_dim`. The no-FM baseline pins nothing."""
    if cfg.fm_version is None:
        return
    where = str(source) if source is not None else f"expert {cfg.name!r}"
    try:
        VersionRegistry(manifest=manifest).check_pin(cfg.fm_version, expected_dim)
    except PinError as e:
        raise ExpertConfigError(f"{where}: fm_version: {e}") from e
