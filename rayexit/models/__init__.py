"""Multi-exit encoders; their model directories are read and written by rayexit.model_dir."""

from rayexit.models.encoder import ExitConfig, MultiExitEncoder, load_tokenizer
from rayexit.models.sequence import MultiExitForSequenceClassification, load_pretrained_backbone


def load_model_dir(directory):
    """Any rayexit model directory, whatever its task."""
    from rayexit.model_dir import ModelDir

    return ModelDir(directory).load_model()


def read_exit_config(directory) -> ExitConfig:
    from rayexit.model_dir import ModelDir

    return ModelDir(directory).exit_config()


__all__ = [
    "ExitConfig",
    "MultiExitEncoder",
    "MultiExitForSequenceClassification",
    "load_model_dir",
    "load_pretrained_backbone",
    "load_tokenizer",
    "read_exit_config",
]
