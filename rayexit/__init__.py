"""rayexit: train, tune and serve early-exit (multi-exit) BERT models on Ray.

    import rayexit
    model = rayexit.load("runs/atis")                 # a model directory written by rayexit
    model.predict(["show me flights to boston"])      # sentence models
    model.tag(["John lives in Berlin"])               # token models

Importing rayexit also registers its model type with transformers, so `AutoConfig` and
`AutoModel.from_pretrained(model_dir)` give the multi-exit model (see rayexit.models.hf).
"""

from rayexit.api import LoadedModel, load
from rayexit.policy import ExitPolicy

__version__ = "0.1.0"
__all__ = ["ExitPolicy", "LoadedModel", "load"]
