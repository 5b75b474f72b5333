"""Multi-exit encoders; their model directories are read and written by rayexit.model_dir."""

from rayexit.models import hf
from rayexit.models.encoder import ExitConfig, MultiExitEncoder, load_tokenizer
from rayexit.models.hf import MultiExitConfig
from rayexit.models.sequence import MultiExitForSequenceClassification, load_pretrained_backbone
from rayexit.models.token import MultiExitForTokenClassification

hf.register()  # AutoConfig / AutoModel* know rayexit-multi-exit from here on


def load_model_dir(directory):
    """Any rayexit model directory, whatever its task."""
    from rayexit.model_dir import ModelDir

    return ModelDir(directory).load_model()


def read_exit_config(directory) -> ExitConfig:
    from rayexit.model_dir import ModelDir

    return ModelDir(directory).exit_config()


__all__ = [
    "ExitConfig",
    "MultiExitConfig",
    "MultiExitEncoder",
    "MultiExitForSequenceClassification",
    "MultiExitForTokenClassification",
    "load_model_dir",
    "load_pretrained_backbone",
    "load_tokenizer",
    "read_exit_config",
]
