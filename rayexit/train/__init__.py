"""Training: the per-worker loop (and, for Ray Train, the trainer that runs it)."""

from rayexit.train.loop import TrainResult, train_model

__all__ = ["TrainResult", "train_model"]
