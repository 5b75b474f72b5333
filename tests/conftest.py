"""Shared fixtures: small random models for speed, one Ray instance per test session."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED_DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"

# Files of a minute or more each on a 2-core CPU, heaviest first. `make test` hands whole files to
# two workers in collection order (--no-loadscope-reorder): starting with these keeps the run from
# ending on one worker alone with a long file while the other sits idle.
HEAVY_FILES = (
    "test_distributed_ray.py", "test_defaults_training.py", "test_serve_process.py", "test_serve_cluster.py",
    "test_seeds.py", "test_storage_ray.py", "test_serve_http.py", "test_tune_run.py", "test_tune_token_run.py",
    "test_train.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FILES)))  # stable: the rest keep their order


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


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory, minilm_tokenizer):
    """A 3-layer random BERT with the MiniLM tokenizer, saved as a folder `--model` accepts."""
    folder = tmp_path_factory.mktemp("encoder")
    tiny_backbone(layers=3, hidden=32).save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


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


class RecordingMetric:
    """Stands in for Ray's Counter/Gauge/Histogram in an in-process replica, keeping what it was given."""

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.values, self.tags = name, [], []

    def set(self, value, tags=None):
        self.values.append(value)

    def inc(self, value=1.0, tags=None):
        self.tags.append(tags)

    def observe(self, value, tags=None):
        self.values.append(value)


@contextlib.contextmanager
def replica_patches():
    """What building the deployment class in this process needs: the replica context @serve.batch asks
    for (the deployment's own numbers) and recording metrics; the batch queues are fresh on entry and exit."""
    import ray.serve
    import ray.serve.api
    import ray.util.metrics

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray.serve.api, "get_replica_context", lambda: context)
        patch.setattr(ray.serve, "get_replica_context", lambda: context)
        for kind in ("Counter", "Gauge", "Histogram"):
            patch.setattr(ray.util.metrics, kind, RecordingMetric)
        fresh_batch_queues()
        try:
            yield
        finally:
            fresh_batch_queues()  # a queue left behind would make the class unpicklable for Serve


def build_replica(settings: dict, loop: asyncio.AbstractEventLoop | None = None):
    """The real deployment class, constructed in this process (inside `replica_patches`). With `loop`, its
    start-up runs there: @serve.batch binds its queue to the loop of its first call."""
    from rayexit.serve.app import ExitClassifier

    cls = ExitClassifier.func_or_class
    obj = cls.__new__(cls)
    start = cls.__init__(obj, settings)
    if loop is None:
        asyncio.run(start)
    else:
        loop.run_until_complete(start)
    return obj


@contextlib.contextmanager
def in_process_replica(settings: dict, loop: asyncio.AbstractEventLoop | None = None):
    with replica_patches():
        yield build_replica(settings, loop)
