"""Training: typed run configs, the accelerate loop, EMA and crash-safe checkpoints."""

from stepdistill.models.ema import GeneratorEMA, attach_ema, get_ema
from stepdistill.training.batches import build_batch
from stepdistill.training.checkpoint import (
    CheckpointError,
    TrainState,
    find_resume_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)
from stepdistill.training.config import (
    ConfigError,
    GeneratorConfig,
    OptimizerConfig,
    PromptsConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_recipe,
)
from stepdistill.training.prompts import PromptSource
from stepdistill.training.trainer import Trainer, TrainingDiverged

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GeneratorConfig",
    "GeneratorEMA",
    "OptimizerConfig",
    "PromptSource",
    "PromptsConfig",
    "RunConfig",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "attach_ema",
    "build_batch",
    "get_ema",
    "find_resume_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_recipe",
    "resolve_checkpoint",
]
