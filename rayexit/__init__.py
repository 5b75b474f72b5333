"""rayexit: train, tune and serve early-exit (multi-exit) BERT models on Ray."""

__version__ = "0.1.0"
