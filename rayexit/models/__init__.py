"""Multi-exit encoders and their model directories."""

from rayexit.models.encoder import ExitConfig, MultiExitEncoder, load_tokenizer, read_exit_config
from rayexit.models.sequence import MultiExitForSequenceClassification, load_pretrained_backbone


def load_model_dir(directory):
    """Any rayexit model directory, whatever its task."""
    if read_exit_config(directory).task == "token":
        from rayexit.models.token import MultiExitForTokenClassification

        return MultiExitForTokenClassification.from_pretrained(directory)
    return MultiExitForSequenceClassification.from_pretrained(directory)


__all__ = [
    "ExitConfig",
    "MultiExitEncoder",
    "MultiExitForSequenceClassification",
    "load_model_dir",
    "load_pretrained_backbone",
    "load_tokenizer",
    "read_exit_config",
]
