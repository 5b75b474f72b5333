"""Shared fixtures: small random models for speed, one Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not beside the project")
    return SHARED_DATASETS.resolve()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session; Ray start-up alone takes seconds."""
    import ray

    if not ray.is_initialized():
        # address="local": a new instance even where `ray start` or RAY_ADDRESS points at a cluster
        # (joining one would refuse num_cpus, and tests must not run on someone's cluster)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_backbone(kind: str = "bert", layers: int = 4, hidden: int = 32, vocab: int = 30522, seed: int = 0):
    """A small random-initialised BERT or RoBERTa encoder (no weights loaded from anywhere)."""
    import torch
    from transformers import AutoModel, BertConfig, RobertaConfig

    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        vocab_size=vocab,
        max_position_embeddings=130,
    )
    config = RobertaConfig(**common, pad_token_id=1) if kind == "roberta" else BertConfig(**common)
    return AutoModel.from_config(config, attn_implementation="sdpa")


def tiny_sequence_model(
    kind: str = "bert", layers: int = 4, labels=("0", "1"), head: str = "pooler", pooling: str = "cls", seed: int = 0
):
    from rayexit.models import ExitConfig, MultiExitForSequenceClassification

    model = MultiExitForSequenceClassification(
        tiny_backbone(kind, layers, seed=seed),
        ExitConfig(task="sequence", labels=list(labels), head=head, pooling=pooling, dropout=0.0),
    )
    return model.eval()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from rayexit.models import load_tokenizer

    return load_tokenizer("minilm")


def fresh_batch_queues() -> None:
    """Drop the queues of every `@serve.batch` method of the deployment class.

    Each decorated method keeps one queue, bound to the event loop of its first call (a Serve
    replica has one loop). Tests that build replicas in-process run their own loops, and a queue
    left behind also makes the class unpicklable when a later test deploys it with Serve.
    """
    from rayexit.serve.app import ExitClassifier

    cls = ExitClassifier.func_or_class
    for name in dir(cls):
        setter = getattr(getattr(cls, name, None), "set_max_batch_size", None)
        if setter is not None:
            setter.__self__._queue = None  # the method's lazy queue wrapper
