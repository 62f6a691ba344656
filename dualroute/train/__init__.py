"""Training: run configs and presets, tasks, the trainer, and its generic utilities (config I/O,
checkpoints, schedules, metrics logs)."""

from dualroute.train.presets import PRESETS, DataConfig, RunConfig, TrainConfig, get_preset
from dualroute.train import tasks  # noqa: F401,I001  (registers the built-in tasks, models and presets)
from dualroute.train.trainer import Summary, Trainer, format_summary, train

__all__ = ["DataConfig", "PRESETS", "RunConfig", "Summary", "TrainConfig", "Trainer", "format_summary",
           "get_preset", "train"]
